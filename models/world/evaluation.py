"""Metrics of a generated video stream of the world, read from its decoded frames against what was asked.

A model generates frame t under the prompt (parsed into `SceneSettings`) in force at t, with the action held while
stepping into t. The readers in `ground_truth.py` turn every frame back into a scene and an agent position, so:

- prompt adherence: the share of frames whose read scene is the prompt's, leaving out a short grace period after
  each prompt switch (a streaming model answers one chunk late at best);
- action following: the share of steps in which the agent moves the commanded way, over the steps where the
  physics moves it by at least a pixel that way;
- switch response: how many frames a new prompt takes to show, and how far the agent jumps at the switch from
  where the physics puts it (a model that redraws the scene from scratch loses the agent's place);
- drift: the same metrics on an early and a late window of a long stream.

Ground-truth episodes score 100% adherence, 100% action following, switches visible at once and jumps of ~0.2 px on
average (the readers see the agent at its drawn pixel, so every read position carries up to half a pixel of
rounding; one switch's jump may reach ~2 px of it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from framecast.models.errors import ConfigError, ShapeError
from framecast.models.world.episodes import Episode
from framecast.models.world.ground_truth import AgentReading, SettingReading, read_agent, read_setting
from framecast.models.world.prompt import SceneSettings
from framecast.models.world.state import WorldConfig
from framecast.models.world.vocabulary import Action
from framecast.models.world.world import ACTION_DIRECTION

SLOT_NAMES = ("terrain", "weather", "time", "agent_shape", "agent_colour", "agent_found")
WALL_MARGIN_PX = 1.5  # an agent this close to the wall it is pushed against may have no room left to move
# The sprite is drawn at the nearest pixel, so a move under one pixel may not show at all (a reversal from top
# speed moves 1.6 - 0.45 * 2.91 = 0.29 px the new way, read as 0 px about 70% of the time); a move of d >= 1 px
# always shifts the drawn pixel by >= 1. Only steps the physics moves by at least this much are graded.
MIN_VISIBLE_MOVE_PX = 1.0
# A graded step is followed when the read move the commanded way exceeds this: half the smallest graded move, so
# reading jitter on decoded frames (a blurred sprite's centroid) is not taken for motion. Ground truth reads >= 1 px.
FOLLOWED_MOVE_PX = 0.5
HEADLINE_METRICS = (
    "prompt_adherence",
    "action_following",
    "switch_frames_to_visible_mean",
    "switch_agent_jump_px_mean",
    "agent_found",
)


@dataclass(frozen=True)
class Rollout:
    """A generated stream: its frames, the settings each was generated under and the action held into each."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    settings: tuple[SceneSettings, ...]  # [T]
    actions: np.ndarray  # int64 [T]

    def __post_init__(self) -> None:
        frames, actions = self.frames, self.actions
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            detail = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
            raise ShapeError(f"rollout frames are {detail}; expected uint8 [T, H, W, 3]")
        if len(frames) == 0:
            raise ShapeError("rollout has no frames; expected uint8 [T, H, W, 3] with T >= 1")
        if not isinstance(actions, np.ndarray) or actions.shape != (len(frames),) or actions.dtype.kind not in "iu":
            detail = f"{actions.dtype} {actions.shape}" if isinstance(actions, np.ndarray) else type(actions).__name__
            raise ShapeError(f"rollout actions are {detail}; expected int64 [{len(frames)}] (one per frame)")
        if actions.min() < 0 or actions.max() >= len(Action):
            span = f"[{actions.min()}, {actions.max()}]"
            raise ConfigError(f"rollout action ids span {span}; expected ids in [0, {len(Action)})")
        if len(self.settings) != len(frames):
            count = f"{len(self.settings)} settings for {len(frames)} frames"
            raise ShapeError(f"rollout has {count}; expected one SceneSettings per frame")
        if not all(isinstance(s, SceneSettings) for s in self.settings):
            raise ConfigError("rollout settings must all be SceneSettings (parse_prompt makes one from text)")

    @property
    def switch_frames(self) -> tuple[int, ...]:
        """Frames t > 0 generated under a different prompt from frame t - 1."""
        return tuple(t for t in range(1, len(self.settings)) if self.settings[t] != self.settings[t - 1])

    @functools.cached_property
    def _readings(self) -> dict[WorldConfig, list[_Reading]]:
        """The frames as read, per config; filled on first use (the frames of a rollout are not meant to change)."""
        return {}


