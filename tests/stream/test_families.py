"""Model families: each loads from its released file layout and streams; LoRA merges; bad names and files fail loudly.

Checkpoints are random `tiny` weights written where and how each family's download puts them (file names, sub-folders,
`generator` / `generator_ema` entries, wrapper prefixes, LongLive's PEFT `lora.pt`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from framecast.models.config import preset
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import CheckpointError, ConfigError
from framecast.stream.families import (
    FAMILIES,
    Family,
    LoRA,
    family,
    load_family,
    merge_lora,
    normalize_lora_keys,
    resolve_weights,
)
from framecast.stream.engine import CacheKind, EngineConfig, StreamEngine, SwitchPolicy
from framecast.stream.rolling import RollingStreamEngine
from framecast.stream.sampler import FlowMatchSchedule

TINY = preset("tiny")
LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
           "cross_attn.o", "ffn.0", "ffn.2")  # every Linear of an attention block: LongLive's LoRA targets
RANK = 4  # the tiny LoRA's rank (LongLive's is 256)


def tiny(name: str) -> Family:
    fam = family(name, dit_preset="tiny")
    return fam if fam.lora is None else fam.replace(lora=LoRA(fam.lora.file, rank=RANK, alpha=8.0))


@pytest.fixture(scope="module")
def weights() -> dict[str, Tensor]:
    torch.manual_seed(0)
    dit = CausalWanDiT(TINY).double()
    with torch.no_grad():
        for parameter in dit.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return {key: tensor.clone() for key, tensor in dit.state_dict().items()}


def with_prefix(weights: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + key: tensor for key, tensor in weights.items()}


def fsdp_wrapped(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    wrapped = {re.sub(r"^(blocks\.\d+)\.", r"\1._fsdp_wrapped_module.", key): tensor for key, tensor in weights.items()}
    return with_prefix(wrapped, "model._fsdp_wrapped_module.")


def other(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: tensor * 2 + 1 for key, tensor in weights.items()}


def peft_lora(num_layers: int, seed: int = 1) -> dict[str, Tensor]:
    """A PEFT `get_peft_model_state_dict` of LoRAs on every block Linear of the tiny DiT (B non-zero: a trained one)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {name: tensor.shape for name, tensor in CausalWanDiT(TINY).state_dict().items()}
    lora = {}
    for layer in range(num_layers):
        for linear in LINEARS:
            out_features, in_features = shapes[f"blocks.{layer}.{linear}.weight"]
            key = f"base_model.model.blocks.{layer}.{linear}"
            lora[f"{key}.lora_A.weight"] = torch.randn(RANK, in_features, generator=generator, dtype=torch.float64)
            lora[f"{key}.lora_B.weight"] = torch.randn(out_features, RANK, generator=generator, dtype=torch.float64)
    return lora


# Each family's download, written into a folder the way its publisher lays it out.
def self_forcing(weights: dict[str, Tensor], folder: Path) -> None:
    # gdhe17/Self-Forcing checkpoints/self_forcing_dmd.pt: EMA under FSDP keys, the raw generator beside it.
    save(folder / "checkpoints/self_forcing_dmd.pt",
         {"generator": with_prefix(other(weights), "model."), "generator_ema": fsdp_wrapped(weights)})


def causvid(weights: dict[str, Tensor], folder: Path) -> None:
    save(folder / "autoregressive_checkpoint/model.pt", {"generator": with_prefix(weights, "model.")})


def longlive(weights: dict[str, Tensor], folder: Path) -> None:
    # Efficient-Large-Model/LongLive-1.3B models/: the base generator and PEFT LoRAs of generator and critic.
    save(folder / "models/longlive_base.pt", {"generator": with_prefix(weights, "model.")})
    lora = {"generator_lora": peft_lora(TINY.num_layers), "critic_lora": {"x": torch.zeros(1)}}
    save(folder / "models/lora.pt", lora)


def streamdiffusionv2(weights: dict[str, Tensor], folder: Path) -> None:
    save(folder / "ckpts/wan_causal_dmd_v2v/model.pt",
         {"generator": with_prefix(weights, "model."), "critic": {"fake_score.weight": torch.zeros(3)}})


def rolling_forcing(weights: dict[str, Tensor], folder: Path) -> None:
    save(folder / "checkpoints/rolling_forcing_dmd.pt",
         {"generator": with_prefix(other(weights), "model."), "generator_ema": fsdp_wrapped(weights)})


