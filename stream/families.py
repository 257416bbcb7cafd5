"""Released causal-Wan models as named presets: which weights, how they load, and how they stream.

A `Family` bundles what each reference repository spreads over a YAML file, an inference script and a README: the
DiT size, the checkpoint file(s) and where they are published, EMA or not, the denoising steps and shift, chunk size,
attention window and sinks, the cache kind, the default prompt-switch policy, and a LoRA to merge at load.

    family("longlive")                              -> Family (printable, frozen)
    family("longlive").engine_config(num_steps=2)   -> EngineConfig for StreamEngine
    load_family("longlive", "longlive_models/")     -> CausalWanDiT with the LoRA merged in

Values come from each repository's inference config (sources in the comments of `FAMILIES`); the ones the configs
leave open or contradict are marked "uncertain".

Rolling Forcing runs its own sampler (`rolling_window=True`, stream/rolling.py): a window of as many chunks as
denoising steps, at staggered noise levels, denoised jointly in one DiT call per step; `engine_config` sets
`rolling_chunks` to the number of steps used (so `num_steps=N`, or a step list of N, gives an N-chunk window, as
the reference would).

This module sits above both `models/` and `stream/`: a family fixes the model *and* the runtime settings, so it
returns the stream's `EngineConfig`. Nothing in `models/` or `stream/` imports it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from framecast.models.config import preset
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import CheckpointError, ConfigError
from framecast.models.loading import StateDict, load_torch_file, check_state_dict, normalize_keys, read_checkpoint
from framecast.stream.engine import CacheKind, EngineConfig, SwitchPolicy


@dataclass(frozen=True)
class LoRA:
    """A LoRA adapter a family merges into its base generator at load (PEFT layout, LongLive's `lora.pt`)."""

    file: str  # file name, looked for beside the generator checkpoint
    rank: int
    alpha: float  # the update is (alpha / rank) * B @ A
    entry: str = "generator_lora"  # dict entry holding the generator's adapter (the file may hold a critic's too)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA rank={self.rank!r} must be a positive integer")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha={self.alpha!r} must be > 0")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class Family:
    """One released model family: its weights and how it streams; `replace(...)` changes fields (e.g. a tiny DiT)."""

    name: str
    source: str  # where the family publishes its weights (for error messages; nothing is downloaded)
    checkpoint: str  # generator file name
    folders: tuple[str, ...]  # sub-folders the publisher's download puts it in, tried after the folder itself
    ema: bool | None  # as `read_checkpoint`'s ema: True generator_ema, False generator, None EMA if present
    denoising_steps: tuple[int, ...]  # the published step list, without the reference's terminal 0
    warps_steps: bool  # the reference's warp_denoising_step: steps index the shifted schedule, else are timesteps
    shift: float  # timestep_shift
    chunk_frames: int  # num_frame_per_block (latent frames)
    window_frames: int  # latent frames attended, sinks and the chunk in flight included
    sink_frames: int  # first frames kept in the window forever
    cache: CacheKind = CacheKind.ROLLING
    sinks_follow_window: bool = False  # sinks' RoPE positions move to sit right before the window
    switch_policy: SwitchPolicy = SwitchPolicy.KEEP
    rolling_window: bool = False  # Rolling Forcing's sampler: one chunk per denoising step in a jointly denoised window
    lora: LoRA | None = None
    dit_preset: str = "wan2.1-t2v-1.3b"
    notes: str = ""

    def __post_init__(self) -> None:
        preset(self.dit_preset)  # raises ConfigError naming the presets
        if not self.denoising_steps or 0 in self.denoising_steps:
            raise ConfigError(f"{self.name}: denoising_steps={self.denoising_steps} must be non-empty, without 0")
        self.engine_config()  # every preset must yield a valid runtime config

    def replace(self, **changes: object) -> Family:
        """A copy with some fields changed (validated again)."""
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise ConfigError(f"unknown Family field(s) {unknown}; fields: {fields}")
        return dataclasses.replace(self, **changes)

    def engine_steps(self, num_steps: int | None = None) -> tuple[int, ...]:
        """The step list as `EngineConfig.denoising_steps` takes it; `warps_steps` says how the engine reads it.

        `num_steps` keeps the first N steps (StreamDiffusionV2's `--step N`; the first step is the one distilled
        models are trained to start from).

        Raises:
            ConfigError: num_steps outside [1, len(denoising_steps)].
        """
        steps = self.denoising_steps
        if num_steps is not None:
            if not isinstance(num_steps, int) or not 1 <= num_steps <= len(steps):
                raise ConfigError(f"{self.name}: num_steps={num_steps!r} must be in [1, {len(steps)}]")
            steps = steps[:num_steps]
        return steps

    def engine_config(
        self, latent_height: int = 60, latent_width: int = 104, *, num_steps: int | None = None, **overrides: object
    ) -> EngineConfig:
        """The family's runtime settings at a latent size; `overrides` change any other `EngineConfig` field.

        Raises:
            ConfigError: an unknown field, or a value out of range.
        """
        fields = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(f"unknown EngineConfig field(s) {unknown}; fields: {sorted(fields)}")
        steps = self.engine_steps(num_steps)
        settings: dict[str, object] = dict(
            latent_height=latent_height,
            latent_width=latent_width,
            chunk_frames=self.chunk_frames,
            denoising_steps=steps,
            warp_steps=self.warps_steps,
            shift=self.shift,
            cache=self.cache,
            window_frames=self.window_frames,
            sink_frames=self.sink_frames,
            sinks_follow_window=self.sinks_follow_window,
            switch_policy=self.switch_policy,
        )
        settings.update(overrides)
        if self.rolling_window and "rolling_chunks" not in overrides:  # one chunk per step, of the list used
            settings["rolling_chunks"] = len(settings["denoising_steps"])
        return EngineConfig(**settings)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        # guandeh17/Self-Forcing configs/self_forcing_dmd.yaml; README runs inference.py --use_ema. The model's
        # defaults local_attn_size=-1, sink_size=0 give a 32760-token (21-frame) cache that rolls, no sinks.
        Family(
            name="self-forcing",
            source="https://huggingface.co/gdhe17/Self-Forcing (checkpoints/self_forcing_dmd.pt; "
            "code: https://github.com/guandeh17/Self-Forcing)",
            checkpoint="self_forcing_dmd.pt",
            folders=("checkpoints",),
            ema=True,
            denoising_steps=(1000, 750, 500, 250),
            warps_steps=True,
            shift=5.0,
            chunk_frames=3,
            window_frames=21,
            sink_frames=0,
            switch_policy=SwitchPolicy.KEEP,  # single-prompt reference; KEEP is our choice
        ),
        # tianweiy/CausVid configs/wan_causal_dmd.yaml (as copied into StreamDiffusionV2's configs): steps
        # 1000, 757, 522, 0 unwarped, timestep_shift 8.0, num_frame_per_block 3, 21-frame clips.
        # Uncertain: CausVid attends over a whole 21-frame clip and never evicts; rolling past it is our extension.
        Family(
            name="causvid",
            source="https://huggingface.co/tianweiy/CausVid (autoregressive_checkpoint/model.pt; "
            "code: https://github.com/tianweiy/CausVid)",
            checkpoint="model.pt",
            folders=("autoregressive_checkpoint",),
            ema=False,  # the file holds "generator" only
            denoising_steps=(1000, 757, 522),
            warps_steps=False,
            shift=8.0,
            chunk_frames=3,
            window_frames=21,
            sink_frames=0,
            switch_policy=SwitchPolicy.KEEP,  # single-prompt reference; KEEP is our choice
        ),
        # NVlabs/LongLive configs/longlive_inference.yaml and longlive_interactive_inference.yaml: steps 1000..250
        # warped, timestep_shift 5.0, local_attn_size 12, sink_size 3, use_ema false, adapter rank 256 alpha 256 on
        # every Linear of each attention block (utils/lora_utils.py), lora.pt["generator_lora"] in PEFT keys.
        # Uncertain: num_frame_per_block is 3 in longlive_inference_infinity.yaml but 6 in a later
        # longlive_inference.yaml; 3 is what the base model and LoRA were trained with in the paper's release.
        Family(
            name="longlive",
            source="https://huggingface.co/Efficient-Large-Model/LongLive-1.3B (models/longlive_base.pt, "
            "models/lora.pt; code: https://github.com/NVlabs/LongLive)",
            checkpoint="longlive_base.pt",
            folders=("models",),
            ema=False,
            denoising_steps=(1000, 750, 500, 250),
            warps_steps=True,
            shift=5.0,
            chunk_frames=3,
            window_frames=12,
            sink_frames=3,
            switch_policy=SwitchPolicy.RECACHE,  # LongLive's KV re-cache on a prompt switch
            lora=LoRA(file="lora.pt", rank=256, alpha=256.0),
        ),
        # chenfengxu714/StreamDiffusionV2 configs/wan_causal_dmd_t2v.yaml: steps 1000, 750, 500, 250, 0 unwarped,
        # timestep_shift 8.0, num_frame_per_block 3, num_kv_cache 21, num_sink_tokens 0; `--step N` keeps the first
        # N non-zero steps (1 to 4: engine_config(num_steps=N)). Its video-to-video configs (steps from 700, one
        # frame per block, a 6-frame cache with 3 sinks) start from a noised input video, which this engine does not.
        Family(
            name="streamdiffusionv2",
            source="the Google Drive folder linked from https://github.com/chenfengxu714/StreamDiffusionV2 "
            "(README 'Download Checkpoints': model.pt into ckpts/wan_causal_dmd_v2v)",
            checkpoint="model.pt",
            folders=("ckpts/wan_causal_dmd_v2v", "wan_causal_dmd_v2v"),
            ema=False,  # load_generator_state_dict takes "generator" first
            denoising_steps=(1000, 750, 500, 250),
            warps_steps=False,
            shift=8.0,
            chunk_frames=3,
            window_frames=21,
            sink_frames=0,
            switch_policy=SwitchPolicy.KEEP,  # its demo swaps the prompt and keeps the cache
        ),
        # TencentARC/RollingForcing configs/rolling_forcing_dmd.yaml: steps 1000, 800, 600, 400, 200 warped,
        # timestep_shift 5.0, num_frame_per_block 3; README runs --use_ema. pipeline/rolling_forcing_inference.py
        # denoises a window of 5 chunks (one per step) jointly; wan/modules/causal_model.py attends over 21 frames:
        # the first block (3 frames) as a sink re-roped to sit right before the 3 newest cached frames it keeps
        # (sinks_follow_window), then the 15-frame window; the clean context pass attends to the newest 21 cached
        # frames without the sink (stream/rolling.py has the details).
        Family(
            name="rolling-forcing",
            source="https://huggingface.co/TencentARC/RollingForcing (checkpoints/rolling_forcing_dmd.pt; "
            "code: https://github.com/TencentARC/RollingForcing)",
            checkpoint="rolling_forcing_dmd.pt",
            folders=("checkpoints",),
            ema=True,
            denoising_steps=(1000, 800, 600, 400, 200),
            warps_steps=True,
            shift=5.0,
            chunk_frames=3,
            window_frames=21,
            sink_frames=3,
            sinks_follow_window=True,
            switch_policy=SwitchPolicy.KEEP,  # single-prompt reference; KEEP is our choice
            rolling_window=True,
            notes="rolling joint-denoising window (stream/rolling.py): 5 chunks at staggered steps, one DiT call "
            "per step; the first chunk comes after a 5-slide warm-up",
        ),
    )
}