def rollout_from_episode(episode: Episode) -> Rollout:
    """The ground truth of an episode as a rollout: the reference every model is compared with."""
    return Rollout(episode.frames, tuple(episode.settings), episode.actions)


def window(rollout: Rollout, start: int, stop: int) -> Rollout:
    """Frames [start, stop) of a rollout (a switch at `start` itself is not seen as one)."""
    if not 0 <= start < stop <= len(rollout.frames):
        raise ConfigError(f"window [{start}, {stop}) must satisfy 0 <= start < stop <= {len(rollout.frames)} frames")
    return Rollout(rollout.frames[start:stop], rollout.settings[start:stop], rollout.actions[start:stop])


@dataclass(frozen=True)
class StreamMetrics:
    """What a stream scores; percentages in 0..100, NaN where nothing could be graded (e.g. no switches)."""

    frames: int
    prompt_adherence: float  # % of graded frames whose read scene is the prompt's
    graded_frames: int  # frames outside the grace after switches
    action_following: float  # % of action steps where the agent moves the commanded way
    action_steps: int
    switches: int
    switch_frames_to_visible_mean: float
    switch_frames_to_visible_max: float
    switches_never_visible: int  # not visible before the next switch (or the end); counted as the frames left
    switch_agent_jump_px_mean: float
    switch_agent_jump_px_max: float
    switch_jumps_measured: int
    switch_jumps_skipped: int  # switches at t < 2 or with the agent unread at t - 2, t - 1 or t
    agent_found: float  # % of frames where an agent is read
    slot_adherence: dict[str, float] = field(default_factory=dict)  # % of graded frames right per slot


@dataclass(frozen=True)
class _Reading:
    setting: SettingReading
    agent: AgentReading | None

    def scene_matches(self, settings: SceneSettings) -> bool:
        return all(self.slots_right(settings).values())

    def slots_right(self, settings: SceneSettings) -> dict[str, bool]:
        agent, setting = self.agent, self.setting
        return {
            "terrain": setting.terrain is settings.terrain,
            "weather": setting.weather is settings.weather,
            "time": setting.time is settings.time,
            "agent_shape": agent is not None and agent.shape is settings.agent_shape,
            "agent_colour": agent is not None and agent.colour is settings.agent_colour,
            "agent_found": agent is not None,
        }


def _read_all(rollout: Rollout, config: WorldConfig) -> list[_Reading]:
    # every metric works from these: reading is the slow part (~1-2 ms a frame), so each frame is read once
    if config not in rollout._readings:
        rollout._readings[config] = [_Reading(read_setting(f, config), read_agent(f, config)) for f in rollout.frames]
    return rollout._readings[config]


def _graded_mask(rollout: Rollout, response_grace: int) -> np.ndarray:
    """bool [T]: frames graded for adherence (all but the `response_grace` frames from each switch on)."""
    graded = np.ones(len(rollout.frames), dtype=bool)
    for t in rollout.switch_frames:
        graded[t : t + response_grace] = False
    return graded


def _percent(hits: int, total: int) -> float:
    return 100.0 * hits / total if total else math.nan


def _adherence(readings: list[_Reading], rollout: Rollout, graded: np.ndarray) -> tuple[float, dict[str, float]]:
    rights = [readings[t].slots_right(rollout.settings[t]) for t in np.flatnonzero(graded)]
    overall = _percent(sum(all(r.values()) for r in rights), len(rights))
    return overall, {slot: _percent(sum(r[slot] for r in rights), len(rights)) for slot in SLOT_NAMES}


def _positions(readings: list[_Reading]) -> np.ndarray:
    """float [T, 2]: the agent's read (x, y), NaN where it was not found."""
    return np.array([r.agent.xy if r.agent is not None else (math.nan, math.nan) for r in readings], dtype=np.float64)


def _limits(config: WorldConfig) -> tuple[np.ndarray, np.ndarray]:
    r = config.agent_radius_px
    return np.array([r, r], dtype=np.float64), np.array([config.width - 1 - r, config.height - 1 - r], dtype=np.float64)


