"""The checkpoint boundary: every released layout of the causal Wan DiT in, a loaded `CausalWanDiT` out.

Accepted files:

* `.pt` / `.pth` (torch.save) of Self-Forcing, CausVid, LongLive, StreamDiffusionV2 and Rolling Forcing: a dict holding
  `generator` and/or `generator_ema` (or `model` / `state_dict` / `module`), whose keys carry training-wrapper prefixes
  (`model.` of the diffusion wrapper, `_fsdp_wrapped_module.` of FSDP, `_orig_mod.` of torch.compile, `module.` of DDP,
  `_checkpoint_wrapped_module.` of activation checkpointing), in any number and order.
* `.safetensors` in original Wan naming (what `CausalWanDiT` uses, and what `save_dit` writes, with the config in the
  metadata) or in diffusers naming (`WanTransformer3DModel`).

Pure functions do the work: `read_checkpoint` (file -> tensor dict), `normalize_keys` (any layout -> ours),
`infer_config` (weights -> DiTConfig), `check_state_dict` (one error listing every bad key). `load_dit` chains them and
loads into a model built on the meta device, so the weights are allocated once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import zipfile
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from framecast.models.config import PRESETS, AttentionKind, DiTConfig
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import CheckpointError, ConfigError

StateDict = dict[str, Tensor]

SAFETENSORS_SUFFIX = ".safetensors"
CONFIG_METADATA_KEY = "framecast.dit_config"  # safetensors metadata entry holding the DiTConfig as JSON

# Segments that training wrappers insert anywhere in a key (FSDP may wrap each block: `blocks.0._fsdp_wrapped_module.`).
_WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
# Leading segments of wrappers around the whole DiT: the reference's WanDiffusionWrapper (`model.`), DDP (`module.`),
# ComfyUI-style single files (`model.diffusion_model.`). Our own keys never start with these.
_WRAPPER_PREFIXES = ("model", "module", "diffusion_model")

# Where to look for the generator inside a torch checkpoint, after `generator_ema` / `generator`.
_NESTING_KEYS = ("state_dict", "model", "module")
_EMA_KEY, _GENERATOR_KEY = "generator_ema", "generator"

# diffusers `WanTransformer3DModel` name -> original Wan name, checked against diffusers' transformer_wan.py and
# scripts/convert_wan_to_diffusers.py. Parameter shapes are the same in both namings: diffusers' block
# `scale_shift_table` is [1, 6, dim] like Wan's `modulation`, its top-level one [1, 2, dim] like `head.modulation`.
_DIFFUSERS_TOP_LEVEL = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
_DIFFUSERS_BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3",  # diffusers numbers the norms in call order; its norm2 is Wan's affine cross-attention norm3
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "scale_shift_table": "modulation",
}
_BLOCK_KEY = re.compile(r"(blocks\.\d+)\.(.+)")
_BLOCK_INDEX = re.compile(r"blocks\.(\d+)\.")

# Keys that `infer_config` reads shapes from.
_SHAPE_KEYS = (
    "patch_embedding.weight",  # [dim, in_dim, *patch_size]
    "text_embedding.0.weight",  # [dim, text_dim]
    "time_embedding.0.weight",  # [dim, freq_dim]
    "blocks.0.ffn.0.weight",  # [ffn_dim, dim]
    "head.head.weight",  # [out_dim * patch volume, dim]
)


# ---------------------------------------------------------------------------------------------------------------------
# File -> tensor dict


def read_checkpoint(path: str | os.PathLike, *, ema: bool | None = None) -> StateDict:
    """The generator's raw tensors in a checkpoint file, keys as stored (see `normalize_keys`).

    `ema`: None takes `generator_ema` when the file has one, else `generator`; True requires `generator_ema`; False
    requires a non-EMA state dict. A `.safetensors` file holds one state dict, which is not EMA-labelled.

    Raises:
        CheckpointError: the file is missing or unreadable (truncated, not a checkpoint), it holds no recognisable state
            dict (the message names the keys found), or the requested EMA / non-EMA weights are absent.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; pass the checkpoint file in it")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == SAFETENSORS_SUFFIX:
        if ema:
            raise CheckpointError(f"{path}: ema=True, but a safetensors file holds a single, non-EMA state dict")
        return _load_safetensors(path)
    return _find_state_dict(load_torch_file(path), ema, path)


