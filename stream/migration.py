"""Moving a layer between pipeline stages while streaming: its weights and every lane's cache for it travel together.

A stage gives away the first or last layer of its range and its neighbour takes it, so both ranges stay contiguous.
What moves is one flat byte blob: the block's state dict (in the module's own key order) followed by each lane's
per-layer memory buffers (`Memory.per_layer_buffers`: KV keys/values/sink keys, or the linear state). The taker
knows every shape from its own block and memories, so the blob needs no header. The memories' bookkeeping (frames,
positions, the plan of frames in flight) is the same on every stage and stays as it is, so a layer can move between
any two packets, even inside a chunk, and the stream's numbers do not change.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from framecast.models.dit import Block
from framecast.models.errors import ConfigError
from framecast.stream.stage import LayerSlice, Stage


def _padded(nbytes: int) -> int:
    return -(-nbytes // 8) * 8


def pack(tensors: Sequence[Tensor]) -> Tensor:
    """Tensors -> one uint8 blob (each part padded to 8 bytes so that it can be viewed in place again)."""
    sizes = [_padded(t.numel() * t.element_size()) for t in tensors]
    blob = torch.zeros(sum(sizes), dtype=torch.uint8, device=tensors[0].device if tensors else "cpu")
    offset = 0
    for tensor, size in zip(tensors, sizes):
        flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
        blob[offset : offset + flat.numel()].copy_(flat)
        offset += size
    return blob


def unpack(blob: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """The inverse of pack, given tensors of the same shapes and dtypes."""
    expected = sum(_padded(t.numel() * t.element_size()) for t in like)
    if expected != blob.numel():
        raise ConfigError(f"layer blob of {blob.numel()} bytes; this stage expects {expected}")
    out, offset = [], 0
    for tensor in like:
        nbytes = tensor.numel() * tensor.element_size()
        out.append(blob[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape))
        offset += _padded(nbytes)
    return out


def _buffers(memory: LayerSlice) -> list[str]:
    return [name for name in type(memory.inner).per_layer_buffers if getattr(memory.inner, name) is not None]


def _resized(memory: LayerSlice, layers: range, added: dict[str, Tensor] | None = None) -> LayerSlice:
    """The same memory for `layers` (one more or one fewer than now): bookkeeping shared, per-layer buffers rebuilt."""
    inner = copy.copy(memory.inner)
    old = range(memory.first, memory.first + getattr(memory.inner, _buffers(memory)[0]).shape[0])
    for name in _buffers(memory):
        buffer = getattr(memory.inner, name)
        parts = [buffer[layer - old.start] if layer in old else added[name] for layer in layers]
        setattr(inner, name, torch.stack(parts))
    return LayerSlice(inner, layers.start)


def give_layer(stage: Stage, layer: int) -> Tensor:
    """Remove `layer` (the first or last of the stage's range) from `stage`; return what the neighbour needs."""
    layers = stage.spec.layers
    if len(layers) < 2 or layer not in (layers.start, layers.stop - 1):
        raise ConfigError(f"stage {stage.spec.index} (layers {layers}) cannot give layer {layer}: only an end of a range of 2+")
    block = stage.dit.blocks[layer]
    parts = list(block.state_dict().values())
    for lane in stage.lanes:
        parts += [getattr(lane.memory.inner, name)[layer - lane.memory.first] for name in _buffers(lane.memory)]
    blob = pack(parts)
    kept = range(layers.start + 1, layers.stop) if layer == layers.start else range(layers.start, layers.stop - 1)
    for lane in stage.lanes:
        lane.memory = _resized(lane.memory, kept)
    stage.dit.blocks[layer] = nn.Module()
    stage.spec = replace(stage.spec, layers=kept)
    return blob


def take_layer(stage: Stage, layer: int, blob: Tensor) -> None:
    """Add `layer` (adjacent to the stage's range) to `stage` from a neighbour's `give_layer` blob."""
    layers = stage.spec.layers
    if layer not in (layers.start - 1, layers.stop):
        raise ConfigError(f"stage {stage.spec.index} (layers {layers}) cannot take layer {layer}: not adjacent")
    dit = stage.dit
    block = Block(dit.config, layer).to(device=dit.device, dtype=dit.dtype).eval().requires_grad_(False)
    like = list(block.state_dict().values())
    per_lane = []
    for lane in stage.lanes:
        per_lane.append([(name, getattr(lane.memory.inner, name)[0]) for name in _buffers(lane.memory)])
    flat_like = like + [buffer for lane in per_lane for _, buffer in lane]
    parts = unpack(blob.to(dit.device), flat_like)
    block.load_state_dict(dict(zip(block.state_dict().keys(), parts[: len(like)])))
    dit.blocks[layer] = block
    grown = range(min(layer, layers.start), max(layer + 1, layers.stop))
    offset = len(like)
    for lane, names in zip(stage.lanes, per_lane):
        added = {name: parts[offset + index] for index, (name, _) in enumerate(names)}
        offset += len(names)
        lane.memory = _resized(lane.memory, grown, added)
        if lane.projected is not None:
            keys, values = list(lane.text.keys), list(lane.text.values)
            keys[layer], values[layer] = block.cross_attn.text_keys_values(lane.projected)
            lane.text = replace(lane.text, keys=tuple(keys), values=tuple(values))
    stage.spec = replace(stage.spec, layers=grown)