def family(name: str, **changes: object) -> Family:
    """The named family, optionally with fields changed; raises ConfigError naming the valid families."""
    if name not in FAMILIES:
        close = difflib.get_close_matches(name, FAMILIES, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown model family {name!r}{hint}; families: {', '.join(FAMILIES)}")
    chosen = FAMILIES[name]
    return chosen.replace(**changes) if changes else chosen


# ---------------------------------------------------------------------------------------------------------------------
# Weights on disk


@dataclass(frozen=True)
class FamilyWeights:
    """The files a family loads from."""

    generator: Path
    lora: Path | None = None


def resolve_weights(family: Family, folder_or_file: str | os.PathLike) -> FamilyWeights:
    """The family's files: a checkpoint file as given, or found by name in a folder or its publisher's sub-folders.

    A LoRA file is looked for beside the generator checkpoint, then in the same places as the checkpoint.

    Raises:
        CheckpointError: the path does not exist, or an expected file is not found; the message names the file,
            the places looked in, and where the family publishes it.
    """
    path = Path(folder_or_file)
    if path.is_file():
        generator, folder = path, path.parent
    elif path.is_dir():
        generator, folder = _find(family, path, family.checkpoint), path
    else:
        raise CheckpointError(
            f"{path}: no such file or folder; {family.name} expects {family.checkpoint} from {family.source}"
        )
    lora = None
    if family.lora is not None:
        beside = generator.parent / family.lora.file
        lora = beside if beside.is_file() else _find(family, folder, family.lora.file)
    return FamilyWeights(generator, lora)


def _find(family: Family, folder: Path, name: str) -> Path:
    places = [folder / sub / name for sub in ("", *family.folders)]
    for place in places:
        if place.is_file():
            return place
    raise CheckpointError(
        f"{folder}: {family.name} expects {name} (looked for {', '.join(str(p) for p in places)}); "
        f"download it from {family.source}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# LoRA


_LORA_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")


def normalize_lora_keys(lora_state: Mapping[str, Tensor], *, source: str = "LoRA") -> StateDict:
    """PEFT adapter keys (`base_model.model.blocks.0.self_attn.q.lora_A.weight`, `...lora_A.default.weight`, under
    any training wrapper) -> ours (`blocks.0.self_attn.q.lora_A.weight`). Tensors are not copied.

    Raises:
        CheckpointError: two keys map to the same name.
    """
    renamed = {}
    for key, tensor in lora_state.items():
        parts = [part for part in key.split(".") if part != "default"]  # PEFT's adapter name inside modules
        if parts[0] == "base_model":  # PeftModel wraps the model as base_model.model
            parts = parts[1:]
        renamed[".".join(parts)] = tensor
    if len(renamed) != len(lora_state):
        raise CheckpointError(f"{source}: LoRA keys collide after removing PEFT's 'base_model.' and '.default'")
    return normalize_keys(renamed, source=source)


def merge_lora(
    state: Mapping[str, Tensor], lora_state: Mapping[str, Tensor], alpha: float, rank: int, *, source: str = "LoRA"
) -> StateDict:
    """`state` with W + (alpha / rank) * B @ A for each Linear weight W the LoRA targets; other tensors as they are.

    Pure: `state` is not changed, untouched tensors are not copied. `state` has our key names; `lora_state` may have
    PEFT's (see `normalize_lora_keys`). A merged weight is computed in float64 if W is, else float32, and kept in that
    precision (at least float32), so the update is not rounded to a low-precision W before the model's own cast.

    Raises:
        ConfigError: rank or alpha out of range.
        CheckpointError: one error listing every LoRA key that targets nothing, lacks its A/B partner, is not a LoRA
            key, or has a shape that does not fit its target and rank.
    """
    if not isinstance(rank, int) or rank < 1 or not alpha > 0:
        raise ConfigError(f"LoRA rank={rank!r} must be a positive integer and alpha={alpha!r} > 0")
    pairs: dict[str, dict[str, Tensor]] = {}
    problems: list[str] = []
    for key, tensor in normalize_lora_keys(lora_state, source=source).items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            problems.append(f"  not a LoRA key    {key}")
        else:
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    merged = dict(state)
    for module, halves in sorted(pairs.items()):
        target = f"{module}.weight"
        if target not in state:
            problems += [f"  targets nothing   {module}.lora_{half}.weight (no {target})" for half in sorted(halves)]
            continue
        if len(halves) != 2:
            missing = "B" if "A" in halves else "A"
            problems.append(f"  unpaired          {module}.lora_{missing}.weight is missing")
            continue
        down, up, weight = halves["A"], halves["B"], state[target]
        if weight.ndim != 2 or down.shape != (rank, weight.shape[1]) or up.shape != (weight.shape[0], rank):
            problems.append(
                f"  mis-shaped        {module}: lora_A {list(down.shape)}, lora_B {list(up.shape)} for weight "
                f"{list(weight.shape)} at rank {rank} (expected A [{rank}, in], B [out, {rank}])"
            )
            continue
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        merged[target] = weight.to(compute) + (alpha / rank) * (up.to(compute) @ down.to(compute))
    if problems:
        summary = f"{source}: LoRA does not fit the model ({len(problems)} problems):"
        raise CheckpointError("\n".join([summary, *problems]))
    return merged


def read_lora(path: str | os.PathLike, lora: LoRA) -> StateDict:
    """The adapter tensors in a LoRA file: the file's `lora.entry` dict, or the file itself if it is the adapter.

    Raises:
        CheckpointError: the file is missing or unreadable, or holds no dict of tensors under `lora.entry`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such LoRA file")
    obj = load_torch_file(path)
    if isinstance(obj, Mapping) and lora.entry in obj:
        obj = obj[lora.entry]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        found = sorted(map(str, obj))[:16] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path}: no LoRA state dict; expected a dict of tensors or {lora.entry!r}, found {found}"
        )
    return dict(obj)


# ---------------------------------------------------------------------------------------------------------------------
# Load


def load_family(
    name: str | Family,
    weights: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> CausalWanDiT:
    """The family's DiT with its released weights (EMA as the family prefers, LoRA merged), in `dtype` on `device`.

    `weights` is the checkpoint file or a folder holding the family's files (see `resolve_weights`). This is
    `loading.load_dit` with the family's config and a LoRA merge between normalizing the keys and checking them.

    Raises:
        ConfigError: an unknown family.
        CheckpointError: a file is missing or unreadable, or the weights (LoRA included) do not fit the family's DiT.
    """
    chosen = name if isinstance(name, Family) else family(name)
    files = resolve_weights(chosen, weights)
    source = str(files.generator)
    state = normalize_keys(read_checkpoint(files.generator, ema=chosen.ema), source=source)
    if chosen.lora is not None:
        lora_state = read_lora(files.lora, chosen.lora)
        state = merge_lora(state, lora_state, chosen.lora.alpha, chosen.lora.rank, source=str(files.lora))
    with torch.device("meta"):
        model = CausalWanDiT(preset(chosen.dit_preset))
    check_state_dict(model, state, source)
    model.load_state_dict(state, assign=True)  # checked above; the meta model takes the tensors themselves
    return model.to(device=device, dtype=dtype)