def _directions(actions: np.ndarray) -> np.ndarray:
    """float [T, 2]: the unit (dx, dy) of every action (0, 0 for NONE)."""
    table = np.array([ACTION_DIRECTION[a] for a in Action], dtype=np.float64)
    return table[actions]


def _action_velocities(directions: np.ndarray, positions: np.ndarray, config: WorldConfig) -> np.ndarray:
    """float [T, 2]: the agent's velocity after each step as the physics makes it from the actions alone.

    The wall stops (velocity zeroed) are taken where the agent is read at a limit with its velocity into it; a
    window that starts mid-stream starts at rest, an error that shrinks by `velocity_retention` every frame.
    """
    low, high = _limits(config)
    velocity, velocities = np.zeros(2), np.empty_like(directions)
    for t, direction in enumerate(directions):
        velocity = config.velocity_retention * velocity + config.agent_accel_px * direction
        # a stopped agent sits exactly at the limit and is drawn at it, so it is read within half a pixel of it
        at_low, at_high = positions[t] <= low + 0.5, positions[t] >= high - 0.5
        velocity = np.where((at_low & (velocity < 0)) | (at_high & (velocity > 0)), 0.0, velocity)
        velocities[t] = velocity
    return velocities


def _room_to_move(position: np.ndarray, direction: np.ndarray, config: WorldConfig) -> float:
    """Pixels between the agent and the wall it is pushed against."""
    low, high = _limits(config)
    axis = int(np.flatnonzero(direction)[0])
    return float(high[axis] - position[axis]) if direction[axis] > 0 else float(position[axis] - low[axis])


def _action_following(readings: list[_Reading], rollout: Rollout, config: WorldConfig) -> tuple[float, int]:
    positions, directions = _positions(readings), _directions(rollout.actions)
    velocities = _action_velocities(directions, positions, config)
    followed = steps = 0
    for t in range(1, len(readings)):
        direction = directions[t]
        if not direction.any() or np.isnan(positions[t - 1 : t + 1]).any():
            continue
        if _room_to_move(positions[t - 1], direction, config) <= WALL_MARGIN_PX:
            continue
        if float(velocities[t] @ direction) < MIN_VISIBLE_MOVE_PX:
            continue
        steps += 1
        followed += float((positions[t] - positions[t - 1]) @ direction) > FOLLOWED_MOVE_PX
    return _percent(followed, steps), steps


def _switch_segments(rollout: Rollout) -> list[tuple[int, int]]:
    """(switch frame, frame the next prompt takes over or T) per switch."""
    starts = rollout.switch_frames
    return list(zip(starts, [*starts[1:], len(rollout.frames)]))


def _frames_to_visible(readings: list[_Reading], rollout: Rollout) -> tuple[list[int], int]:
    """Frames from each switch to the first frame showing its prompt, and how many never showed it.

    A prompt is only in force until the next switch, so one not shown by then counts the frames it had.
    """
    delays, never = [], 0
    for start, stop in _switch_segments(rollout):
        wanted = rollout.settings[start]
        delay = next((t - start for t in range(start, stop) if readings[t].scene_matches(wanted)), None)
        if delay is None:
            never += 1
            delay = stop - start
        delays.append(delay)
    return delays, never


def _switch_jumps(readings: list[_Reading], rollout: Rollout, config: WorldConfig) -> tuple[list[float], int]:
    """|read - predicted| agent position at every switch frame, and how many switches could not be measured.

    The prediction carries the velocity read from the two frames before on with the physics; a switch where the
    agent is missing in one of the three frames is skipped and counted rather than guessed across the gap.
    """
    positions, directions = _positions(readings), _directions(rollout.actions)
    low, high = _limits(config)
    jumps, skipped = [], 0
    for t in rollout.switch_frames:
        if t < 2 or np.isnan(positions[t - 2 : t + 1]).any():
            skipped += 1
            continue
        velocity = config.velocity_retention * (positions[t - 1] - positions[t - 2])
        predicted = np.clip(positions[t - 1] + velocity + config.agent_accel_px * directions[t], low, high)
        jumps.append(float(np.linalg.norm(positions[t] - predicted)))
    return jumps, skipped


def _mean_max(values: list[float]) -> tuple[float, float]:
    return (float(np.mean(values)), float(np.max(values))) if values else (math.nan, math.nan)


