"""Which layers each pipeline stage runs: contiguous ranges, balanced from measured per-layer times.

A pipeline runs at the pace of its slowest stage, so the split minimises the largest stage time. The first stage
also pays for the embeddings and the last for the head, so an even split of identical blocks is not balanced.
`measure_layer_seconds` times the parts of the real model on the stream's shapes with a full cache;
`balanced_split` is the exact minimax contiguous partition (dynamic programming, tiny for <= 100 layers).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from framecast.models.dit import CausalWanDiT
from framecast.models.errors import ConfigError
from framecast.stream.engine import EngineConfig, make_memory


@dataclass(frozen=True)
class LayerCosts:
    """Seconds per DiT call: embeddings (first stage), each block, head (last stage)."""

    embed: float
    blocks: tuple[float, ...]
    head: float

    def stage_seconds(self, split: Sequence[range]) -> tuple[float, ...]:
        times = [sum(self.blocks[layer] for layer in layers) for layers in split]
        times[0] += self.embed
        times[-1] += self.head
        return tuple(times)


def split_from_sizes(sizes: Sequence[int], num_layers: int) -> tuple[range, ...]:
    """Layer counts per stage -> ranges; the counts must be positive and add up to the model's layers."""
    if any(not isinstance(n, int) or n < 1 for n in sizes) or sum(sizes) != num_layers:
        raise ConfigError(f"layers per stage {list(sizes)} must be positive and add up to num_layers={num_layers}")
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return tuple(range(a, b) for a, b in zip(bounds, bounds[1:]))


def even_split(num_layers: int, stages: int) -> tuple[range, ...]:
    """As even as integers allow; earlier stages get the extra layers."""
    if not 1 <= stages <= num_layers:
        raise ConfigError(f"stages={stages} must be in [1, num_layers={num_layers}]")
    base, extra = divmod(num_layers, stages)
    return split_from_sizes([base + (index < extra) for index in range(stages)], num_layers)


def balanced_split(costs: LayerCosts, stages: int) -> tuple[range, ...]:
    """The contiguous split of the blocks into `stages` ranges whose largest stage time is smallest."""
    layers = len(costs.blocks)
    if not 1 <= stages <= layers:
        raise ConfigError(f"stages={stages} must be in [1, num_layers={layers}]")
    prefix = [0.0]
    for seconds in costs.blocks:
        prefix.append(prefix[-1] + seconds)

    def cost(stage: int, start: int, stop: int) -> float:
        extra = (costs.embed if stage == 0 else 0.0) + (costs.head if stage == stages - 1 else 0.0)
        return prefix[stop] - prefix[start] + extra

    # best[s][i]: smallest max stage time of stages 0..s-1 covering blocks [0, i); cut[s][i] its last start
    inf = float("inf")
    best = [[inf] * (layers + 1) for _ in range(stages + 1)]
    cut = [[0] * (layers + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for stage in range(1, stages + 1):
        for stop in range(stage, layers - (stages - stage) + 1):
            for start in range(stage - 1, stop):
                value = max(best[stage - 1][start], cost(stage - 1, start, stop))
                if value < best[stage][stop]:
                    best[stage][stop], cut[stage][stop] = value, start
    bounds, stop = [layers], layers
    for stage in range(stages, 0, -1):
        stop = cut[stage][stop]
        bounds.append(stop)
    bounds.reverse()
    return tuple(range(a, b) for a, b in zip(bounds, bounds[1:]))


@torch.inference_mode()
def measure_layer_seconds(dit: CausalWanDiT, config: EngineConfig, repeats: int = 5) -> LayerCosts:
    """Median seconds of each part of one denoising call on the stream's shapes, with the cache full."""
    memory = make_memory(dit, config)
    shape = (config.batch, config.chunk_frames, dit.config.in_dim, config.latent_height, config.latent_width)
    latents = torch.randn(shape, dtype=dit.dtype, device=dit.device)
    timesteps = torch.full(shape[:2], 500.0, device=dit.device)
    text = dit.encode_text(torch.randn(config.batch, dit.config.text_len, dit.config.text_dim, device=dit.device))
    for _ in range(config.window_frames // config.chunk_frames + 1):  # fill the window
        memory.begin_chunk(config.chunk_frames)
        dit(latents, timesteps, text, memory)
        memory.commit()
    sync = torch.cuda.synchronize if dit.device.type == "cuda" else (lambda: None)
    samples: dict[str, list[float]] = {}

    def timed(name: str, fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        samples.setdefault(name, []).append(time.perf_counter() - start)
        return out

    for _ in range(repeats):
        memory.begin_chunk(config.chunk_frames)
        x, grid, time_, time6 = timed("embed", lambda: dit.embed(latents, timesteps))
        angles = dit.rope.angles(memory.rope_positions(), grid, x.dtype, x.device)
        for layer in range(dit.config.num_layers):
            x = timed(layer, lambda: dit.run_blocks(x, time6, angles, text, memory, range(layer, layer + 1)))
        timed("head", lambda: dit.finish(x, time_, grid))
        memory.reset()  # keep the next repeat's chunk on the same frames
        for _ in range(config.window_frames // config.chunk_frames + 1):
            memory.begin_chunk(config.chunk_frames)
            memory.commit()
    median = {name: statistics.median(values) for name, values in samples.items()}
    return LayerCosts(median["embed"], tuple(median[layer] for layer in range(dit.config.num_layers)), median["head"])


def rebalance_move(busy: Sequence[float], split: Sequence[range], tolerance: float = 0.15) -> tuple[int, int] | None:
    """(layer, destination stage) of the one-layer move between neighbours that lowers the slowest stage's measured
    time the most, or None when no move lowers it by more than `tolerance` (a fraction of it).

    `busy`: each stage's compute seconds over the same recent window. A stage's seconds per layer are estimated as its
    seconds / its layer count (embeddings and head included: they do not move, so this slightly overrates the layers
    of the end stages, which the tolerance absorbs)."""
    if len(busy) != len(split):
        raise ConfigError(f"{len(busy)} stage times for {len(split)} stages")
    slowest = max(range(len(busy)), key=lambda stage: busy[stage])
    if len(split[slowest]) < 2:
        return None
    per_layer = busy[slowest] / len(split[slowest])
    best: tuple[float, int, int] | None = None
    for neighbour in (slowest - 1, slowest + 1):
        if not 0 <= neighbour < len(busy):
            continue
        times = list(busy)
        times[slowest] -= per_layer
        times[neighbour] += per_layer
        layer = split[slowest].start if neighbour < slowest else split[slowest].stop - 1
        if best is None or max(times) < best[0]:
            best = (max(times), layer, neighbour)
    if best is None or best[0] > busy[slowest] * (1 - tolerance):
        return None
    return best[1], best[2]


def move_layer(split: Sequence[range], layer: int, destination: int) -> tuple[range, ...]:
    """The split after `layer` (an end of its stage's range) moves to the neighbouring stage `destination`."""
    source = next((index for index, layers in enumerate(split) if layer in layers), None)
    layers = split[source] if source is not None else range(0)
    if source is None or abs(destination - source) != 1 or len(layers) < 2 or layer not in (layers.start, layers.stop - 1):
        raise ConfigError(f"layer {layer} cannot move to stage {destination} from split {[(r.start, r.stop) for r in split]}")
    out = list(split)
    out[source] = range(layers.start + 1, layers.stop) if layer == layers.start else range(layers.start, layers.stop - 1)
    target = split[destination]
    out[destination] = range(min(target.start, layer), max(target.stop, layer + 1))
    return tuple(out)
