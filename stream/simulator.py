"""The world simulator as a live source: the procedural world itself (models/world), driven like an engine.

    session -> WorldSimulator.next_chunk -> PixelDecoder -> video frames (same clock, scheduler and sinks as a model)

The embedded default model learns to imitate this world; the simulator streams the world directly, so its answer
to every prompt and action is known exactly: `read_setting`/`read_agent` on a received frame say whether a prompt
switch or a key press arrived and when. That makes it the reference for end-to-end tests of the output stage
(browser, WebRTC, virtual camera) and a ground-truth view beside the model in demos (`framecast serve --simulator`).

It keeps a model's frame accounting: a chunk of `chunk_frames` latent frames is 4 video frames per latent frame,
1 for the stream's very first one (the Wan VAE's rule, which the deadline scheduler assumes). Prompts use the
world's closed vocabulary; a prompt may name only some slots (the others stay). An action is a key held until
the next one. A new seed restarts the world from that seed under the current settings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from framecast.models.errors import ConfigError
from framecast.models.world.prompt import SceneSettings, parse_prompt
from framecast.models.world.state import WorldConfig
from framecast.models.world.vocabulary import Action
from framecast.models.world.world import World, as_action
from framecast.stream.engine import LatentChunk

FRAMES_PER_LATENT = 4  # as the Wan VAE: the deadline scheduler's default accounting


@dataclass(frozen=True)
class SimulatorConfig:
    """The simulated stream: world size, chunking, first prompt and seed."""

    height: int = 128
    width: int = 128
    chunk_frames: int = 1  # latent-frame equivalents per chunk: 4 video frames (short chunks answer keys quickly)
    prompt: str = "a red circle on grass by day in clear weather"
    seed: int = 0
    denoising_steps: tuple[int, ...] = (1,)  # one "step": the session's scheduler has a single rung to plan with

    def __post_init__(self) -> None:
        for name in ("height", "width", "chunk_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        parse_prompt(self.prompt)  # a bad first prompt fails here, not in the stream


class WorldSimulator:
    """Engine interface (stream.session.LiveEngine) over a `World`: controls land at the next chunk boundary."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config = config if config is not None else SimulatorConfig()
        self.world = World(WorldConfig(height=config.height, width=config.width), config.seed,
                           parse_prompt(config.prompt))
        self.chunk_index = 0
        self._first_frame = 0  # latent-frame index of the next chunk (0 again after reset)
        self._action = Action.NONE
        self._lock = threading.Lock()
        self._pending_settings: str | None = None
        self._pending_action: Action | None = None
        self._pending_seed: int | None = None

    @property
    def num_actions(self) -> int:
        return len(Action)

    @staticmethod
    def encode_prompt(text: str) -> str:
        """Check a prompt against the world's vocabulary (ConfigError naming the unknown word) and pass it on."""
        parse_prompt(text)
        return text

    def set_prompt(self, prompt: str) -> None:
        """Show the slots this prompt names from the next chunk on (positions and motion continue)."""
        parse_prompt(prompt)
        with self._lock:
            self._pending_settings = prompt

    def set_action(self, action: int) -> None:
        """Hold this key (an Action id, 0 = none) from the next chunk on."""
        held = as_action(action)
        with self._lock:
            self._pending_action = held

    def reseed(self, seed: int) -> None:
        """Restart the world from `seed` at the next chunk, under the current settings."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed={seed!r} must be an integer >= 0")
        with self._lock:
            self._pending_seed = seed

    def reset(self) -> None:
        """Back to the configured start (first prompt, seed, no key held); the chunk index keeps counting."""
        config = self.config
        with self._lock:
            self._pending_settings = self._pending_action = self._pending_seed = None
        self.world.reset(config.seed, parse_prompt(config.prompt))
        self._action, self._first_frame = Action.NONE, 0

    def _apply_controls(self) -> None:
        with self._lock:
            prompt, self._pending_settings = self._pending_settings, None
            action, self._pending_action = self._pending_action, None
            seed, self._pending_seed = self._pending_seed, None
        settings: SceneSettings = self.world.state.settings
        if prompt is not None:
            settings = parse_prompt(prompt, settings)
        if seed is not None:
            self.world.reset(seed, settings)
        elif prompt is not None:
            self.world.set_settings(settings)
        if action is not None:
            self._action = action

    def next_chunk(self, steps: Sequence[int] | None = None) -> LatentChunk:
        """The next chunk's frames as uint8 [1, F, H, W, 3] "latents" (PixelDecoder passes them through)."""
        start = time.perf_counter()
        self._apply_controls()
        count = self.config.chunk_frames * FRAMES_PER_LATENT - (FRAMES_PER_LATENT - 1 if self._first_frame == 0 else 0)
        frames = np.empty((count, self.config.height, self.config.width, 3), dtype=np.uint8)
        for i in range(count):
            self.world.step(self._action)
            frames[i] = self.world.render()
        chunk = LatentChunk(self.chunk_index, self._first_frame, torch.from_numpy(frames)[None],
                            time.perf_counter() - start, steps=tuple(steps or self.config.denoising_steps))
        self.chunk_index += 1
        self._first_frame += self.config.chunk_frames
        return chunk


class PixelDecoder:
    """The simulator's "decoder": its chunks are already pixels."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dtype != torch.uint8 or latents.ndim != 5 or latents.shape[-1] != 3:
            raise ConfigError(f"PixelDecoder takes uint8 [B, F, H, W, 3] frames, got {latents.dtype} {tuple(latents.shape)}")
        return latents