def stream_metrics(rollout: Rollout, config: WorldConfig = WorldConfig(), response_grace: int = 3) -> StreamMetrics:
    """Every metric of a rollout; `response_grace` frames from each switch on are left out of prompt adherence.

    Raises:
        ShapeError: frames not of the config's size.
        ConfigError: a negative response_grace.
    """
    if not isinstance(response_grace, int) or response_grace < 0:
        raise ConfigError(f"response_grace={response_grace!r} must be an integer >= 0 (frames after each switch)")
    if rollout.frames.shape[1:] != (config.height, config.width, 3):
        raise ShapeError(f"frames of shape {rollout.frames.shape[1:]}; expected [{config.height}, {config.width}, 3]")
    readings = _read_all(rollout, config)
    graded = _graded_mask(rollout, response_grace)
    adherence, slots = _adherence(readings, rollout, graded)
    following, steps = _action_following(readings, rollout, config)
    delays, never = _frames_to_visible(readings, rollout)
    jumps, skipped = _switch_jumps(readings, rollout, config)
    delay_mean, delay_max = _mean_max([float(d) for d in delays])
    jump_mean, jump_max = _mean_max(jumps)
    return StreamMetrics(
        frames=len(readings),
        prompt_adherence=adherence,
        graded_frames=int(graded.sum()),
        action_following=following,
        action_steps=steps,
        switches=len(delays),
        switch_frames_to_visible_mean=delay_mean,
        switch_frames_to_visible_max=delay_max,
        switches_never_visible=never,
        switch_agent_jump_px_mean=jump_mean,
        switch_agent_jump_px_max=jump_max,
        switch_jumps_measured=len(jumps),
        switch_jumps_skipped=skipped,
        agent_found=_percent(sum(r.agent is not None for r in readings), len(readings)),
        slot_adherence=slots,
    )


def _weighted_mean(pairs: Sequence[tuple[float, float]]) -> float:
    """The weighted mean of (value, weight) pairs, leaving out NaN values and zero weights (NaN if none is left)."""
    kept = [(value, weight) for value, weight in pairs if weight and not math.isnan(value)]
    total = sum(weight for _, weight in kept)
    return sum(value * weight for value, weight in kept) / total if total else math.nan


def pool_metrics(parts: Sequence[StreamMetrics]) -> StreamMetrics:
    """The metrics of several streams taken together, as if graded as one: each share weighted by what it counts
    (graded frames, action steps, switches, measured jumps, frames), maxima over all, counts summed.

    Raises:
        ConfigError: no streams.
    """
    if not parts:
        raise ConfigError("pool_metrics needs at least one stream's metrics")

    def mean(name: str, weight: str) -> float:
        return _weighted_mean([(getattr(p, name), getattr(p, weight)) for p in parts])

    def mean_of(slot: str) -> float:
        return _weighted_mean([(p.slot_adherence.get(slot, math.nan), p.graded_frames) for p in parts])

    def most(name: str) -> float:
        values = [getattr(p, name) for p in parts if not math.isnan(getattr(p, name))]
        return max(values) if values else math.nan

    def total(name: str) -> int:
        return sum(getattr(p, name) for p in parts)

    slots = sorted({slot for p in parts for slot in p.slot_adherence})
    return StreamMetrics(
        frames=total("frames"),
        prompt_adherence=mean("prompt_adherence", "graded_frames"),
        graded_frames=total("graded_frames"),
        action_following=mean("action_following", "action_steps"),
        action_steps=total("action_steps"),
        switches=total("switches"),
        switch_frames_to_visible_mean=mean("switch_frames_to_visible_mean", "switches"),
        switch_frames_to_visible_max=most("switch_frames_to_visible_max"),
        switches_never_visible=total("switches_never_visible"),
        switch_agent_jump_px_mean=mean("switch_agent_jump_px_mean", "switch_jumps_measured"),
        switch_agent_jump_px_max=most("switch_agent_jump_px_max"),
        switch_jumps_measured=total("switch_jumps_measured"),
        switch_jumps_skipped=total("switch_jumps_skipped"),
        agent_found=mean("agent_found", "frames"),
        slot_adherence={slot: mean_of(slot) for slot in slots},
    )


