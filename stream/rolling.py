"""Rolling Forcing's sampler: a window of chunks at staggered noise levels, denoised jointly, one DiT call per step.

Read from TencentARC/RollingForcing (commit a1477d0): `pipeline/rolling_forcing_inference.py`
(`CausalInferencePipeline.inference_rolling_forcing`) and the KV-cache branch of `CausalWanSelfAttention.forward` in
`wan/modules/causal_model.py`. With S denoising steps the reference's window holds R = S chunks; here R is
`EngineConfig.rolling_chunks`, any divisor of S, and each slide of the window advances every chunk by g = S / R steps
(R = S is the reference; R = 1 with `context_sinks=True`, or without sinks, is the standard chunk sampler).

    window, front (oldest) to back:   chunk k-R+1   ...   chunk k-1   chunk k
    steps the chunk runs this slide:  last g steps  ...   steps g..2g-1   steps 0..g-1

One slide: a chunk of fresh noise enters at the back; g *joint passes*, each ONE DiT call over all R*chunk_frames
frames with per-frame timesteps (every chunk at its own step), after which every chunk's clean estimate
x0 = x - sigma * flow is re-noised to that chunk's next step (fresh noise, front to back), or kept if that was its
last step; then the front chunk has gone through every step: it is emitted, and a *context pass* (one more DiT call,
at `context_noise`) writes its keys/values into the cache. The first R - 1 slides only fill the window (warm-up: the
reference's first windows start at frame 0 and grow by a chunk each). Nothing of the joint pass is cached: the
reference writes the front chunk's noisy K/V into the cache during the joint pass, but the context pass overwrites
that slot before anything reads it, so only the clean K/V of emitted chunks are ever attended.

Attention (the reference's numbers: window 21 frames, sink 3, R = 5 chunks of 3):
* joint pass: the window's frames attend to each other with NO mask (the reference calls `attention(q, k, v)` with
  `causal=False`: older chunks also see the noisier ones behind them), to the sinks (the first `sink_frames`
  frames' K/V from their context pass) and to the newest `window_frames - sink_frames - R*chunk_frames` cached
  frames (the reference's "working cache", 3 frames). With `sinks_follow_window` the sinks' keys are re-rotated to
  sit right before the oldest attended cached frame (the reference re-ropes its unroped "anchor" block at
  `current_start_frame - working_frames - 3`). Positions are absolute frame indices (re-based as `KVCache` does).
* context pass: the emitted chunk attends to the newest `window_frames` cached frames, itself included, with no
  sinks (the reference's `updating_cache=True` branch: `kv_cache[max(0, end - 21 frames):end]`, which stops
  including the anchor once 21 frames are cached). `context_sinks=True` uses the standard rolling cache instead
  (sinks + the newest `window_frames - sink_frames` frames), with which R = 1 is exactly `StreamEngine`.

Noise is drawn in this order: the entering chunk's noise at the start of a slide, the re-noise draws after each
joint pass (front to back, chunk-shaped), one draw for a noisy context pass (`context_noise > 0`: we re-noise the
emitted latents as `StreamEngine` does; the reference feeds the clean latents labelled with that timestep, with its
re-noising commented out, and its configs use 0). `stream/reference.py: reference_rolling_stream` is the cache-free
reference this is tested against.

Controls act at emission boundaries, as in `StreamEngine`: a new prompt is seen by every chunk in flight from the
next joint pass on (one DiT call has one text context), so the first chunk denoised entirely under it is emitted R - 1
chunks later; each chunk keeps the actions that were set when it entered the window. RESET drops the chunks in
flight (the stream warms up again); RECACHE re-encodes the cached frames (the sinks too while they are among them).
The reference's last windows of a finite video (no new noise; the window drains) and its video-extension input
(`initial_latent`) have no counterpart in an endless stream. Its KV path hard-codes a 3-frame block as the sink, a
21-frame attention span and a 24-frame cache; here they are `sink_frames`, `window_frames` and what the two passes
need. Not supported here: fewer steps for one chunk (`next_chunk(steps=...)`), video-to-video `source`, the full cache,
linear attention, and the layer pipeline (`make_memory` refuses a rolling config).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from framecast.kernels.attention import attention
from framecast.models.config import ROPE_TABLE_FRAMES, AttentionKind, DiTConfig
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import ConfigError
from framecast.models.memory import KVCache
from framecast.models.rope import rotate
from framecast.stream.engine import CacheKind, EngineConfig, StreamEngine
from framecast.stream.noise import NoiseSource
from framecast.stream.sampler import Step, renoise, to_clean


def check_rolling_config(config: EngineConfig) -> None:
    """The rolling sampler's rules for an `EngineConfig` (called by its validation when `rolling_chunks > 1`).

    Raises:
        ConfigError: naming the value and the rule it breaks.
    """
    chunks, steps = config.rolling_chunks, len(config.denoising_steps)
    if steps % chunks:
        raise ConfigError(
            f"rolling_chunks={chunks} must divide the number of denoising steps ({steps}): each slide of the window "
            f"advances every chunk by steps / rolling_chunks steps (Rolling Forcing: rolling_chunks = {steps})"
        )
    if config.cache is not CacheKind.ROLLING:
        raise ConfigError(f"rolling_chunks={chunks} needs the rolling cache (cache='rolling'), not {config.cache.value!r}")
    rolling_frames = chunks * config.chunk_frames
    if config.window_frames < config.sink_frames + rolling_frames:
        raise ConfigError(
            f"window_frames={config.window_frames} must hold the sinks and the rolling window: >= sink_frames + "
            f"rolling_chunks * chunk_frames = {config.sink_frames} + {chunks} * {config.chunk_frames}"
        )
    if config.sink_frames % config.chunk_frames:
        raise ConfigError(
            f"sink_frames={config.sink_frames} must be a whole number of chunks (chunk_frames={config.chunk_frames}) "
            "with the rolling window"
        )
    if 2 * config.window_frames + rolling_frames > ROPE_TABLE_FRAMES:
        raise ConfigError(
            f"2 * window_frames + rolling_chunks * chunk_frames = {2 * config.window_frames + rolling_frames} must be "
            f"<= {ROPE_TABLE_FRAMES} (the RoPE table) so that the joint window's positions can be re-based"
        )


@dataclass(frozen=True)
class _Joint:
    """A joint pass: positions of the window's frames and what they attend to besides themselves."""

    positions: tuple[int, ...]
    sink_tokens: int  # tokens of sink keys/values attended
    sink_keys: Tensor  # [layers, B, sink_tokens_max, H, D]: the stored sinks, or their re-rotated copy
    past_runs: tuple[tuple[int, int], ...]  # (slot token, tokens) runs of the cached frames attended, oldest first


