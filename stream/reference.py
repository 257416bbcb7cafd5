"""The cache-free reference stream: every model call re-runs the whole history under the block-causal mask.

Slow (quadratic in the stream length) and obviously correct, nanoGPT-style: the cached engine must produce the same
chunks for the same noise. It draws noise in the engine's order (chunk noise, one draw per re-noise, one for a noisy
context pass) so one seed drives both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from framecast.kernels.attention import attention
from framecast.models.config import AttentionKind
from framecast.models.dit import CausalWanDiT
from framecast.models.memory import BlockCausal
from framecast.stream.engine import CacheKind, EngineConfig
from framecast.stream.noise import NoiseSource
from framecast.stream.sampler import FlowMatchSchedule, renoise, to_clean


@torch.inference_mode()
def reference_stream(
    dit: CausalWanDiT,
    config: EngineConfig,
    prompt: Tensor,
    noise: NoiseSource,
    num_chunks: int,
    actions: Tensor | None = None,
) -> Tensor:
    """Clean latents [B, num_chunks * chunk_frames, C, H, W]; actions [B, num_chunks * chunk_frames] if the model
    takes them. One prompt for the whole stream (prompt switches are the cached engine's business)."""
    schedule = FlowMatchSchedule(config.shift)
    steps = schedule.steps(config.denoising_steps, config.warp_steps)
    n, batch = config.chunk_frames, config.batch
    shape = (batch, n, dit.config.in_dim, config.latent_height, config.latent_width)
    text = dit.encode_text((prompt if prompt.ndim == 3 else prompt.unsqueeze(0)).expand(batch, -1, -1))
    context: list[Tensor] = []  # what the context pass saw for each committed chunk
    clean: list[Tensor] = []
    for chunk in range(num_chunks):
        first = chunk * n
        memory = _chunk_mask(dit, config, first + n)
        frame_actions = actions[:, : first + n] if actions is not None else None
        x = noise.draw(shape, dit.dtype, dit.device)
        for step in steps:
            timesteps = torch.cat(
                [torch.full((batch, first), float(config.context_noise)), torch.full((batch, n), step.timestep)], dim=1
            )
            flow = dit(torch.cat([*context, x], dim=1), timesteps, text, memory, frame_actions)[:, first:]
            x0 = to_clean(x, flow, step.sigma)
            if not step.is_last:
                x = renoise(x0, noise.draw(shape, dit.dtype, dit.device), step.next_sigma)
        clean.append(x0)
        if config.context_noise:
            sigma = schedule.sigma_at(float(config.context_noise))
            context.append(renoise(x0, noise.draw(shape, dit.dtype, dit.device), sigma))
        else:
            context.append(x0)
    return torch.cat(clean, dim=1)


def _chunk_mask(dit: CausalWanDiT, config: EngineConfig, num_frames: int) -> BlockCausal:
    """The chunk sampler's attention over a whole sequence of `num_frames`: block-causal by chunk, within the
    rolling window (sinks included) where the engine's cache rolls."""
    windowed = dit.config.attention is AttentionKind.SOFTMAX and config.cache is CacheKind.ROLLING
    return BlockCausal(
        dit.config, num_frames=num_frames, chunk_frames=config.chunk_frames,
        tokens_per_frame=dit.config.tokens_per_frame(config.latent_height, config.latent_width),
        window_frames=config.window_frames if windowed else None,
        sink_frames=config.sink_frames if windowed else 0, device=dit.device,
    )


class _Masked:
    """One whole sequence under an explicit frame-level mask and explicit RoPE positions (no memory)."""

    committed_frames = 0
    nbytes = 0

    def __init__(self, positions: list[int], visible: Tensor, tokens_per_frame: int, device: torch.device) -> None:
        self.positions = tuple(positions)
        self.mask = visible.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1).to(device)

    def rope_positions(self) -> tuple[int, ...]:
        return self.positions

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention(q, k, v, mask=self.mask)


