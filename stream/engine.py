"""The streaming engine: latent chunks forever, one chunk of frames at a time.

    prompt embedding -> TextContext -> [noise -> denoise (DiT + memory) -> context pass -> commit] -> LatentChunk

Controls (`set_prompt`, `set_action`, `reset`) may come from another thread; they are applied at the next chunk
boundary, in order, so a chunk is always generated under one prompt and one action per frame.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from framecast.models.config import ROPE_TABLE_FRAMES, AttentionKind
from framecast.models.dit import CausalWanDiT, TextContext
from framecast.models.errors import ConfigError, ShapeError
from framecast.models.memory import KVCache, LinearState, Memory
from framecast.stream.noise import GaussianNoise, NoiseSource
from framecast.stream.sampler import FlowMatchSchedule, Step, denoise, renoise
from framecast.stream.timing import StageTimer


MAX_STEPS = 64  # distilled models take 1-4; a teacher is sampled with 32 or more


class CacheKind(enum.Enum):
    """Memory of a softmax-attention model (a linear-attention model always keeps a linear state)."""

    ROLLING = "rolling"  # sink frames + the newest frames; endless
    FULL = "full"  # every frame since the start, up to window_frames


class SwitchPolicy(enum.Enum):
    """What a prompt switch does to the memory of the past."""

    RECACHE = "recache"  # re-encode the window's clean frames under the new prompt, keep the sinks (LongLive)
    RESET = "reset"  # forget the past; the stream starts over under the new prompt
    KEEP = "keep"  # keep the memory as it is; only new frames see the new prompt


@dataclass(frozen=True)
class EngineConfig:
    """Runtime settings of one stream, validated at construction."""

    latent_height: int = 60  # 480 px / 8
    latent_width: int = 104  # 832 px / 8
    chunk_frames: int = 3
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    warp_steps: bool = True  # steps index the shifted schedule (Self-Forcing); False: they are timesteps (CausVid)
    shift: float = 5.0
    context_noise: int = 0  # timestep of the clean context pass (0: truly clean)
    cache: CacheKind = CacheKind.ROLLING
    window_frames: int = 12  # frames attended, sinks and the chunk in flight included
    sink_frames: int = 3
    sinks_follow_window: bool = False  # sinks take the positions right before the window (Rolling Forcing)
    switch_policy: SwitchPolicy = SwitchPolicy.RECACHE
    rolling_chunks: int = 1  # > 1: chunks denoised jointly in Rolling Forcing's rolling window (stream/rolling.py)
    stream_batch: bool = False  # the steps of successive chunks in flight at once, one memory per step (stream_batch.py)
    batch: int = 1
    seed: int = 0
    profile: bool = False  # per-stage timings (syncs the device at stage boundaries)
    # classifier-free guidance scale (1: none). Above 1 every step and the context pass run under the prompt and
    # the null prompt, which keeps a memory of its own, as one batch of twice the rows (~1.5x the DiT's time on a CPU)
    guidance: float = 1.0
    # guided, only the first this many steps of a chunk are (None: all). The later steps run the prompt's rows alone,
    # at half the batch; the context pass stays guided, since the null prompt's memory must see every frame
    guided_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("latent_height", "latent_width", "chunk_frames", "window_frames", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not 1 <= len(self.denoising_steps) <= MAX_STEPS:
            raise ConfigError(f"denoising_steps={self.denoising_steps} must have 1 to {MAX_STEPS} steps")
        if not 0 <= self.context_noise < 1000:
            raise ConfigError(f"context_noise={self.context_noise} must be in [0, 1000)")
        if not isinstance(self.cache, CacheKind):
            raise ConfigError(f"cache={self.cache!r} must be one of {[k.value for k in CacheKind]}")
        if not isinstance(self.switch_policy, SwitchPolicy):
            raise ConfigError(f"switch_policy={self.switch_policy!r} must be one of {[p.value for p in SwitchPolicy]}")
        if not 1 <= self.window_frames <= ROPE_TABLE_FRAMES // 2:
            raise ConfigError(f"window_frames={self.window_frames} must be in [1, {ROPE_TABLE_FRAMES // 2}]")
        if self.cache is CacheKind.ROLLING:
            if not 0 <= self.sink_frames <= self.window_frames - self.chunk_frames:
                raise ConfigError(
                    f"sink_frames={self.sink_frames} must be in [0, window_frames - chunk_frames = "
                    f"{self.window_frames - self.chunk_frames}] so that a chunk fits beside the sinks"
                )
        elif self.chunk_frames > self.window_frames:
            raise ConfigError(f"chunk_frames={self.chunk_frames} must be <= window_frames={self.window_frames}")
        FlowMatchSchedule(self.shift).warp(self.denoising_steps)  # raises ConfigError on a bad step list
        if not isinstance(self.rolling_chunks, int) or isinstance(self.rolling_chunks, bool) or self.rolling_chunks < 1:
            raise ConfigError(f"rolling_chunks={self.rolling_chunks!r} must be a positive integer (1: the chunk sampler)")
        if not isinstance(self.stream_batch, bool):
            raise ConfigError(f"stream_batch={self.stream_batch!r} must be True or False")
        if self.stream_batch and self.rolling_chunks > 1:
            raise ConfigError("stream_batch and rolling_chunks > 1 are two different samplers: choose one")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) or not 1 <= self.guidance <= 10:
            raise ConfigError(f"guidance={self.guidance!r} must be a number in [1, 10] (1: no guidance)")
        if self.guidance != 1 and (self.stream_batch or self.rolling_chunks > 1):
            raise ConfigError(f"guidance={self.guidance} runs in the chunk sampler only, not with stream_batch or "
                              "rolling_chunks > 1")
        if self.guided_steps is not None and (
            isinstance(self.guided_steps, bool) or not isinstance(self.guided_steps, int)
            or not 1 <= self.guided_steps <= len(self.denoising_steps)
        ):
            raise ConfigError(f"guided_steps={self.guided_steps!r} must be None (every step) or an integer in "
                              f"[1, {len(self.denoising_steps)}] (the steps of denoising_steps={self.denoising_steps})")
        if self.rolling_chunks > 1:
            from framecast.stream.rolling import check_rolling_config  # the rolling sampler's own rules

            check_rolling_config(self)

    @property
    def fixed_steps(self) -> bool:
        """The sampler runs every chunk through all its steps (a rolling window or stream batch: one chunk per step),
        so a deadline scheduler can degrade only by filling and dropping frames."""
        return self.rolling_chunks > 1 or self.stream_batch


@dataclass(frozen=True)
class LatentChunk:
    index: int  # chunk number since the engine started (keeps counting across resets)
    first_frame: int  # latent frame index of latents[:, 0] in the memory's stream (0 again after a reset)
    latents: Tensor  # [B, chunk_frames, C, H, W], clean
    seconds: float  # wall time to produce this chunk (controls and recache included)
    stages: dict[str, float] = field(default_factory=dict)  # per-stage seconds when profiling
    steps: tuple[int, ...] = ()  # the raw step list this chunk was denoised with


def make_memory(dit: CausalWanDiT, config: EngineConfig) -> Memory:
    """The memory policy a model and a runtime config call for.

    Raises:
        ConfigError: a rolling-window config (`rolling_chunks > 1`): that sampler keeps its own memory and only
            `StreamEngine` runs it (stream/rolling.py).
    """
    if config.rolling_chunks > 1:
        raise ConfigError(
            f"rolling_chunks={config.rolling_chunks}: the rolling-window sampler keeps its own memory "
            "(stream/rolling.py) and runs in StreamEngine only, not chunk by chunk here"
        )
    tokens = dit.config.tokens_per_frame(config.latent_height, config.latent_width)
    if dit.config.attention is AttentionKind.LINEAR:
        return LinearState(
            dit.config, batch=config.batch, chunk_frames=config.chunk_frames, recache_frames=config.window_frames,
            dtype=dit.dtype, device=dit.device,
        )
    rolling = config.cache is CacheKind.ROLLING
    return KVCache(
        dit.config, batch=config.batch, tokens_per_frame=tokens, window_frames=config.window_frames,
        sink_frames=config.sink_frames if rolling else 0, evicts=rolling, dtype=dit.dtype, device=dit.device,
        sinks_follow_window=config.sinks_follow_window,
    )


class LatentHistory:
    """The newest clean latents (and their actions) in a fixed ring buffer, for re-encoding on a prompt switch."""

    def __init__(self, frames: int, chunk_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        batch, _, channels, height, width = chunk_shape
        self.capacity = frames
        self.latents = torch.zeros((batch, frames, channels, height, width), dtype=dtype, device=device)
        self.actions = torch.zeros((batch, frames), dtype=torch.long, device=device)
        self.stop = 0  # frames pushed so far

    def push(self, latents: Tensor, actions: Tensor | None) -> None:
        slots = [(self.stop + offset) % self.capacity for offset in range(latents.shape[1])]
        self.latents[:, slots] = latents
        if actions is not None:
            self.actions[:, slots] = actions
        self.stop += latents.shape[1]

    def frames(self, frames: range) -> tuple[Tensor, Tensor]:
        if frames.start < self.stop - self.capacity or frames.stop > self.stop:
            raise RuntimeError(f"frames {frames} are not in the history [{self.stop - self.capacity}, {self.stop})")
        slots = [f % self.capacity for f in frames]
        return self.latents[:, slots], self.actions[:, slots]


def check_actions(actions: int | Tensor, num_actions: int, batch: int, frames: int) -> Tensor:
    """Action ids as long [batch, frames] (one int or [frames] is broadcast); errors name the bad ids or shape."""
    if not num_actions:
        raise ConfigError("this model takes no actions (num_actions = 0)")
    actions = torch.as_tensor(actions, dtype=torch.long)
    if actions.ndim == 0:
        actions = actions.expand(batch, frames)
    elif actions.ndim == 1:
        actions = actions.unsqueeze(0).expand(batch, -1)
    if actions.shape != (batch, frames):
        raise ShapeError(f"actions of shape {tuple(actions.shape)}; expected [{frames}] or [{batch}, {frames}]")
    if actions.min() < 0 or actions.max() >= num_actions:
        raise ConfigError(f"action ids {actions.unique().tolist()} must be in [0, {num_actions})")
    return actions


class StreamEngine:
    """Generates latent chunks forever: `for chunk in engine.chunks(): ...`.

    A config with `rolling_chunks > 1` gives a `RollingStreamEngine` (stream/rolling.py), Rolling Forcing's sampler
    behind the same interface.
    """

    def __new__(cls, *args: object, **kwargs: object) -> StreamEngine:
        config = kwargs.get("config", args[1] if len(args) > 1 else None)
        if cls is StreamEngine and getattr(config, "stream_batch", False):
            from framecast.stream.stream_batch import StreamBatchEngine  # not a subclass: built here, __init__ skipped

            return StreamBatchEngine(*args, **kwargs)
        if cls is StreamEngine and getattr(config, "rolling_chunks", 1) > 1:
            from framecast.stream.rolling import RollingStreamEngine  # a subclass: imported here, not at the top

            cls = RollingStreamEngine
        return super().__new__(cls)

    def __init__(
        self,
        dit: CausalWanDiT,
        config: EngineConfig,
        prompt: Tensor,
        noise: NoiseSource | None = None,
        negative_prompt: Tensor | None = None,
    ) -> None:
        """`negative_prompt`: the null prompt of classifier-free guidance (config.guidance > 1), an embedding shaped
        like `prompt`; by default all-zero rows, the empty prompt (what a model trained with prompt dropout saw)."""
        self.dit, self.config = dit, config
        self.guided = config.guidance != 1
        # guided, the memory, text and context pass hold the prompt's rows then the null prompt's (`guided_flow`)
        self.memory = self._make_memory(dit, replace(config, batch=2 * config.batch) if self.guided else config)
        self.schedule = FlowMatchSchedule(config.shift)
        self.steps: tuple[Step, ...] = self.schedule.steps(config.denoising_steps, config.warp_steps)
        self._step_tables = {config.denoising_steps: self.steps}  # built once per list, off the hot path
        self.context_sigma = self.schedule.sigma_at(float(config.context_noise))
        self.noise = noise if noise is not None else GaussianNoise(config.seed)
        self.chunk_shape = (config.batch, config.chunk_frames, dit.config.in_dim, config.latent_height, config.latent_width)
        self.history = LatentHistory(config.window_frames, self.chunk_shape, dit.dtype, dit.device)
        self.timer = StageTimer(config.profile, dit.device)
        self._context_timesteps = torch.full(
            (self.memory_batch, config.chunk_frames), float(config.context_noise), dtype=torch.float32, device=dit.device
        )
        self._lock = threading.Lock()
        self._pending_prompt: tuple[Tensor, SwitchPolicy] | None = None
        self._pending_actions: Tensor | None = None
        self._pending_reset = False
        self._null_prompt: Tensor | None = None
        if self.guided:
            null = torch.zeros_like(prompt) if negative_prompt is None else negative_prompt
            self._null_prompt = self._batched(null)
            self._encode(null)  # its shape is checked like a prompt's
        self._text = self._encode(prompt)
        # an action-conditioned model always sees an action; 0 is "none" by convention
        self._actions = torch.zeros(config.batch, config.chunk_frames, dtype=torch.long, device=dit.device) if dit.config.num_actions else None
        self.chunk_index = 0

    def _make_memory(self, dit: CausalWanDiT, config: EngineConfig) -> Memory:
        """The engine's memory (a subclass with a sampler of its own builds its own)."""
        return make_memory(dit, config)

    @property
    def memory_batch(self) -> int:
        """Rows in the memory and the DiT's context pass: the batch, twice over when guided."""
        return self.config.batch * (2 if self.guided else 1)

    # controls: validated at once, applied at the next chunk boundary
    def _batched(self, prompt: Tensor) -> Tensor:
        prompt = prompt.to(self.dit.device, self.dit.dtype)
        if prompt.ndim == 2:
            prompt = prompt.unsqueeze(0)
        if prompt.shape[0] == 1 and self.config.batch > 1:
            prompt = prompt.expand(self.config.batch, -1, -1)
        if prompt.shape[0] != self.config.batch:
            raise ShapeError(f"prompt batch {prompt.shape[0]} does not match the engine batch {self.config.batch}")
        return prompt

    def _encode(self, prompt: Tensor) -> TextContext:
        prompt = self._batched(prompt)
        if self._null_prompt is not None:
            if prompt.shape[1:] != self._null_prompt.shape[1:]:  # one batch: both need the same token count
                raise ShapeError(f"prompt embedding of shape {list(prompt.shape[1:])}; the null prompt's is "
                                 f"{list(self._null_prompt.shape[1:])} (guidance runs both as one batch)")
            prompt = torch.cat([prompt, self._null_prompt])
        with torch.inference_mode():
            return self.dit.encode_text(prompt)

    def set_prompt(self, prompt: Tensor, policy: SwitchPolicy | None = None) -> None:
        """Switch to a new prompt embedding [T, text_dim] or [B, T, text_dim] from the next chunk on."""
        text = self._encode(prompt)  # raises ShapeError now, not in the stream
        with self._lock:
            self._pending_prompt = (text, policy or self.config.switch_policy)

    def set_action(self, actions: int | Tensor) -> None:
        """Action id(s) for the next chunks' frames: one int, [chunk_frames] or [B, chunk_frames]."""
        actions = check_actions(actions, self.dit.config.num_actions, self.config.batch, self.config.chunk_frames)
        with self._lock:
            self._pending_actions = actions.to(self.dit.device).contiguous()

    @property
    def num_actions(self) -> int:
        """Action ids the model takes (0: none)."""
        return self.dit.config.num_actions

    def reseed(self, seed: int) -> None:
        """Draw the noise of the next chunks from a new seed."""
        self.noise = GaussianNoise(seed)

    def reset(self) -> None:
        """Forget the past at the next chunk boundary (the prompt stays)."""
        with self._lock:
            self._pending_reset = True

    @torch.inference_mode()
    def _apply_controls(self) -> None:
        with self._lock:
            prompt, self._pending_prompt = self._pending_prompt, None
            actions, self._pending_actions = self._pending_actions, None
            reset, self._pending_reset = self._pending_reset, False
        if actions is not None:
            self._actions = actions
        if reset:
            self._restart()
        if prompt is not None:
            self._text, policy = prompt
            if policy is SwitchPolicy.RESET:
                self._restart()
            elif policy is SwitchPolicy.RECACHE:
                with self.timer.measure("recache"):
                    self._recache()

    def _restart(self) -> None:
        self.memory.reset()
        self.history.stop = 0

    def _recache(self) -> None:
        frames = self.memory.begin_recache()
        if len(frames):
            latents, actions = self.history.frames(frames)
            if self.guided:
                latents, actions = latents.repeat(2, 1, 1, 1, 1), actions.repeat(2, 1)
            timesteps = self._context_timesteps[:, :1].expand(-1, len(frames))
            self.dit(latents, timesteps, self._text, self.memory, actions if self.dit.config.num_actions else None)
        self.memory.commit()

    def steps_for(self, raw_steps: Sequence[int]) -> tuple[Step, ...]:
        """The schedule of a shorter step list (a deadline scheduler's degradation): a sub-list of the configured
        steps that keeps the first step, since distilled models are trained on those timesteps only."""
        key, full = tuple(raw_steps), self.config.denoising_steps
        if key not in self._step_tables:
            if not key or key[0] != full[0] or not set(key) <= set(full):
                raise ConfigError(f"steps={key} must be a sub-list of denoising_steps={full} keeping its first step {full[0]}")
            self._step_tables[key] = self.schedule.steps(key, self.config.warp_steps)
        return self._step_tables[key]

    # the hot path
    @torch.inference_mode()
    def step(self, steps: Sequence[int] | None = None, source: Tensor | None = None) -> Tensor:
        """Generate the next chunk's clean latents [B, chunk_frames, C, H, W] and commit them to memory.

        `source`: clean latents of input video for this chunk (video-to-video, as StreamDiffusionV2): they are noised
        to the first step's sigma instead of starting from pure noise, so a step list that starts below 1000 keeps
        their structure. Raises ShapeError when `source` is not [B, chunk_frames, C, H, W].
        """
        config, dit = self.config, self.dit
        schedule = self.steps if steps is None else self.steps_for(steps)
        if source is not None and tuple(source.shape) != self.chunk_shape:
            raise ShapeError(f"source latents have shape {tuple(source.shape)}; expected {list(self.chunk_shape)}")
        self.memory.begin_chunk(config.chunk_frames)
        with self.timer.measure("denoise"):
            noise = self.noise.draw(self.chunk_shape, dit.dtype, dit.device)
            if source is not None:
                noise = renoise(source.to(dit.device, dit.dtype), noise, schedule[0].sigma)
            latents = denoise(dit, noise, self._text, self.memory, schedule, self.noise, self._actions, config.guidance,
                              config.guided_steps)
        with self.timer.measure("context"):
            context = latents
            if config.context_noise:
                context = renoise(latents, self.noise.draw(self.chunk_shape, dit.dtype, dit.device), self.context_sigma)
            actions = self._actions
            if self.guided:
                context, actions = context.repeat(2, 1, 1, 1, 1), None if actions is None else actions.repeat(2, 1)
            dit(context, self._context_timesteps, self._text, self.memory, actions)
        self.memory.commit()
        self.history.push(latents, self._actions)
        return latents

    @torch.inference_mode()
    def next_chunk(self, steps: Sequence[int] | None = None, source: Tensor | None = None) -> LatentChunk:
        """Apply pending controls and generate one chunk (optionally with fewer steps, optionally from source
        latents: see `step`); chunks() is this, forever."""
        start = time.perf_counter()
        self._apply_controls()
        first_frame = self.memory.committed_frames
        latents = self.step(steps, source)
        used = tuple(steps) if steps is not None else self.config.denoising_steps
        chunk = LatentChunk(self.chunk_index, first_frame, latents, time.perf_counter() - start, self.timer.take(), used)
        self.chunk_index += 1
        return chunk

    def chunks(self) -> Iterator[LatentChunk]:
        """Yield latent chunks forever; each follows the newest prompt and actions set before it started."""
        while True:
            yield self.next_chunk()