class RollingWindowMemory:
    """The rolling sampler's memory: clean K/V of emitted frames, read two ways (see the module docstring).

    Wraps a `KVCache` (`self.ring`) that the context passes (and a recache) use as they are; the joint passes
    (`begin_window` ... `end_window`) read its buffers (through its slot and position helpers) and a copy of the
    sinks' K/V, and write nothing. Lifecycle: `begin_window(n)` -> DiT call -> `end_window()` for a joint pass;
    `begin_chunk(n)` | `begin_recache()` -> DiT call -> `commit()` for a context pass, as every `Memory`.
    """

    def __init__(
        self,
        config: DiTConfig,
        *,
        batch: int,
        tokens_per_frame: int,
        window_frames: int,
        sink_frames: int,
        chunk_frames: int,
        rolling_frames: int,
        sinks_follow_window: bool = False,
        context_sinks: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        rope_limit_frames: int = ROPE_TABLE_FRAMES,
    ) -> None:
        if not 1 <= chunk_frames <= rolling_frames:
            raise ConfigError(f"rolling_frames={rolling_frames} must be >= chunk_frames={chunk_frames} >= 1")
        if not 0 <= sink_frames <= window_frames - rolling_frames:
            raise ConfigError(
                f"sink_frames={sink_frames} must be in [0, window_frames - rolling_frames = "
                f"{window_frames - rolling_frames}]"
            )
        # the ring re-bases when a context pass would end past its limit; the joint window ends up to
        # rolling_frames further, so its limit leaves that much room (KVCache checks it against 2 * window_frames)
        self.ring = KVCache(
            config, batch=batch, tokens_per_frame=tokens_per_frame, window_frames=window_frames,
            sink_frames=sink_frames if context_sinks else 0, evicts=True, dtype=dtype, device=device,
            rope_limit_frames=rope_limit_frames - rolling_frames,
            sinks_follow_window=sinks_follow_window and context_sinks,
        )
        self.rope_limit_frames = rope_limit_frames
        self.sink_frames, self.chunk_frames, self.rolling_frames = sink_frames, chunk_frames, rolling_frames
        self.past_frames = window_frames - sink_frames - rolling_frames  # cached non-sink frames a joint pass sees
        self.sinks_follow_window, self.context_sinks = sinks_follow_window, context_sinks
        self.tokens_per_frame = tokens_per_frame
        self.frame_pairs = config.rope_split[0]
        sink_shape = (config.num_layers, batch, sink_frames * tokens_per_frame, config.num_heads, config.head_dim)
        self.sink_keys = torch.zeros(sink_shape, dtype=dtype, device=device)  # rotated at their own positions
        self.sink_values = torch.zeros(sink_shape, dtype=dtype, device=device)
        self.moved_sink_keys = torch.zeros(sink_shape, dtype=dtype, device=device) if sinks_follow_window else None
        self.reset()

    @property
    def nbytes(self) -> int:
        moved = self.moved_sink_keys.nbytes if self.moved_sink_keys is not None else 0
        return self.ring.nbytes + self.sink_keys.nbytes + self.sink_values.nbytes + moved

    @property
    def committed_frames(self) -> int:
        return self.ring.committed_frames

    def reset(self) -> None:
        self.ring.reset()
        self._joint: _Joint | None = None
        self._context_first: int | None = None  # first frame of the context pass / recache in flight

    def _idle(self) -> None:
        if self._joint is not None or self._context_first is not None:
            raise RuntimeError("a pass is already in flight: end_window() or commit() it first")

    # the context pass (and a recache): the ring as it is, sinks' K/V copied aside as they go by
    def begin_chunk(self, num_frames: int) -> None:
        self._idle()
        self.ring.begin_chunk(num_frames)
        self._context_first = self.ring.committed_frames

    def begin_recache(self) -> range:
        self._idle()
        frames = self.ring.begin_recache()
        self._context_first = frames.start
        return frames

    def commit(self) -> None:
        if self._joint is not None:
            raise RuntimeError("a joint pass commits nothing: call end_window()")
        self.ring.commit()
        self._context_first = None

    # the joint pass
    def begin_window(self, num_frames: int) -> None:
        """The next `num_frames` frames (the rolling window, front first) are in flight for one joint pass."""
        self._idle()
        if not 1 <= num_frames <= self.rolling_frames:
            raise ConfigError(f"a rolling window of {num_frames} frames must be in [1, {self.rolling_frames}]")
        ring, first = self.ring, self.ring.committed_frames
        stop = first + num_frames
        if stop - ring.position_offset > self.rope_limit_frames:  # the ring's re-basing keeps this from happening
            raise RuntimeError(f"frame {stop - 1} would sit past the RoPE table (offset {ring.position_offset})")
        sinks = min(self.sink_frames, first)
        oldest_past = min(max(self.sink_frames, first - self.past_frames), first)
        runs = tuple((slot, count) for _, slot, count in ring._writes(oldest_past, first)) if oldest_past < first else ()
        sink_keys = self.sink_keys
        if sinks and self.sinks_follow_window:
            shift = ring._position(oldest_past) - sinks  # sinks right before the oldest attended frame
            if shift:
                cos, sin = ring.rope.frame_shift(shift, self.sink_keys.dtype, self.sink_keys.device)
                pairs = 2 * self.frame_pairs
                self.moved_sink_keys[..., pairs:].copy_(self.sink_keys[..., pairs:])
                self.moved_sink_keys[..., :pairs].copy_(rotate(self.sink_keys[..., :pairs], cos, sin))
                sink_keys = self.moved_sink_keys
        positions = tuple(ring._position(frame) for frame in range(first, stop))
        self._joint = _Joint(positions, sinks * self.tokens_per_frame, sink_keys, runs)

    def end_window(self) -> None:
        """The joint pass is over; it leaves nothing behind."""
        self._joint = None

    # both
    def rope_positions(self) -> tuple[int, ...]:
        return self._joint.positions if self._joint is not None else self.ring.rope_positions()

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        joint = self._joint
        if joint is None:
            self._keep_sinks(layer, k, v)
            return self.ring.attend(layer, q, k, v)
        keys, values = [], []
        if joint.sink_tokens:
            keys.append(joint.sink_keys[layer][:, : joint.sink_tokens])
            values.append(self.sink_values[layer][:, : joint.sink_tokens])
        ring_keys, ring_values = self.ring.keys[layer], self.ring.values[layer]
        for slot, count in joint.past_runs:
            keys.append(ring_keys[:, slot : slot + count])
            values.append(ring_values[:, slot : slot + count])
        keys.append(k)
        values.append(v)
        return attention(q, torch.cat(keys, dim=1), torch.cat(values, dim=1))  # no mask: the window is bidirectional

    def _keep_sinks(self, layer: int, k: Tensor, v: Tensor) -> None:
        first = self._context_first
        if first is None or first >= self.sink_frames:
            return
        # sink frames are only ever in flight before any re-basing, so these keys are rotated at their own positions
        tpf = self.tokens_per_frame
        stop = min(self.sink_frames, first + k.shape[1] // tpf)
        self.sink_keys[layer][:, first * tpf : stop * tpf].copy_(k[:, : (stop - first) * tpf])
        self.sink_values[layer][:, first * tpf : stop * tpf].copy_(v[:, : (stop - first) * tpf])


def rolling_memory(dit: CausalWanDiT, config: EngineConfig, *, context_sinks: bool = False) -> RollingWindowMemory:
    """The memory of a rolling-window stream of this model and config.

    Raises:
        ConfigError: a linear-attention model or the full cache.
    """
    if dit.config.attention is not AttentionKind.SOFTMAX:
        raise ConfigError(f"the rolling window needs softmax attention; the model uses {dit.config.attention.value}")
    if config.cache is not CacheKind.ROLLING:
        raise ConfigError(f"the rolling window needs the rolling cache (cache='rolling'), not {config.cache.value!r}")
    return RollingWindowMemory(
        dit.config, batch=config.batch, tokens_per_frame=dit.config.tokens_per_frame(config.latent_height, config.latent_width),
        window_frames=config.window_frames, sink_frames=config.sink_frames, chunk_frames=config.chunk_frames,
        rolling_frames=config.rolling_chunks * config.chunk_frames, sinks_follow_window=config.sinks_follow_window,
        context_sinks=context_sinks, dtype=dit.dtype, device=dit.device,
    )


@dataclass
class InFlight:
    """A chunk in the rolling window."""

    index: int  # chunk number since the engine started
    latents: Tensor  # [B, chunk_frames, C, H, W]: noisy at steps[done], or clean once done == len(steps)
    actions: Tensor | None  # [B, chunk_frames], as set when the chunk entered the window
    done: int = 0  # steps run so far


class RollingStreamEngine(StreamEngine):
    """`StreamEngine` with Rolling Forcing's rolling-window sampler (module docstring); `StreamEngine(dit, config,
    ...)` with `config.rolling_chunks > 1` builds one. Same controls and chunks; each `next_chunk()` runs one slide
    of the window (the first one R slides: the warm-up).

    `context_sinks`: the context pass attends to the sinks as `StreamEngine`'s does (default False: as the
    reference, see the module docstring); with it and `rolling_chunks = 1` this engine computes `StreamEngine`'s
    stream (to summation-order rounding).

    Raises:
        ConfigError: a linear-attention model, or the full cache.
    """

    def __init__(
        self,
        dit: CausalWanDiT,
        config: EngineConfig,
        prompt: Tensor,
        noise: NoiseSource | None = None,
        *,
        context_sinks: bool = False,
    ) -> None:
        self.context_sinks = context_sinks
        super().__init__(dit, config, prompt, noise)
        self.window_chunks = config.rolling_chunks
        self.steps_per_slide = len(self.steps) // self.window_chunks
        self.window: list[InFlight] = []  # front (oldest) first
        self._admitted = 0
        self._timestep_tables: dict[tuple[int, ...], Tensor] = {}

    def _make_memory(self, dit: CausalWanDiT, config: EngineConfig) -> RollingWindowMemory:
        return rolling_memory(dit, config, context_sinks=self.context_sinks)

    def _restart(self) -> None:
        super()._restart()
        self.window.clear()

    def steps_for(self, raw_steps: Sequence[int]) -> tuple[Step, ...]:
        if tuple(raw_steps) != self.config.denoising_steps:
            raise ConfigError(
                f"steps={tuple(raw_steps)}: the rolling window runs every chunk through all of "
                f"denoising_steps={self.config.denoising_steps}; fewer steps per chunk are not supported"
            )
        return self.steps

    @torch.inference_mode()
    def step(self, steps: Sequence[int] | None = None, source: Tensor | None = None) -> Tensor:
        """Slide the window until its front chunk has run every step; commit and return that chunk's clean latents."""
        if steps is not None:
            self.steps_for(steps)  # raises unless it is the full list
        if source is not None:
            raise ConfigError("video-to-video source latents are not supported by the rolling-window sampler")
        while True:
            with self.timer.measure("denoise"):
                self._admit()
                for _ in range(self.steps_per_slide):
                    self._joint_pass()
            if self.window[0].done == len(self.steps):
                return self._emit()

    def _admit(self) -> None:
        noise = self.noise.draw(self.chunk_shape, self.dit.dtype, self.dit.device)
        self.window.append(InFlight(self._admitted, noise, self._actions))
        self._admitted += 1

    def _timesteps(self, done: tuple[int, ...]) -> Tensor:
        if done not in self._timestep_tables:
            per_frame = [self.steps[d].timestep for d in done for _ in range(self.config.chunk_frames)]
            table = torch.tensor(per_frame, dtype=torch.float32, device=self.dit.device)
            self._timestep_tables[done] = table.unsqueeze(0).expand(self.config.batch, -1).contiguous()
        return self._timestep_tables[done]

    def _joint_pass(self) -> None:
        window, frames = self.window, self.config.chunk_frames
        x = torch.cat([chunk.latents for chunk in window], dim=1)
        timesteps = self._timesteps(tuple(chunk.done for chunk in window))
        actions = torch.cat([chunk.actions for chunk in window], dim=1) if self._actions is not None else None
        self.memory.begin_window(x.shape[1])
        try:
            flow = self.dit(x, timesteps, self._text, self.memory, actions)
        finally:
            self.memory.end_window()
        for position, chunk in enumerate(window):
            step = self.steps[chunk.done]
            x0 = to_clean(chunk.latents, flow[:, position * frames : (position + 1) * frames], step.sigma)
            chunk.done += 1
            if step.is_last:
                chunk.latents = x0
            else:
                chunk.latents = renoise(x0, self.noise.draw(tuple(x0.shape), x0.dtype, x0.device), step.next_sigma)

    def _emit(self) -> Tensor:
        chunk = self.window.pop(0)
        latents, dit = chunk.latents, self.dit
        with self.timer.measure("context"):
            context = latents
            if self.config.context_noise:
                context = renoise(latents, self.noise.draw(self.chunk_shape, dit.dtype, dit.device), self.context_sigma)
            self.memory.begin_chunk(self.config.chunk_frames)
            dit(context, self._context_timesteps, self._text, self.memory, chunk.actions)
        self.memory.commit()
        self.history.push(latents, chunk.actions)
        return latents