def save(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


LAYOUTS: dict[str, Callable[[dict[str, Tensor], Path], None]] = {
    "self-forcing": self_forcing,
    "causvid": causvid,
    "longlive": longlive,
    "streamdiffusionv2": streamdiffusionv2,
    "rolling-forcing": rolling_forcing,
}


def test_every_family_has_a_layout() -> None:
    assert LAYOUTS.keys() == FAMILIES.keys()


def expected_weights(name: str, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """What the family's load must produce: the EMA (or only) generator, plus the LoRA update by hand."""
    if name != "longlive":
        return weights
    expected = dict(weights)
    lora = peft_lora(TINY.num_layers)
    scale = tiny(name).lora.scale
    for layer in range(TINY.num_layers):
        for linear in LINEARS:
            key = f"base_model.model.blocks.{layer}.{linear}"
            target = f"blocks.{layer}.{linear}.weight"
            expected[target] = weights[target] + scale * lora[f"{key}.lora_B.weight"] @ lora[f"{key}.lora_A.weight"]
    return expected


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_loads_its_release_and_streams(name: str, tmp_path: Path, weights) -> None:
    LAYOUTS[name](weights, tmp_path)
    fam = tiny(name)
    dit = load_family(fam, tmp_path, dtype=torch.float64)
    assert dit.config == TINY
    got = dit.state_dict()
    for key, tensor in expected_weights(name, weights).items():
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=1e-12, msg=key)

    config = fam.engine_config(latent_height=4, latent_width=4)
    prompt = torch.randn(1, 5, TINY.text_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    engine = StreamEngine(dit, config, prompt)
    assert isinstance(engine, RollingStreamEngine) == (name == "rolling-forcing")  # Rolling Forcing's own sampler
    chunks = [engine.next_chunk() for _ in range(3)]
    for index, chunk in enumerate(chunks):
        assert chunk.latents.shape == (1, fam.chunk_frames, TINY.in_dim, 4, 4)
        assert chunk.first_frame == index * fam.chunk_frames
        assert torch.isfinite(chunk.latents).all()
        assert chunk.steps == config.denoising_steps


@pytest.mark.parametrize("name", list(FAMILIES))
def test_checkpoint_file_given_directly(name: str, tmp_path: Path, weights) -> None:
    LAYOUTS[name](weights, tmp_path)
    found = resolve_weights(tiny(name), tmp_path)
    assert found.generator.name == family(name).checkpoint
    again = resolve_weights(tiny(name), found.generator)
    assert again == found  # the LoRA is found beside the checkpoint


def test_longlive_lora_changes_the_model(tmp_path: Path, weights) -> None:
    longlive(weights, tmp_path)
    merged = load_family(tiny("longlive"), tmp_path, dtype=torch.float64)
    base = load_family(tiny("longlive").replace(lora=None), tmp_path, dtype=torch.float64)
    changed = {key for key, tensor in merged.state_dict().items() if not torch.equal(tensor, base.state_dict()[key])}
    assert changed == {f"blocks.{layer}.{linear}.weight" for layer in range(TINY.num_layers) for linear in LINEARS}


def test_default_dtype_is_bfloat16(tmp_path: Path, weights) -> None:
    causvid(weights, tmp_path)
    dit = load_family(tiny("causvid"), tmp_path)
    assert {parameter.dtype for parameter in dit.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------------
# The presets


@pytest.mark.parametrize("name", list(FAMILIES))
def test_presets_make_valid_engine_configs(name: str) -> None:
    fam = family(name)
    assert fam.dit_preset == "wan2.1-t2v-1.3b"
    config = fam.engine_config()
    assert (config.latent_height, config.latent_width) == (60, 104)
    assert (config.chunk_frames, config.window_frames, config.sink_frames) == (
        fam.chunk_frames, fam.window_frames, fam.sink_frames)
    assert config.shift == fam.shift and config.cache is CacheKind.ROLLING
    assert len(config.denoising_steps) == len(fam.denoising_steps)


def test_published_values() -> None:
    self_forcing_config = family("self-forcing").engine_config()
    assert self_forcing_config.denoising_steps == (1000, 750, 500, 250) and self_forcing_config.shift == 5.0
    assert family("self-forcing").checkpoint == "self_forcing_dmd.pt" and family("self-forcing").ema is True
    longlive_config = family("longlive").engine_config()
    assert (longlive_config.window_frames, longlive_config.sink_frames) == (12, 3)
    assert longlive_config.switch_policy is SwitchPolicy.RECACHE
    assert family("longlive").lora == LoRA("lora.pt", rank=256, alpha=256.0)
    rolling_config = family("rolling-forcing").engine_config()
    assert rolling_config.rolling_chunks == 5 and family("rolling-forcing").engine_config(num_steps=3).rolling_chunks == 3
    assert family("rolling-forcing").engine_config(denoising_steps=(1000, 500)).rolling_chunks == 2  # e.g. --steps
    assert family("rolling-forcing").engine_config(rolling_chunks=1).rolling_chunks == 1  # the chunk sampler
    assert (rolling_config.window_frames, rolling_config.sink_frames, rolling_config.sinks_follow_window) == (21, 3, True)
    assert "not implemented" not in family("rolling-forcing").notes
    assert all(family(name).engine_config().rolling_chunks == 1 for name in FAMILIES if name != "rolling-forcing")


@pytest.mark.parametrize("name", ["causvid", "streamdiffusionv2"])
def test_unwarped_families_feed_their_steps_as_timesteps(name: str) -> None:
    fam = family(name)
    config = fam.engine_config()
    assert not config.warp_steps and config.denoising_steps == fam.denoising_steps
    schedule = FlowMatchSchedule(fam.shift)
    steps = schedule.steps(config.denoising_steps, warp=False)
    assert [s.timestep for s in steps] == [float(t) for t in fam.denoising_steps]  # what the model sees, exactly
    for step in steps:  # sigma of the nearest schedule entry, as the reference looks it up
        nearest = int(torch.argmin((schedule.timesteps - step.timestep).abs()))
        assert step.sigma == float(schedule.sigmas[nearest])


def test_num_steps_keeps_the_first_steps() -> None:
    fam = family("streamdiffusionv2")
    assert [len(fam.engine_config(num_steps=n).denoising_steps) for n in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert fam.engine_config(num_steps=2).denoising_steps == fam.engine_config().denoising_steps[:2]
    with pytest.raises(ConfigError, match=r"num_steps=5 must be in \[1, 4\]"):
        fam.engine_config(num_steps=5)


def test_engine_config_overrides() -> None:
    config = family("longlive").engine_config(8, 8, switch_policy=SwitchPolicy.RESET, seed=3)
    assert isinstance(config, EngineConfig)
    assert (config.switch_policy, config.seed, config.window_frames) == (SwitchPolicy.RESET, 3, 12)
    with pytest.raises(ConfigError, match=r"unknown EngineConfig field\(s\) \['windows'\]"):
        family("longlive").engine_config(windows=3)
    with pytest.raises(ConfigError, match=r"sink_frames=11 must be in \[0, window_frames - chunk_frames = 9\]"):
        family("longlive").engine_config(sink_frames=11)


def test_unknown_family() -> None:
    families = "self-forcing, causvid, longlive, streamdiffusionv2, rolling-forcing"
    with pytest.raises(ConfigError, match=rf"unknown model family 'self_forcing' \(did you mean self-forcing[,?].*\); "
                                          rf"families: {families}$"):
        family("self_forcing")
    with pytest.raises(ConfigError, match=r"unknown model family 'sdxl'; families:"):
        load_family("sdxl", "anywhere")
    with pytest.raises(ConfigError, match=r"unknown Family field\(s\) \['preset'\]"):
        family("causvid", preset="tiny")
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'"):
        family("causvid", dit_preset="huge")


# ---------------------------------------------------------------------------------------------------------------------
# Missing files


def test_missing_checkpoint_names_file_and_source(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as error:
        resolve_weights(family("self-forcing"), tmp_path)
    message = str(error.value)
    assert "self-forcing expects self_forcing_dmd.pt" in message
    assert str(tmp_path / "checkpoints" / "self_forcing_dmd.pt") in message
    assert "https://huggingface.co/gdhe17/Self-Forcing" in message


def test_missing_lora_names_file_and_source(tmp_path: Path, weights) -> None:
    longlive(weights, tmp_path)
    (tmp_path / "models/lora.pt").unlink()
    with pytest.raises(CheckpointError, match=r"longlive expects lora\.pt .*Efficient-Large-Model/LongLive-1\.3B"):
        load_family(tiny("longlive"), tmp_path, dtype=torch.float64)


def test_missing_path_names_file_and_source(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nowhere: no such file or folder; rolling-forcing expects "
                                              r"rolling_forcing_dmd\.pt from https://huggingface\.co/TencentARC"):
        load_family("rolling-forcing", tmp_path / "nowhere")


def test_wrong_size_checkpoint_lists_the_misfit(tmp_path: Path, weights) -> None:
    causvid(weights, tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.pt: does not fit the DiT"):
        load_family("causvid", tmp_path, dtype=torch.float32)  # tiny weights into the 1.3B preset (on meta: cheap)


def test_lora_entry_missing(tmp_path: Path, weights) -> None:
    longlive(weights, tmp_path)
    torch.save({"optimizer": {"lr": torch.zeros(1)}, "step": 3}, tmp_path / "models/lora.pt")
    with pytest.raises(CheckpointError, match=r"lora\.pt: no LoRA state dict; expected .*'generator_lora'"):
        load_family(tiny("longlive"), tmp_path, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------------
# merge_lora


def test_merge_lora_equals_the_manual_update() -> None:
    generator = torch.Generator().manual_seed(0)
    state = {
        "blocks.0.self_attn.q.weight": torch.randn(6, 5, generator=generator, dtype=torch.float64),
        "blocks.0.self_attn.q.bias": torch.randn(6, generator=generator, dtype=torch.float64),
        "blocks.0.norm3.weight": torch.randn(5, generator=generator, dtype=torch.float64),
    }
    down = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    up = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    lora = {"blocks.0.self_attn.q.lora_A.weight": down, "blocks.0.self_attn.q.lora_B.weight": up}
    before = {key: tensor.clone() for key, tensor in state.items()}
    merged = merge_lora(state, lora, alpha=3.0, rank=2)
    want = before["blocks.0.self_attn.q.weight"] + 1.5 * up @ down
    torch.testing.assert_close(merged["blocks.0.self_attn.q.weight"], want, rtol=0, atol=1e-12)
    assert merged["blocks.0.self_attn.q.bias"] is state["blocks.0.self_attn.q.bias"]  # untouched: not copied
    for key, tensor in state.items():
        assert torch.equal(tensor, before[key]), key  # pure: the input is unchanged


def test_merge_lora_keeps_float32_precision_for_low_precision_weights() -> None:
    state = {"head.head.weight": torch.ones(3, 4, dtype=torch.bfloat16)}
    lora = {"head.head.lora_A.weight": torch.full((1, 4), 1e-3), "head.head.lora_B.weight": torch.ones(3, 1)}
    merged = merge_lora(state, lora, alpha=1.0, rank=1)["head.head.weight"]
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, torch.full((3, 4), 1.001))


def test_peft_key_names() -> None:
    lora = {
        "base_model.model.blocks.3.ffn.0.lora_A.weight": torch.zeros(1),
        "base_model.model.blocks.3.ffn.0.lora_B.default.weight": torch.zeros(1),
        "base_model.model._fsdp_wrapped_module.blocks.4._fsdp_wrapped_module.self_attn.o.lora_A.weight": torch.zeros(1),
    }
    assert list(normalize_lora_keys(lora)) == [
        "blocks.3.ffn.0.lora_A.weight", "blocks.3.ffn.0.lora_B.weight", "blocks.4.self_attn.o.lora_A.weight"]


def test_merge_lora_lists_every_bad_key_at_once() -> None:
    state = {"blocks.0.ffn.0.weight": torch.zeros(8, 4), "blocks.0.ffn.2.weight": torch.zeros(4, 8),
             "blocks.0.norm3.weight": torch.zeros(4)}
    lora = {
        "base_model.model.blocks.7.ffn.0.lora_A.weight": torch.zeros(2, 4),  # no block 7
        "base_model.model.blocks.7.ffn.0.lora_B.weight": torch.zeros(8, 2),
        "base_model.model.blocks.0.cross_attn.q.lora_A.weight": torch.zeros(2, 4),  # no such Linear
        "base_model.model.blocks.0.ffn.0.lora_A.weight": torch.zeros(2, 4),  # B missing
        "base_model.model.blocks.0.ffn.2.lora_A.weight": torch.zeros(3, 8),  # rank 3, not 2
        "base_model.model.blocks.0.ffn.2.lora_B.weight": torch.zeros(4, 3),
        "base_model.model.blocks.0.norm3.lora_A.weight": torch.zeros(2, 4),  # a norm is not a Linear
        "base_model.model.blocks.0.norm3.lora_B.weight": torch.zeros(4, 2),
        "base_model.model.blocks.0.ffn.0.scale": torch.zeros(1),
    }
    with pytest.raises(CheckpointError) as error:
        merge_lora(state, lora, alpha=2.0, rank=2, source="lora.pt")
    message = str(error.value)
    assert message.startswith("lora.pt: LoRA does not fit the model (7 problems):")
    assert "targets nothing   blocks.7.ffn.0.lora_A.weight (no blocks.7.ffn.0.weight)" in message
    assert "targets nothing   blocks.7.ffn.0.lora_B.weight" in message
    assert "targets nothing   blocks.0.cross_attn.q.lora_A.weight (no blocks.0.cross_attn.q.weight)" in message
    assert "unpaired          blocks.0.ffn.0.lora_B.weight is missing" in message
    assert "mis-shaped        blocks.0.ffn.2: lora_A [3, 8], lora_B [4, 3] for weight [4, 8] at rank 2" in message
    assert "mis-shaped        blocks.0.norm3: lora_A [2, 4], lora_B [4, 2] for weight [4] at rank 2" in message
    assert "not a LoRA key    blocks.0.ffn.0.scale" in message


@pytest.mark.parametrize(("alpha", "rank"), [(1.0, 0), (0.0, 4), (1.0, 2.5)])
def test_merge_lora_bad_scale(alpha: float, rank) -> None:
    with pytest.raises(ConfigError, match=r"LoRA rank=.* must be a positive integer and alpha=.* > 0"):
        merge_lora({}, {}, alpha=alpha, rank=rank)