def _load_safetensors(path: Path) -> StateDict:
    try:
        return safetensors.torch.load_file(path)
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ...: all mean "unreadable"
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def load_torch_file(path: Path) -> object:
    """torch.load on CPU, weights only; memory-mapped when the file is in the zip format (mmap needs it)."""
    mmap = zipfile.is_zipfile(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            if not str(exc).startswith("Weights only load failed"):
                raise
            # Some released .pt files pickle non-tensor objects (training configs, optimizer-side state) beside the
            # weights, which the weights-only unpickler refuses. Unpickling them runs code from the file: load only
            # checkpoints you trust.
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except ImportError as exc:
        raise CheckpointError(
            f"{path}: pickles objects of the module {exc.name!r}, which is not installed; install it or re-save "
            f"the generator's state dict alone"
        ) from exc
    except Exception as exc:  # corrupt bytes surface as RuntimeError, EOFError, KeyError, UnpicklingError, ...
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(value, Tensor) for value in obj.values())


def _find_state_dict(obj: object, ema: bool | None, path: Path) -> StateDict:
    """The generator's state dict inside a loaded checkpoint: itself, or under generator(_ema) / state_dict / model."""
    trail: list[str] = []
    picked_ema = False
    while not _is_state_dict(obj):
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}{_trail(trail)}: holds a {type(obj).__name__}, not a dict of tensors")
        key = _pick_generator(obj, ema, path, trail) or next((k for k in _NESTING_KEYS if k in obj), None)
        if key is None:
            raise CheckpointError(
                f"{path}{_trail(trail)}: no generator state dict found; expected a dict of tensors or one of "
                f"{[_EMA_KEY, _GENERATOR_KEY, *_NESTING_KEYS]}, found keys {_some_keys(obj)}"
            )
        picked_ema |= key == _EMA_KEY
        trail.append(key)
        obj = obj[key]
    if ema and not picked_ema:
        raise CheckpointError(f"{path}: ema=True, but the checkpoint has no {_EMA_KEY!r} entry")
    return dict(obj)


def _pick_generator(obj: Mapping, ema: bool | None, path: Path, trail: list[str]) -> str | None:
    """`generator_ema` or `generator` as `ema` asks, None if the dict has neither."""
    if _EMA_KEY not in obj and _GENERATOR_KEY not in obj:
        return None
    wanted = {None: _EMA_KEY if _EMA_KEY in obj else _GENERATOR_KEY, True: _EMA_KEY, False: _GENERATOR_KEY}[ema]
    if wanted not in obj:
        raise CheckpointError(f"{path}{_trail(trail)}: ema={ema} asks for {wanted!r}; found keys {_some_keys(obj)}")
    return wanted


def _trail(trail: list[str]) -> str:
    return "".join(f"[{key!r}]" for key in trail)


def _some_keys(obj: Mapping, limit: int = 16) -> str:
    """The dict's keys for an error message; a long list (a stray parameter dict) is cut to its first `limit`."""
    keys = sorted(map(str, obj))
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


# ---------------------------------------------------------------------------------------------------------------------
# Any layout -> ours


def normalize_keys(state: Mapping[str, Tensor], *, source: str = "state dict") -> StateDict:
    """Renames a state dict of any accepted layout to `CausalWanDiT`'s (original Wan) key names.

    Strips wrapper segments (`_fsdp_wrapped_module.`, `_orig_mod.`, ... anywhere in a key; `model.`, `module.` in front)
    and, if the keys are in diffusers naming, maps them to Wan's. Keys it does not know pass through unchanged, for
    `check_state_dict` to report. Tensors are not copied.

    Raises:
        CheckpointError: two keys map to the same name (e.g. a file holding both `model.x` and `x`).
    """
    renamed: StateDict = {}
    origin: dict[str, str] = {}
    keys = {key: _strip_wrappers(key) for key in state}
    from_diffusers = _is_diffusers(keys.values())
    for key, stripped in keys.items():
        name = _from_diffusers(stripped) if from_diffusers else stripped
        if name in renamed:
            raise CheckpointError(f"{source}: keys {origin[name]!r} and {key!r} both map to {name!r}")
        renamed[name], origin[name] = state[key], key
    return renamed