@torch.inference_mode()
def reference_rolling_stream(
    dit: CausalWanDiT,
    config: EngineConfig,
    prompt: Tensor,
    noise: NoiseSource,
    num_chunks: int,
    actions: Tensor | None = None,
) -> Tensor:
    """The rolling-window sampler (stream/rolling.py) without a cache: clean latents [B, num_chunks * chunk_frames,
    C, H, W]. One prompt; softmax attention; the rolling cache; the context pass without sinks (the reference's).

    Every joint pass is one DiT call over the whole history: the context latents of every emitted frame (each chunk
    attends, block-causally, to the newest `window_frames` frames up to its end: that is how its keys were made),
    then, with `sinks_follow_window`, a copy of the sink frames at the positions right before the oldest cached
    frame the window sees (block-causal among themselves, so their keys are the sinks' keys moved), then the window
    (each chunk at its own step) attending to the sinks, the newest `window_frames - sink_frames - window` emitted
    frames, and the whole window without a mask. Noise is drawn in the sampler's order.
    """
    schedule = FlowMatchSchedule(config.shift)
    steps = schedule.steps(config.denoising_steps, config.warp_steps)
    n, batch, rolling = config.chunk_frames, config.batch, config.rolling_chunks
    per_slide = len(steps) // rolling
    shape = (batch, n, dit.config.in_dim, config.latent_height, config.latent_width)
    text = dit.encode_text((prompt if prompt.ndim == 3 else prompt.unsqueeze(0)).expand(batch, -1, -1))
    tokens = dit.config.tokens_per_frame(config.latent_height, config.latent_width)
    window_frames, sink = config.window_frames, config.sink_frames
    past = window_frames - sink - rolling * n
    context: list[Tensor] = []  # what each emitted chunk's context pass saw
    clean: list[Tensor] = []
    in_flight: list[list] = []  # [chunk index, latents, steps done]
    admitted = 0

    def joint_pass() -> None:
        committed = len(context) * n
        sinks = min(sink, committed)
        oldest_past = min(max(sink, committed - past), committed)
        follow = config.sinks_follow_window and sinks > 0
        copies = sinks if follow else 0
        window = len(in_flight) * n
        total = committed + copies + window
        visible = torch.zeros(total, total, dtype=torch.bool)
        for frame in range(committed):  # emitted frames, as their context pass saw the ones before them
            end = (frame // n + 1) * n
            visible[frame, max(0, end - window_frames) : end] = True
        for frame in range(copies):  # the sink copies: block-causal among themselves
            visible[committed + frame, committed : committed + (frame // n + 1) * n] = True
        rows = slice(committed + copies, total)
        visible[rows, committed : committed + copies] = True
        if not follow:
            visible[rows, :sinks] = True
        visible[rows, oldest_past:committed] = True
        visible[rows, committed + copies :] = True
        anchor = oldest_past - sinks
        positions = [*range(committed), *range(anchor, anchor + copies), *range(committed, committed + window)]
        latents = torch.cat([*context, *context[: copies // n], *[chunk[1] for chunk in in_flight]], dim=1)
        timesteps = torch.cat(
            [torch.full((batch, committed + copies), float(config.context_noise))]
            + [torch.full((batch, n), steps[chunk[2]].timestep) for chunk in in_flight],
            dim=1,
        )
        frame_actions = None
        if actions is not None:
            first = in_flight[0][0] * n
            window_actions = actions[:, first : first + window]
            frame_actions = torch.cat([actions[:, :committed], actions[:, :copies], window_actions], dim=1)
        memory = _Masked(positions, visible, tokens, dit.device)
        flow = dit(latents, timesteps, text, memory, frame_actions)[:, committed + copies :]
        for position, chunk in enumerate(in_flight):
            step = steps[chunk[2]]
            x0 = to_clean(chunk[1], flow[:, position * n : (position + 1) * n], step.sigma)
            chunk[2] += 1
            chunk[1] = x0 if step.is_last else renoise(x0, noise.draw(shape, dit.dtype, dit.device), step.next_sigma)

    while len(clean) < num_chunks:
        in_flight.append([admitted, noise.draw(shape, dit.dtype, dit.device), 0])
        admitted += 1
        for _ in range(per_slide):
            joint_pass()
        if in_flight[0][2] == len(steps):
            x0 = in_flight.pop(0)[1]
            clean.append(x0)
            if config.context_noise:
                sigma = schedule.sigma_at(float(config.context_noise))
                context.append(renoise(x0, noise.draw(shape, dit.dtype, dit.device), sigma))
            else:
                context.append(x0)
    return torch.cat(clean, dim=1)


@torch.inference_mode()
def reference_stream_batch(
    dit: CausalWanDiT,
    config: EngineConfig,
    prompt: Tensor,
    noise: NoiseSource,
    num_chunks: int,
    actions: Tensor | None = None,
) -> Tensor:
    """The stream-batch sampler (stream/stream_batch.py) without a cache: chunk c at step i is one call over the
    step-i inputs of chunks 0..c under the block-causal mask (its slot's sequence), all frames at step i's timestep.
    Noise in the program's order: per tick, the entering chunk's noise, then one re-noise draw per slot 1..S-1."""
    steps = FlowMatchSchedule(config.shift).steps(config.denoising_steps, config.warp_steps)
    n, batch, slots = config.chunk_frames, config.batch, len(steps)
    shape = (batch, n, dit.config.in_dim, config.latent_height, config.latent_width)
    text = dit.encode_text((prompt if prompt.ndim == 3 else prompt.unsqueeze(0)).expand(batch, -1, -1))
    inputs: list[list[Tensor]] = [[] for _ in range(slots)]  # inputs[i][c]: chunk c's input at step i
    flows: list[list[Tensor]] = [[] for _ in range(slots)]

    def call(slot: int, chunk: int) -> Tensor:
        first = chunk * n
        memory = _chunk_mask(dit, config, first + n)
        timesteps = torch.full((batch, first + n), steps[slot].timestep)
        frame_actions = actions[:, : first + n] if actions is not None else None
        return dit(torch.cat(inputs[slot][: chunk + 1], dim=1), timesteps, text, memory, frame_actions)[:, first:]

    for tick in range(num_chunks + slots - 1):
        for slot in range(slots):
            chunk = tick - slot
            if chunk < 0:
                continue
            if chunk >= num_chunks:  # a chunk that enters after the last one asked for: only its draws matter
                noise.draw(shape, dit.dtype, dit.device)
                continue
            if slot == 0:
                inputs[0].append(noise.draw(shape, dit.dtype, dit.device))
            else:
                previous = steps[slot - 1]
                x0 = to_clean(inputs[slot - 1][chunk], flows[slot - 1][chunk], previous.sigma)
                inputs[slot].append(renoise(x0, noise.draw(shape, dit.dtype, dit.device), previous.next_sigma))
            flows[slot].append(call(slot, chunk))
    last = steps[-1]
    return torch.cat([to_clean(inputs[-1][c], flows[-1][c], last.sigma) for c in range(num_chunks)], dim=1)