def adherence_over_time(
    rollout: Rollout, bucket_frames: int = 100, config: WorldConfig = WorldConfig(), response_grace: int = 3
) -> np.ndarray:
    """float [ceil(T / bucket_frames)]: prompt adherence % per bucket of frames (NaN for a bucket all grace)."""
    if not isinstance(bucket_frames, int) or bucket_frames < 1:
        raise ConfigError(f"bucket_frames={bucket_frames!r} must be a positive integer")
    if not isinstance(response_grace, int) or response_grace < 0:
        raise ConfigError(f"response_grace={response_grace!r} must be an integer >= 0 (frames after each switch)")
    readings = _read_all(rollout, config)
    graded = _graded_mask(rollout, response_grace)
    right = np.array([r.scene_matches(s) for r, s in zip(readings, rollout.settings)])
    buckets = []
    for start in range(0, len(readings), bucket_frames):
        part = slice(start, start + bucket_frames)
        buckets.append(_percent(int((right[part] & graded[part]).sum()), int(graded[part].sum())))
    return np.array(buckets, dtype=np.float64)


def drift(first: StreamMetrics, last: StreamMetrics) -> dict[str, float]:
    """last - first per headline metric (points for percentages, frames or px for the switch metrics)."""
    return {name: getattr(last, name) - getattr(first, name) for name in HEADLINE_METRICS}


def _cell(value: float, digits: int = 1) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def metrics_table(rows: dict[str, StreamMetrics]) -> str:
    """A markdown table, one row per named stream (e.g. "teacher 32 steps", "ground truth")."""
    if not rows:
        raise ConfigError("metrics_table needs at least one row")
    lines = [
        "| | prompt adherence % | action following % | switch frames to visible (mean / max) "
        "| agent jump px (mean / max) | agent found % |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows.items():
        lines.append(
            f"| {name} | {_cell(m.prompt_adherence)} | {_cell(m.action_following)} "
            f"| {_cell(m.switch_frames_to_visible_mean)} / {_cell(m.switch_frames_to_visible_max, 0)} "
            f"| {_cell(m.switch_agent_jump_px_mean, 2)} / {_cell(m.switch_agent_jump_px_max, 2)} "
            f"| {_cell(m.agent_found)} |"
        )
    return "\n".join(lines) + "\n"


def _pyplot():
    # imported on first plot only: matplotlib is slow to import and not needed for the metrics themselves
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(rows: dict[str, StreamMetrics], path: str | Path) -> Path:
    """A PNG bar chart of the headline metrics per named stream, for a model card; returns the path."""
    if not rows:
        raise ConfigError("plot_metrics needs at least one row")
    plt = _pyplot()
    panels = (
        ("prompt adherence %", "prompt_adherence"),
        ("action following %", "action_following"),
        ("agent found %", "agent_found"),
        ("switch frames to visible (mean)", "switch_frames_to_visible_mean"),
        ("agent jump at switch, px (mean)", "switch_agent_jump_px_mean"),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    names = list(rows)
    for ax, (title, attribute) in zip(axes, panels):
        values = [getattr(rows[name], attribute) for name in names]
        ax.bar(range(len(names)), np.nan_to_num(values), color=[f"C{i}" for i in range(len(names))])
        for i, value in enumerate(values):
            if math.isnan(value):  # nothing to grade (no switches, no agent): say so rather than draw a perfect 0
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if attribute in ("prompt_adherence", "action_following", "agent_found"):
            ax.set_ylim(0, 100)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_drift(series: dict[str, np.ndarray], bucket_frames: int, path: str | Path) -> Path:
    """A PNG line plot of prompt adherence % per bucket (from `adherence_over_time`) per named stream."""
    if not series:
        raise ConfigError("plot_drift needs at least one series")
    if not isinstance(bucket_frames, int) or bucket_frames < 1:
        raise ConfigError(f"bucket_frames={bucket_frames!r} must be a positive integer")
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(7, 3.6))
    for name, values in series.items():
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1:
            raise ShapeError(f"drift series {name!r} has shape {values.shape}; expected [buckets]")
        ax.plot((np.arange(len(values)) + 0.5) * bucket_frames, values, marker=".", label=name)
    ax.set_xlabel("frame")
    ax.set_ylabel("prompt adherence %")
    ax.set_ylim(0, 101)
    ax.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
