"""One pipeline stage's compute: a contiguous range of DiT layers, and every lane's memory and prompt for them.

The first stage also embeds (prompt text, patches, time), the last also runs the head. A stage knows nothing of
transport: `Stage.run(packet)` takes what the previous stage (or the orchestrator) sent and returns what goes on.
Each stage keeps, per lane, a memory policy built for its own layers only (`LayerSlice` maps absolute layer indices
onto it), so the KV cache of a layer lives where the layer runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from time import perf_counter
from typing import NamedTuple

import torch
from torch import Tensor, nn

from framecast.models.config import DiTConfig
from framecast.models.dit import CausalWanDiT, TextContext
from framecast.models.errors import ConfigError
from framecast.models.memory import Memory
from framecast.stream.engine import EngineConfig, make_memory
from framecast.stream.wire import Begin, Packet


class _ModelShape(NamedTuple):
    """What make_memory reads of a model: its config, dtype and device."""

    config: DiTConfig
    dtype: torch.dtype
    device: torch.device


class LayerSlice:
    """A memory policy for layers [first, first + n) of a model: attend() takes absolute layer indices."""

    def __init__(self, memory: Memory, first: int) -> None:
        self.inner, self.first = memory, first

    @property
    def committed_frames(self) -> int:
        return self.inner.committed_frames

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    def begin_chunk(self, num_frames: int) -> None:
        self.inner.begin_chunk(num_frames)

    def begin_recache(self) -> range:
        return self.inner.begin_recache()

    def rope_positions(self) -> tuple[int, ...]:
        return self.inner.rope_positions()

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.inner.attend(layer - self.first, q, k, v)

    def commit(self) -> None:
        self.inner.commit()

    def reset(self) -> None:
        self.inner.reset()


def layer_memory(dit_config: DiTConfig, config: EngineConfig, layers: range, dtype: torch.dtype, device) -> LayerSlice:
    """The memory policy `config` calls for, holding only `layers`."""
    shape = _ModelShape(dit_config.replace(num_layers=len(layers)), dtype, torch.device(device))
    return LayerSlice(make_memory(shape, config), layers.start)


def ledger_memory(dit_config: DiTConfig, config: EngineConfig) -> Memory:
    """The same memory policy with one layer, one token per frame and batch 1: it tracks frames, positions and
    recache ranges exactly as the stages' memories do, for the orchestrator, at almost no cost."""
    _, patch_h, patch_w = dit_config.patch_size
    small = replace(config, latent_height=patch_h, latent_width=patch_w, batch=1)
    return make_memory(_ModelShape(dit_config.replace(num_layers=1), torch.float32, torch.device("cpu")), small)


@dataclass(frozen=True)
class StageSpec:
    """Stage `index` of `count` runs `layers` (a contiguous range of the model's layers)."""

    index: int
    count: int
    layers: range

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1


def stage_specs(split: tuple[range, ...]) -> tuple[StageSpec, ...]:
    return tuple(StageSpec(index, len(split), layers) for index, layers in enumerate(split))


class _LaneState:
    def __init__(self, memory: LayerSlice) -> None:
        self.memory = memory
        self.text: TextContext | None = None
        self.projected: Tensor | None = None  # the projected prompt, for the K/V of a layer that moves here


class Stage:
    """Runs `spec.layers` of `dit` for any lane. With `own_model`, blocks outside the range are dropped from `dit` to
    free their memory (a stage process); stages sharing one model in a process keep them."""

    def __init__(self, dit: CausalWanDiT, spec: StageSpec, config: EngineConfig, lanes: int, own_model: bool = True) -> None:
        num_layers = dit.config.num_layers
        if not (0 <= spec.layers.start < spec.layers.stop <= num_layers and spec.layers.step == 1):
            raise ConfigError(f"stage layers {spec.layers} must be a non-empty contiguous range of [0, {num_layers})")
        for layer in range(num_layers):
            if own_model and layer not in spec.layers:
                dit.blocks[layer] = nn.Module()  # placeholder keeps indices; its weights are freed
        self.dit, self.spec, self.config = dit, spec, config
        _, patch_h, patch_w = dit.config.patch_size
        self.grid = (config.latent_height // patch_h, config.latent_width // patch_w)
        self.lanes = [
            _LaneState(layer_memory(dit.config, config, spec.layers, dit.dtype, dit.device)) for _ in range(lanes)
        ]
        self.busy_s = 0.0  # seconds spent in run(), reported downstream in every packet

    @torch.inference_mode()
    def run(self, packet: Packet) -> Packet:
        """Apply the packet's controls and memory operations, run this stage's share of the call, and return the
        packet for the next stage (from the last stage: tensors = (flow,) when an output was asked for)."""
        start = perf_counter()
        dit, spec, lane = self.dit, self.spec, self.lanes[packet.lane]
        if packet.reset:
            lane.memory.reset()
        text_out = None
        if packet.text is not None:
            text_out = dit.embed_text(packet.text) if spec.is_first else packet.text
            lane.text, lane.projected = dit.text_context(text_out, spec.layers), text_out
        if packet.begin is Begin.CHUNK:
            lane.memory.begin_chunk(packet.frames)
        elif packet.begin is Begin.RECACHE:
            lane.memory.begin_recache()
        tensors: tuple[Tensor, ...] = ()
        if packet.tensors:
            if lane.text is None:
                raise RuntimeError(f"lane {packet.lane} has no prompt yet: its first packet must carry one")
            if spec.is_first:
                latents, timesteps, *actions = packet.tensors
                x, grid, time, time6 = dit.embed(latents, timesteps, actions[0] if packet.actions else None)
            else:
                (x, time, time6), grid = packet.tensors, self.grid
            angles = dit.rope.angles(lane.memory.rope_positions(), grid, x.dtype, x.device)
            x = dit.run_blocks(x, time6, angles, lane.text, lane.memory, spec.layers)
            if not spec.is_last:
                tensors = (x, time, time6)
            elif packet.output:
                tensors = (dit.finish(x, time, grid),)
        if packet.commit:
            lane.memory.commit()
        if dit.device.type == "cuda":
            torch.cuda.synchronize(dit.device)  # busy time is compute time, not launch time
        self.busy_s += perf_counter() - start
        busy = list(packet.busy_us) + [0] * (spec.count - len(packet.busy_us))
        busy[spec.index] = round(self.busy_s * 1e6)
        return replace(packet, text=None if spec.is_last else text_out, tensors=tensors, actions=False, busy_us=tuple(busy))
