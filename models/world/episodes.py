"""Training episodes: seeded frame sequences with the actions that drove them and the ground truth of every frame.

Frame t shows the world after action t was held for one frame, so an action-conditioned model sees, for every frame,
the action that moved the agent into it. Actions come from a policy; the default holds random keys for a while, like
a person playing. With `switch_every`, a new random prompt takes over every that many frames (the world state is
kept: the agent stays where it was).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from framecast.models.errors import ConfigError
from framecast.models.world.prompt import SceneSettings, describe, random_settings
from framecast.models.world.state import WorldConfig
from framecast.models.world.vocabulary import Action
from framecast.models.world.world import World


class ActionPolicy(Protocol):
    def actions(self, rng: np.random.Generator, frames: int) -> np.ndarray:
        """Action ids for `frames` frames, int64 [frames] in [0, len(Action))."""
        ...


@dataclass(frozen=True)
class HeldKeys:
    """Keys held for a geometric number of frames (mean `mean_hold_frames`); a new press is NONE with `none_share`."""

    mean_hold_frames: float = 8.0
    none_share: float = 0.2

    def __post_init__(self) -> None:
        if not self.mean_hold_frames >= 1:
            raise ConfigError(f"mean_hold_frames={self.mean_hold_frames!r} must be >= 1")
        if not 0 <= self.none_share <= 1:
            raise ConfigError(f"none_share={self.none_share!r} must be in [0, 1]")

    def actions(self, rng: np.random.Generator, frames: int) -> np.ndarray:
        presses = rng.random(frames) < 1 / self.mean_hold_frames
        presses[:1] = True
        directions = rng.integers(Action.UP, Action.RIGHT + 1, size=frames)
        keys = np.where(rng.random(frames) < self.none_share, Action.NONE, directions)
        # every frame repeats the key of the latest press
        latest_press = np.maximum.accumulate(np.where(presses, np.arange(frames), 0))
        return keys[latest_press].astype(np.int64)


@dataclass(frozen=True)
class Episode:
    """One episode; every array is indexed by frame."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    actions: np.ndarray  # int64 [T]: the action held while stepping into frame t
    settings: tuple[SceneSettings, ...]  # [T]: what frame t is shown under
    agent_xy: np.ndarray  # float64 [T, 2]: (x, y) px of the agent in frame t

    @property
    def switch_frames(self) -> tuple[int, ...]:
        """Frames shown under a new prompt (0, then every prompt switch)."""
        return tuple(t for t, s in enumerate(self.settings) if t == 0 or s != self.settings[t - 1])

    @property
    def prompts(self) -> tuple[str, ...]:
        """The prompt text in force at each switch frame."""
        return tuple(describe(self.settings[t]) for t in self.switch_frames)


def make_episode(
    seed: int,
    frames: int,
    switch_every: int | None = None,
    policy: ActionPolicy = HeldKeys(),
    config: WorldConfig = WorldConfig(),
    settings: SceneSettings | None = None,
) -> Episode:
    """A seeded episode of `frames` frames: the same arguments give the same episode.

    `settings` fixes the first prompt (a random one otherwise); `switch_every` draws a new, different one every that
    many frames.

    Raises:
        ConfigError: frames < 1, switch_every < 1, or a policy returning ids outside [0, len(Action)).
    """
    if not isinstance(frames, int) or frames < 1:
        raise ConfigError(f"frames={frames!r} must be a positive integer")
    if switch_every is not None and (not isinstance(switch_every, int) or switch_every < 1):
        raise ConfigError(f"switch_every={switch_every!r} must be None or a positive integer")
    world_seed, policy_seed, prompt_seed = np.random.SeedSequence(seed).spawn(3)
    prompt_rng = np.random.default_rng(prompt_seed)
    actions = np.asarray(policy.actions(np.random.default_rng(policy_seed), frames), dtype=np.int64)
    if actions.shape != (frames,) or actions.min() < 0 or actions.max() >= len(Action):
        raise ConfigError(
            f"the policy gave action ids of shape {actions.shape} in [{actions.min()}, {actions.max()}]; "
            f"expected [{frames}] in [0, {len(Action)})"
        )
    current = settings if settings is not None else random_settings(prompt_rng)
    world = World(config, int(world_seed.generate_state(1)[0]), current)
    video = np.empty((frames, config.height, config.width, 3), dtype=np.uint8)
    agent_xy = np.empty((frames, 2))
    shown = []
    for t in range(frames):
        if switch_every and t and t % switch_every == 0:
            current = random_settings(prompt_rng, unlike=current)
            world.set_settings(current)
        world.step(int(actions[t]))
        video[t] = world.render()
        agent_xy[t] = world.state.agent_xy
        shown.append(current)
    return Episode(video, actions, tuple(shown), agent_xy)
