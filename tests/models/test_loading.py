"""The checkpoint boundary: each released layout loads to the same weights and the same flow; bad files fail loudly.

Checkpoints are written here from random `tiny` weights in the layouts the reference repositories save and load:
Self-Forcing, CausVid, LongLive, StreamDiffusionV2 and Rolling Forcing (`.pt` dicts of `generator` / `generator_ema`,
keys under the diffusion wrapper's `model.` and FSDP's `_fsdp_wrapped_module.`), original-Wan and diffusers-named
safetensors, and our own `save_dit` files.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from framecast.models.config import AttentionKind, DiTConfig, preset
from framecast.models.dit import CausalWanDiT, parameter_count
from framecast.models.errors import CheckpointError, ConfigError
from framecast.models.loading import (
    check_state_dict,
    infer_config,
    load_dit,
    normalize_keys,
    read_checkpoint,
    save_dit,
)
from framecast.models.memory import BlockCausal

TINY = preset("tiny")
FRAMES, HEIGHT, WIDTH = 2, 4, 4  # latent frames and size of the forward-pass check


@dataclasses.dataclass
class TrainerState:
    """A non-tensor object pickled beside the weights, as some released training checkpoints do."""

    step: int


def random_dit(config: DiTConfig = TINY, seed: int = 0) -> CausalWanDiT:
    """A float64 DiT with every parameter random (norm scales included, so that a misrouted key changes the flow)."""
    torch.manual_seed(seed)
    dit = CausalWanDiT(config).double()
    with torch.no_grad():
        for parameter in dit.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return dit


@pytest.fixture(scope="module")
def reference() -> CausalWanDiT:
    return random_dit()


@pytest.fixture(scope="module")
def weights(reference: CausalWanDiT) -> dict[str, Tensor]:
    return {key: tensor.clone() for key, tensor in reference.state_dict().items()}


def flow(dit: CausalWanDiT, actions: Tensor | None = None) -> Tensor:
    """The flow of fixed random inputs, all frames in one block-causal call."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, FRAMES, dit.config.in_dim, HEIGHT, WIDTH, generator=generator, dtype=torch.float64)
    text = torch.randn(1, 5, dit.config.text_dim, generator=generator, dtype=torch.float64)
    tokens_per_frame = dit.config.tokens_per_frame(HEIGHT, WIDTH)
    memory = BlockCausal(dit.config, num_frames=FRAMES, chunk_frames=1, tokens_per_frame=tokens_per_frame)
    with torch.inference_mode():
        return dit(latents, torch.tensor([[900.0, 500.0]]), dit.encode_text(text), memory, actions)


@functools.cache
def reference_flow(reference: CausalWanDiT) -> Tensor:
    """`flow` of a reference model, computed once (modules hash by identity)."""
    return flow(reference)