def _strip_wrappers(key: str) -> str:
    parts = [part for part in key.split(".") if part not in _WRAPPER_SEGMENTS]
    while len(parts) > 1 and parts[0] in _WRAPPER_PREFIXES:
        parts.pop(0)
    return ".".join(parts)


def _is_diffusers(keys: Iterable[str]) -> bool:
    return any(key.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in key for key in keys)


def _from_diffusers(key: str) -> str:
    block = _BLOCK_KEY.fullmatch(key)
    if block:
        return f"{block.group(1)}.{_rename(block.group(2), _DIFFUSERS_BLOCK)}"
    return _rename(key, _DIFFUSERS_TOP_LEVEL)


def _rename(key: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return key


# ---------------------------------------------------------------------------------------------------------------------
# Weights -> config, and the check


def infer_config(state: Mapping[str, Tensor], *, source: str = "state dict") -> DiTConfig:
    """The DiTConfig that normalized weights were trained with, read from their shapes.

    Widths, layer count, patch size and channels come from the shapes; the head count, which no shape shows, from the
    preset of the same width (1536 -> 12 heads, 5120 -> 40, ...), as do text_len, eps and attention.

    Raises:
        CheckpointError: a key the shapes are read from is missing or has an unexpected rank.
        ConfigError: no preset (or more than one, disagreeing) has this width: pass the config explicitly.
    """
    missing = [key for key in _SHAPE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{source}: cannot infer the DiT config without {missing}; pass config= explicitly")
    patch, text, time, ffn, head = (state[key].shape for key in _SHAPE_KEYS)
    if len(patch) != 5 or any(len(shape) != 2 for shape in (text, time, ffn, head)):
        shapes = ", ".join(f"{key} {_shape(state[key])}" for key in _SHAPE_KEYS)
        raise CheckpointError(f"{source}: cannot infer the DiT config from these shapes: {shapes}")
    dim, in_dim, *patch_size = patch
    action = state.get("action_embedding.weight")
    return _preset_of_width(dim, source).replace(
        dim=dim,
        ffn_dim=ffn[0],
        num_layers=1 + max(int(match.group(1)) for key in state if (match := _BLOCK_INDEX.match(key))),
        freq_dim=time[1],
        text_dim=text[1],
        in_dim=in_dim,
        out_dim=head[0] // math.prod(patch_size),
        patch_size=tuple(patch_size),
        qk_norm="blocks.0.self_attn.norm_q.weight" in state,
        cross_attn_norm="blocks.0.norm3.weight" in state,
        num_actions=0 if action is None else action.shape[0],
    )


def _preset_of_width(dim: int, source: str) -> DiTConfig:
    heads = {config.num_heads: config for config in PRESETS.values() if config.dim == dim}
    if len(heads) != 1:
        known = sorted({(config.dim, config.num_heads) for config in PRESETS.values()})
        raise ConfigError(
            f"{source}: cannot tell the head count of a DiT of width {dim} (known width/heads: {known}); pass config="
        )
    return next(iter(heads.values()))


def check_fits(
    model: nn.Module,
    state: Mapping[str, Tensor],
    source: str,
    what: str,
    *,
    optional: Collection[str] = (),
    hint: str = "",
) -> None:
    """Checks that `state` fits `model` exactly (`model` may live on the meta device): the one key check every
    loader (DiT, VAE, TAEHV, umT5) shares. Keys in `optional` may be missing.

    Raises:
        CheckpointError: naming `source` and `what`, listing every missing, unexpected and mis-shaped key with shapes.
    """
    expected = model.state_dict()
    missing = [
        f"  missing     {key} {_shape(tensor)}" for key, tensor in expected.items() if key not in state and key not in optional
    ]
    unexpected = [f"  unexpected  {key} {_shape(tensor)}" for key, tensor in state.items() if key not in expected]
    misshaped = [
        f"  mis-shaped  {key}: checkpoint {_shape(tensor)}, model {_shape(expected[key])}"
        for key, tensor in state.items()
        if key in expected and tensor.shape != expected[key].shape
    ]
    problems = missing + unexpected + misshaped
    if problems:
        raise CheckpointError(
            f"{source}: does not fit the {what} ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(misshaped)} mis-shaped):\n" + "\n".join(problems) + (f"\n  ({hint})" if hint else "")
        )


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Checks that `state` (normalized keys) fits the DiT `model` exactly.

    `action_embedding.weight` may be missing from a model with actions: released checkpoints have none, and
    `load_dit` starts the table at zero, which leaves the pretrained model's output unchanged.

    Raises:
        CheckpointError: naming `source`, listing every missing, unexpected and mis-shaped key with its shapes.
    """
    action = "action_embedding.weight"
    hint = "the checkpoint has an action embedding: set config.num_actions" if action in state else ""
    check_fits(model, state, source, "DiT", optional={action}, hint=hint if action not in model.state_dict() else "")


def _shape(tensor: Tensor) -> str:
    return str(list(tensor.shape))


# ---------------------------------------------------------------------------------------------------------------------
# Load and save


def load_dit(
    path: str | os.PathLike,
    config: DiTConfig | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    ema: bool | None = None,
) -> CausalWanDiT:
    """A `CausalWanDiT` with the weights of a checkpoint in any accepted layout, in `dtype` on `device`.

    `config` None takes the config `save_dit` stored in the file, or else infers it from the weights (`infer_config`).
    `ema` as in `read_checkpoint`. The model is built on the meta device and takes the loaded tensors themselves
    (`assign=True`), so the weights are never allocated twice.

    Raises:
        CheckpointError: the file is missing, unreadable, holds no generator state dict, or does not fit the config
            (one error listing every missing, unexpected and mis-shaped key).
        ConfigError: config is None and cannot be inferred.
    """
    path = Path(path)
    state = normalize_keys(read_checkpoint(path, ema=ema), source=str(path))
    if config is None:
        config = _stored_config(path) or infer_config(state, source=str(path))
    with torch.device("meta"):
        model = CausalWanDiT(config)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=False, assign=True)  # checked above; only the action table may be absent
    if config.num_actions and "action_embedding.weight" not in state:
        model.action_embedding.weight = nn.Parameter(torch.zeros(config.num_actions, config.dim))
    return model.to(device=device, dtype=dtype)


def save_dit(model: CausalWanDiT, path: str | os.PathLike) -> None:
    """Writes the model's weights (original Wan key names) to a `.safetensors` file, its config in the metadata.

    The file is written beside `path` and renamed into place, so a crash never leaves a truncated checkpoint.

    Raises:
        CheckpointError: `path` does not end in `.safetensors`.
    """
    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise CheckpointError(f"{path}: save_dit writes safetensors; name the file *{SAFETENSORS_SUFFIX}")
    state = {key: tensor.detach().contiguous() for key, tensor in model.state_dict().items()}
    partial = path.with_name(path.name + ".partial")
    metadata = {"format": "pt", CONFIG_METADATA_KEY: config_to_json(model.config)}
    safetensors.torch.save_file(state, partial, metadata=metadata)
    os.replace(partial, path)


def config_to_json(config: DiTConfig) -> str:
    """The config's fields as a JSON object; `attention` as its value string."""
    fields = dataclasses.asdict(config)
    fields["attention"] = config.attention.value
    return json.dumps(fields, sort_keys=True)


def config_from_json(text: str, *, source: str = "config") -> DiTConfig:
    """Inverse of `config_to_json`.

    Raises:
        CheckpointError: not a JSON object of DiTConfig fields.
        ConfigError: a field value out of range.
    """
    try:
        fields = json.loads(text)
        fields["attention"] = AttentionKind(fields["attention"])
        fields["patch_size"] = tuple(fields["patch_size"])
        return DiTConfig(**fields)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as exc:  # bad JSON, a missing or unknown field, a bad attention kind
        raise CheckpointError(f"{source}: stored DiT config is malformed ({exc}): {text!r}") from exc


def _stored_config(path: Path) -> DiTConfig | None:
    """The config `save_dit` stored in a safetensors file's metadata; None for other files."""
    if path.suffix != SAFETENSORS_SUFFIX:
        return None
    with safetensors.safe_open(path, framework="pt") as file:
        metadata = file.metadata() or {}
    text = metadata.get(CONFIG_METADATA_KEY)
    return None if text is None else config_from_json(text, source=str(path))