def assert_same_model(loaded: CausalWanDiT, reference: CausalWanDiT) -> None:
    assert loaded.config == reference.config
    expected = reference.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    torch.testing.assert_close(flow(loaded), reference_flow(reference), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Layouts of the reference repositories


def with_prefix(weights: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + key: tensor for key, tensor in weights.items()}


def fsdp_wrapped(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys as FSDP with per-block auto-wrap saves them: `model._fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.`"""
    wrapped = {re.sub(r"^(blocks\.\d+)\.", r"\1._fsdp_wrapped_module.", key): tensor for key, tensor in weights.items()}
    return with_prefix(wrapped, "model._fsdp_wrapped_module.")


def scaled(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Other weights of the same shapes (the non-EMA generator beside an EMA one)."""
    return {key: tensor * 2 + 1 for key, tensor in weights.items()}


def self_forcing(weights: dict[str, Tensor]) -> dict:
    # self_forcing_dmd.pt: inference.py loads state_dict['generator_ema' if use_ema else 'generator'] after dropping
    # every "_fsdp_wrapped_module." from the keys.
    return {"generator": with_prefix(scaled(weights), "model."), "generator_ema": fsdp_wrapped(weights)}


def causvid(weights: dict[str, Tensor]) -> dict:
    # autoregressive_checkpoint/model.pt: torch.load(...)['generator'], loaded strictly into the WanDiffusionWrapper.
    return {"generator": with_prefix(weights, "model.")}


def longlive_base(weights: dict[str, Tensor]) -> dict:
    # longlive_base.pt: inference.py takes "generator_ema"/"generator", else "model"; some copies pickle more than
    # tensors (its quantized loader uses weights_only=False).
    return {"model": with_prefix(weights, "model."), "trainer": TrainerState(step=3000)}


def stream_diffusion_v2(weights: dict[str, Tensor]) -> dict:
    # model.pt of a checkpoint folder: load_generator_state_dict tries "generator", "generator_ema", "state_dict".
    return {"generator": with_prefix(weights, "model."), "critic": {"fake_score.weight": torch.zeros(3)}}


def rolling_forcing(weights: dict[str, Tensor]) -> dict:
    # rolling_forcing_dmd.pt: EMA weights (FSDP keys) by default, "generator" with --no_ema.
    return {"generator": with_prefix(scaled(weights), "model."), "generator_ema": fsdp_wrapped(weights)}


def compiled_ddp(weights: dict[str, Tensor]) -> dict:
    # torch.compile inside DDP inside the diffusion wrapper, nested under a trainer's "state_dict".
    return {"state_dict": {"generator": with_prefix(weights, "module._orig_mod.model.")}, "epoch": 4}


TORCH_LAYOUTS: dict[str, Callable[[dict[str, Tensor]], dict]] = {
    "self_forcing": self_forcing,
    "causvid": causvid,
    "longlive_base": longlive_base,
    "stream_diffusion_v2": stream_diffusion_v2,
    "rolling_forcing": rolling_forcing,
    "compiled_ddp": compiled_ddp,
}


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("layout", TORCH_LAYOUTS)
def test_released_torch_layouts_load(layout: str, legacy_format: bool, tmp_path: Path, weights, reference) -> None:
    path = tmp_path / f"{layout}.pt"
    torch.save(TORCH_LAYOUTS[layout](weights), path, _use_new_zipfile_serialization=not legacy_format)
    assert_same_model(load_dit(path, dtype=torch.float64), reference)


@pytest.mark.parametrize("layout", ["self_forcing", "rolling_forcing"])
def test_ema_choice(layout: str, tmp_path: Path, weights, reference) -> None:
    path = tmp_path / f"{layout}.pt"
    torch.save(TORCH_LAYOUTS[layout](weights), path)
    assert_same_model(load_dit(path, dtype=torch.float64, ema=True), reference)
    non_ema = load_dit(path, dtype=torch.float64, ema=False)
    assert torch.equal(non_ema.head.head.weight, scaled(weights)["head.head.weight"])


def test_ema_requested_but_absent(tmp_path: Path, weights) -> None:
    path = tmp_path / "causvid.pt"
    torch.save(causvid(weights), path)
    with pytest.raises(CheckpointError, match=r"causvid\.pt.*ema=True asks for 'generator_ema'.*\['generator'\]"):
        read_checkpoint(path, ema=True)
    torch.save({"generator_ema": weights}, path)
    with pytest.raises(CheckpointError, match=r"ema=False asks for 'generator'"):
        read_checkpoint(path, ema=False)


def test_safetensors_original_naming(tmp_path: Path, weights, reference) -> None:
    path = tmp_path / "wan.safetensors"
    save_file(weights, path)
    assert_same_model(load_dit(path, dtype=torch.float64), reference)


# Wan -> diffusers names, written out from diffusers' WanTransformer3DModel (transformer_wan.py): what a diffusers
# `transformer/diffusion_pytorch_model.safetensors` holds.
WAN_TO_DIFFUSERS = [
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"\.self_attn\.([qkv])\.", r".attn1.to_\1."),
    (r"\.self_attn\.o\.", ".attn1.to_out.0."),
    (r"\.self_attn\.norm_", ".attn1.norm_"),
    (r"\.cross_attn\.([qkv])\.", r".attn2.to_\1."),
    (r"\.cross_attn\.o\.", ".attn2.to_out.0."),
    (r"\.cross_attn\.norm_", ".attn2.norm_"),
    (r"\.norm3\.", ".norm2."),
    (r"\.ffn\.0\.", ".ffn.net.0.proj."),
    (r"\.ffn\.2\.", ".ffn.net.2."),
    (r"\.modulation$", ".scale_shift_table"),
]


def to_diffusers(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    renamed = {}
    for key, tensor in weights.items():
        for pattern, replacement in WAN_TO_DIFFUSERS:
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor
    return renamed


def test_safetensors_diffusers_naming(tmp_path: Path, weights, reference) -> None:
    diffusers_weights = to_diffusers(weights)
    assert "blocks.1.attn2.to_out.0.weight" in diffusers_weights and "blocks.0.norm2.bias" in diffusers_weights
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(diffusers_weights, path)
    assert_same_model(load_dit(path, dtype=torch.float64), reference)


@pytest.mark.parametrize(
    ("diffusers_key", "wan_key"),
    [
        ("condition_embedder.time_embedder.linear_1.weight", "time_embedding.0.weight"),
        ("condition_embedder.time_proj.bias", "time_projection.1.bias"),
        ("condition_embedder.text_embedder.linear_2.weight", "text_embedding.2.weight"),
        ("blocks.7.attn1.to_out.0.bias", "blocks.7.self_attn.o.bias"),
        ("blocks.7.attn2.norm_k.weight", "blocks.7.cross_attn.norm_k.weight"),
        ("blocks.7.norm2.weight", "blocks.7.norm3.weight"),
        ("blocks.7.ffn.net.0.proj.weight", "blocks.7.ffn.0.weight"),
        ("blocks.7.ffn.net.2.bias", "blocks.7.ffn.2.bias"),
        ("blocks.7.scale_shift_table", "blocks.7.modulation"),
        ("scale_shift_table", "head.modulation"),
        ("proj_out.weight", "head.head.weight"),
        ("patch_embedding.weight", "patch_embedding.weight"),
    ],
)
def test_diffusers_key_names(diffusers_key: str, wan_key: str) -> None:
    state = {diffusers_key: torch.zeros(1), "blocks.0.attn1.to_q.weight": torch.zeros(1)}
    assert wan_key in normalize_keys(state)


def test_real_diffusers_model_computes_the_same_flow(tmp_path: Path) -> None:
    """A diffusers WanTransformer3DModel (bidirectional) equals our DiT run with the whole clip in one chunk."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    wan = diffusers.WanTransformer3DModel(
        num_attention_heads=TINY.num_heads, attention_head_dim=TINY.head_dim, text_dim=TINY.text_dim,
        freq_dim=TINY.freq_dim, ffn_dim=TINY.ffn_dim, num_layers=TINY.num_layers, eps=TINY.eps,
    ).double()
    with torch.no_grad():
        for parameter in wan.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({key: tensor.contiguous() for key, tensor in wan.state_dict().items()}, path)
    dit = load_dit(path, dtype=torch.float64)
    latents = torch.randn(1, FRAMES, 16, HEIGHT, WIDTH, dtype=torch.float64)
    text = torch.randn(1, 5, TINY.text_dim, dtype=torch.float64)
    padded_text = torch.nn.functional.pad(text, (0, 0, 0, TINY.text_len - 5))  # Wan pads the prompt to text_len
    memory = BlockCausal(dit.config, num_frames=FRAMES, chunk_frames=FRAMES, tokens_per_frame=4)
    with torch.inference_mode():
        want = wan(latents.transpose(1, 2), torch.tensor([700.0]), padded_text, return_dict=False)[0].transpose(1, 2)
        got = dit(latents, torch.full((1, FRAMES), 700.0), dit.encode_text(text), memory)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # diffusers runs its norms in float32


# ---------------------------------------------------------------------------------------------------------------------
# Our own files: save_dit -> load_dit


def test_save_load_round_trip_reads_config_from_metadata(tmp_path: Path) -> None:
    # text_len, eps and attention cannot be read from the weights' shapes: only the metadata knows them.
    config = TINY.replace(text_len=8, eps=1e-5, num_actions=3, attention=AttentionKind.LINEAR)
    dit = random_dit(config)
    path = tmp_path / "ours.safetensors"
    save_dit(dit, path)
    loaded = load_dit(path, dtype=torch.float64)
    assert loaded.config == config
    for key, tensor in dit.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    "stored",
    ["{not json", '{"dim": 64}', '{"dim": 64, "attention": "softmax", "patch_size": [1, 2, 2], "heads": 2}'],
    ids=["not-json", "missing-fields", "unknown-field"],
)
def test_malformed_stored_config(stored: str, tmp_path: Path, weights) -> None:
    path = tmp_path / "odd.safetensors"
    save_file(weights, path, metadata={"framecast.dit_config": stored})
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: stored DiT config is malformed"):
        load_dit(path)


def test_save_needs_safetensors_suffix(tmp_path: Path, reference) -> None:
    with pytest.raises(CheckpointError, match=r"ours\.pt: save_dit writes safetensors"):
        save_dit(reference, tmp_path / "ours.pt")


def test_default_dtype_is_bfloat16(tmp_path: Path, reference) -> None:
    path = tmp_path / "ours.safetensors"
    save_dit(reference, path)
    loaded = load_dit(path)
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.bfloat16}
    assert loaded.device == torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------------
# Bad files


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nothing\.pt: no such checkpoint file"):
        load_dit(tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match=r"is a folder; pass the checkpoint file in it"):
        load_dit(tmp_path)


@pytest.mark.parametrize("name", ["truncated.pt", "truncated.safetensors"])
def test_truncated_file(name: str, tmp_path: Path, weights, reference) -> None:
    path = tmp_path / name
    if path.suffix == ".pt":
        torch.save(causvid(weights), path)
    else:
        save_dit(reference, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}: not a readable"):
        load_dit(path)


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy"])
def test_truncated_legacy_and_zip_torch_files(legacy_format: bool, tmp_path: Path, weights) -> None:
    path = tmp_path / "model.pt"
    torch.save(causvid(weights), path, _use_new_zipfile_serialization=not legacy_format)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.pt: not a readable torch checkpoint"):
        read_checkpoint(path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a readable torch checkpoint"):
        read_checkpoint(path)


def test_no_state_dict_names_the_keys_found(tmp_path: Path) -> None:
    path = tmp_path / "optimizer.pt"
    torch.save({"optimizer": {"lr": 0.1}, "step": 3}, path)
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: no generator state dict found.*\['optimizer', 'step'\]"):
        read_checkpoint(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match=r"holds a list, not a dict of tensors"):
        read_checkpoint(path)


def test_missing_unexpected_and_misshaped_keys_are_listed_together(tmp_path: Path, weights) -> None:
    broken = dict(weights)
    del broken["blocks.1.cross_attn.k.bias"]
    broken["blocks.1.lora_A.weight"] = torch.zeros(4, 64)
    broken["head.modulation"] = torch.zeros(1, 3, 64)
    path = tmp_path / "broken.pt"
    torch.save({"generator": with_prefix(broken, "model.")}, path)
    with pytest.raises(CheckpointError) as error:
        load_dit(path, TINY)
    message = str(error.value)
    assert "broken.pt" in message and "1 missing, 1 unexpected, 1 mis-shaped" in message
    assert "missing     blocks.1.cross_attn.k.bias [64]" in message
    assert "unexpected  blocks.1.lora_A.weight [4, 64]" in message
    assert "mis-shaped  head.modulation: checkpoint [1, 3, 64], model [1, 2, 64]" in message


def test_check_state_dict_passes_a_fitting_state(reference, weights) -> None:
    check_state_dict(reference, weights, "ok")


def test_wrong_config_lists_every_mismatch(tmp_path: Path, weights) -> None:
    path = tmp_path / "w.safetensors"
    save_file(weights, path)
    extra = sum(key.startswith("blocks.1.") for key in weights)
    with pytest.raises(CheckpointError, match=rf"w\.safetensors: does not fit the DiT \(0 missing, {extra} unexpected"):
        load_dit(path, TINY.replace(num_layers=1))
    with pytest.raises(CheckpointError, match=r"mis-shaped  blocks\.0\.ffn\.0\.weight: checkpoint \[128, 64\], model"):
        load_dit(path, TINY.replace(ffn_dim=256))


def test_colliding_keys(weights) -> None:
    state = {"model.head.head.bias": weights["head.head.bias"], "head.head.bias": weights["head.head.bias"]}
    with pytest.raises(CheckpointError, match=r"'model\.head\.head\.bias' and 'head\.head\.bias' both map to"):
        normalize_keys(state)


# ---------------------------------------------------------------------------------------------------------------------
# Actions


def test_released_checkpoint_into_an_action_model(tmp_path: Path, weights, reference) -> None:
    """No action table in the file: it starts at zero, so the model computes the released model's flow."""
    path = tmp_path / "causvid.pt"
    torch.save(causvid(weights), path)
    dit = load_dit(path, TINY.replace(num_actions=5), dtype=torch.float64)
    assert torch.equal(dit.action_embedding.weight, torch.zeros(5, TINY.dim, dtype=torch.float64))
    torch.testing.assert_close(flow(dit, actions=torch.tensor([[1, 4]])), reference_flow(reference), rtol=0, atol=1e-12)


def test_action_table_needs_num_actions(tmp_path: Path) -> None:
    path = tmp_path / "actions.safetensors"
    save_file(random_dit(TINY.replace(num_actions=2)).state_dict(), path)  # no metadata: config inferred
    assert load_dit(path, dtype=torch.float64).config.num_actions == 2
    with pytest.raises(CheckpointError, match=r"(?s)unexpected  action_embedding\.weight.*set config\.num_actions"):
        load_dit(path, TINY)


# ---------------------------------------------------------------------------------------------------------------------
# Config inference and the released sizes


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "small", "tiny"])
def test_infer_config_of_presets(name: str) -> None:
    with torch.device("meta"):
        state = CausalWanDiT(preset(name)).state_dict()
    assert infer_config(normalize_keys(with_prefix(state, "model._fsdp_wrapped_module."))) == preset(name)


def test_infer_config_unknown_width(weights) -> None:
    with pytest.raises(ConfigError, match=r"cannot tell the head count of a DiT of width 96"):
        infer_config({**weights, "patch_embedding.weight": torch.zeros(96, 16, 1, 2, 2)})
    with pytest.raises(CheckpointError, match=r"cannot infer the DiT config without \['head\.head\.weight'\]"):
        infer_config({key: tensor for key, tensor in weights.items() if not key.startswith("head.")})


def test_wan21_1_3b_parameter_count_on_meta() -> None:
    assert parameter_count(preset("wan2.1-t2v-1.3b")) == 1_418_996_800
    with torch.device("meta"):
        dit = CausalWanDiT(preset("wan2.1-t2v-1.3b"))
    check_state_dict(dit, dit.state_dict(), "meta")  # the check itself needs no memory either
