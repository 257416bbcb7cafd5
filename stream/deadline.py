"""Per-frame deadlines: how much work the next chunk can afford, decided chunk by chunk.

    plan() -> Decision -> generate with decision.steps | fill from the last frame | nothing -> observe() -> FrameRecords

The degradation ladder, best rung first, is `DeadlineConfig.ladder`: each step list of `step_lists` (the full distilled
schedule, then shorter sub-lists of it), then fill the chunk's frames from the last frame (repeat or interpolate; the
engine skips the chunk), then drop them. `plan` keeps the current rung unless the cost model predicts that the chunk
would miss its deadline; then it goes down to the first rung predicted to make it. It climbs back one rung at a time,
only after `recovery_chunks` plans in a row in which the rung above would have made it with `recovery_slack_s` to
spare. Pure and single-threaded: time comes from the media clock's injected source, so the same observations at the
same times give the same decisions.
"""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

from framecast.models.errors import ConfigError
from framecast.stream.clock import MediaClock, check_fps, check_seconds

NUM_TRAIN_TIMESTEPS = 1000  # as in stream/sampler.py (not imported: this module stays free of torch)
DEFAULT_STEP_LISTS = ((1000, 750, 500, 250), (1000, 500), (1000,))


class Fill(enum.Enum):
    """How a chunk's frames are filled when no step list can make its deadline."""

    REPEAT = "repeat"  # show the last frame again: costs nothing, the picture freezes
    INTERPOLATE = "interpolate"  # synthesise frames from the last ones: smoother, costs an interpolator pass


class Action(enum.Enum):
    """What happens to one chunk's frames."""

    GENERATE = "generate"  # the engine denoises the chunk with `Decision.steps`
    REPEAT = "repeat"  # the engine skips the chunk; its frames repeat the last frame
    INTERPOLATE = "interpolate"  # the engine skips the chunk; its frames are interpolated from the last ones
    DROP = "drop"  # the engine skips the chunk and no frames are sent for it


class Degradation(enum.Enum):
    """The kinds of degradation, in the order the scheduler reaches for them."""

    FEWER_STEPS = "fewer_steps"
    REPEAT = "repeat"
    INTERPOLATE = "interpolate"
    DROP = "drop"


@dataclass(frozen=True)
class Rung:
    """One rung of the degradation ladder."""

    action: Action
    steps: tuple[int, ...] = ()  # raw denoising step list; empty unless action is GENERATE


def check_step_lists(step_lists: object) -> None:
    """Raises ConfigError unless `step_lists` is a non-empty tuple of step lists, each a strictly shorter sub-list of
    the first that keeps its first step (a distilled model only knows the timesteps it was trained on)."""
    if not isinstance(step_lists, tuple) or not step_lists:
        example = DEFAULT_STEP_LISTS
        raise ConfigError(f"step_lists={step_lists!r} must be a non-empty tuple of step lists, e.g. {example}")
    full = step_lists[0]
    for index, steps in enumerate(step_lists):
        name = f"step_lists[{index}]={steps!r}"
        if not isinstance(steps, tuple) or not steps:
            raise ConfigError(f"{name} must be a non-empty tuple of timesteps")
        if any(isinstance(s, bool) or not isinstance(s, int) or not 0 < s <= NUM_TRAIN_TIMESTEPS for s in steps):
            raise ConfigError(f"{name} must hold integers in [1, {NUM_TRAIN_TIMESTEPS}]")
        if list(steps) != sorted(set(steps), reverse=True):
            raise ConfigError(f"{name} must strictly descend")
        if index == 0:
            continue
        previous = f"step_lists[{index - 1}]={step_lists[index - 1]!r}"
        if len(steps) >= len(step_lists[index - 1]):
            raise ConfigError(f"{name} must have fewer steps than {previous}")
        if steps[0] != full[0] or not set(steps) <= set(full):
            raise ConfigError(f"{name} must be a sub-list of step_lists[0]={full!r} keeping its first step {full[0]}")


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r} must be an integer >= {low}")


def decoder_frame_rule(decoder: object) -> dict[str, int]:
    """A decoder's video frames per latent frame (`frames_per_latent`, `first_latent_frames` attributes); the Wan
    VAE's rule (1, then 4 each) for decoders that do not say."""
    return {"frames_per_latent": getattr(decoder, "frames_per_latent", 4),
            "first_latent_frames": getattr(decoder, "first_latent_frames", 1)}


@dataclass(frozen=True)
class DeadlineConfig:
    """The deadline scheduler's settings, validated at construction.

    Frame i of the stream is due `latency_budget_s` after its media time i/fps. A chunk of `chunk_frames` latent
    frames decodes to `frames_per_latent` video frames per latent frame, except the stream's very first latent frame,
    which decodes to `first_latent_frames` (the Wan VAE's rule: 1, then 4 each).
    """

    fps: int | Fraction = 16  # Wan's frame rate
    latency_budget_s: float = 1.0
    step_lists: tuple[tuple[int, ...], ...] = DEFAULT_STEP_LISTS  # best first; degradation walks down this list
    fill: Fill = Fill.REPEAT
    chunk_frames: int = 3
    frames_per_latent: int = 4
    first_latent_frames: int = 1
    recovery_chunks: int = 4  # plans in a row with slack before climbing one rung: no flapping on noisy timings
    recovery_slack_s: float = 0.0  # slack the rung above must leave beyond the cost model's own margin
    probe_chunks: int = 4  # generate (cheapest list) after this many chunks without generating; 0: never

    def __post_init__(self) -> None:
        check_fps(self.fps)
        check_seconds("latency_budget_s", self.latency_budget_s)
        check_step_lists(self.step_lists)
        if not isinstance(self.fill, Fill):
            raise ConfigError(f"fill={self.fill!r} must be one of {[f.value for f in Fill]}")
        for name, low in (("chunk_frames", 1), ("frames_per_latent", 1), ("recovery_chunks", 1), ("probe_chunks", 0)):
            _check_int(name, getattr(self, name), low)
        _check_int("first_latent_frames", self.first_latent_frames, 1)
        if self.first_latent_frames > self.frames_per_latent:
            raise ConfigError(
                f"first_latent_frames={self.first_latent_frames} must be in "
                f"[1, frames_per_latent={self.frames_per_latent}]"
            )
        check_seconds("recovery_slack_s", self.recovery_slack_s)

    @property
    def ladder(self) -> tuple[Rung, ...]:
        """The declared degradation order, best first: every step list, then the fill, then drop."""
        return (
            *(Rung(Action.GENERATE, steps) for steps in self.step_lists),
            Rung(Action(self.fill.value)),
            Rung(Action.DROP),
        )

    def frames(self, chunk: int) -> range:
        """Video frame indices of stream chunk `chunk` (skipped chunks count: their frames keep their slots)."""

        def decoded(latents: int) -> int:  # video frames from the stream's first `latents` latent frames
            return 0 if latents == 0 else self.first_latent_frames + (latents - 1) * self.frames_per_latent

        return range(decoded(chunk * self.chunk_frames), decoded((chunk + 1) * self.chunk_frames))


class CostPredictor(Protocol):
    """What the scheduler needs from a cost model (tests inject oracles through this)."""

    def predict(self, action: Action, steps: int) -> float:
        """Seconds one chunk is expected to take, margin included; steps is 0 unless action is GENERATE."""

    def observe(self, action: Action, steps: int, stage_seconds: Mapping[str, float]) -> None:
        """Learn from one finished chunk's seconds per stage."""

    def forget(self, action: Action) -> None:
        """Drop what was learned about an action: its next observation starts the estimate afresh."""


class Ewma:
    """Exponentially weighted mean and variance of one series (West's incremental form).

    The n-th sample gets weight max(alpha, 1/n): the first samples are averaged equally, so the estimate is never
    pulled toward an arbitrary initial value, and after 1/alpha samples it forgets geometrically.
    """

    def __init__(self, alpha: float) -> None:
        self.alpha, self.mean, self.var, self.count = alpha, 0.0, 0.0, 0

    def update(self, x: float) -> None:
        self.count += 1
        weight = max(self.alpha, 1.0 / self.count)
        diff = x - self.mean
        self.mean += weight * diff
        self.var = (1.0 - weight) * (self.var + weight * diff * diff)

    @property
    def std(self) -> float:
        return math.sqrt(self.var)


class CostModel:
    """Online estimate of a chunk's seconds, per stage and per step count.

    Each (action, stage) keeps an EWMA of its seconds per unit of work: one denoising step for the stages in
    `per_step_stages` (each step is one DiT call of the same cost whatever its timestep), one chunk for the others
    (context pass, decode, fill). A chunk of `steps` steps is predicted as the sum over stages of
    units * (mean + margin_sigmas * std); summing the margins treats stages as correlated, which slowdowns are
    (throttling or a neighbour slows every stage at once).

    Why per step rather than a table per step count: the scheduler stops running the step counts it left, so their
    entries go stale; after a slowdown passes, a table would still hold the slow full-step cost and the scheduler
    would never climb back. Here every generated chunk refreshes the estimate for every step count.

    Cold start: the first `warmup` observations of each action are not learned (compilation, autotuning and
    allocator warm-up make them unrepresentative). Until an action has been learned its predicted cost is 0, so the
    stream starts at full quality and measures; a stage absent from a later observation counts as 0 seconds for that
    chunk (an occasional stage such as a prompt recache is averaged in, not added to every chunk).

    Raises:
        ConfigError: alpha outside (0, 1], margin_sigmas negative or not finite, warmup negative, per_step_stages
            a bare string.
    """

    def __init__(
        self,
        alpha: float = 0.25,
        margin_sigmas: float = 2.0,
        per_step_stages: Collection[str] = ("denoise",),
        warmup: int = 1,
    ) -> None:
        if not _is_real(alpha) or not 0 < alpha <= 1:
            raise ConfigError(f"alpha={alpha!r} must be in (0, 1]")
        if not _is_real(margin_sigmas) or not 0 <= margin_sigmas < math.inf:
            raise ConfigError(f"margin_sigmas={margin_sigmas!r} must be a finite number >= 0")
        _check_int("warmup", warmup, 0)
        if isinstance(per_step_stages, str):  # frozenset("denoise") would be a set of letters
            raise ConfigError(f"per_step_stages={per_step_stages!r} must be a collection of stage names: ('denoise',)")
        self.alpha, self.margin_sigmas, self.warmup = float(alpha), float(margin_sigmas), warmup
        self.per_step_stages = frozenset(per_step_stages)
        self._stages: dict[Action, dict[str, Ewma]] = {}
        self._seen: dict[Action, int] = {}

    def _units(self, action: Action, stage: str, steps: int) -> int:
        return steps if action is Action.GENERATE and stage in self.per_step_stages else 1

    def observe(self, action: Action, steps: int, stage_seconds: Mapping[str, float]) -> None:
        """Learn from one chunk: `stage_seconds` maps stage names to the seconds they took.

        Raises:
            ValueError: a stage time that is negative or not finite (it would poison the average for good).
        """
        for stage, seconds in stage_seconds.items():
            if not math.isfinite(seconds) or seconds < 0:
                raise ValueError(f"stage_seconds[{stage!r}]={seconds!r} must be finite and >= 0")
        self._seen[action] = self._seen.get(action, 0) + 1
        if self._seen[action] <= self.warmup:
            return
        stages = self._stages.setdefault(action, {})
        for stage in sorted(set(stages) | set(stage_seconds)):  # sorted: the same floats in the same order
            units = self._units(action, stage, steps)
            stages.setdefault(stage, Ewma(self.alpha)).update(stage_seconds.get(stage, 0.0) / units)

    def forget(self, action: Action) -> None:
        """Drop the estimates of an action (the warm-up is not repeated); the next observation starts them afresh."""
        self._stages.pop(action, None)

    def estimate(self, action: Action, stage: str) -> Ewma | None:
        """The learned seconds per unit of one stage, or None before it has been learned."""
        return self._stages.get(action, {}).get(stage)

    def predict(self, action: Action, steps: int) -> float:
        """Seconds one chunk is expected to take, margin included (0 until the action has been learned)."""
        return sum(
            (self._units(action, stage, steps) * (ewma.mean + self.margin_sigmas * ewma.std)
             for stage, ewma in sorted(self._stages.get(action, {}).items())),
            0.0,
        )


@dataclass(frozen=True)
class Decision:
    """What to do with one chunk, and why: its predicted completion against its first frame's deadline."""

    chunk: int  # stream chunk number (skipped chunks count)
    frames: range  # the video frames it covers on the media clock
    action: Action
    steps: tuple[int, ...]  # raw step list to denoise with; () unless action is GENERATE
    rung: int  # position on DeadlineConfig.ladder (0 = full steps)
    start_s: float  # when the chunk starts (clock source seconds)
    predicted_s: float  # predicted seconds of work, margin included
    deadline_s: float  # deadline of its first frame: a chunk's frames all complete together, so the first binds
    is_probe: bool = False  # generated against the prediction, to re-measure a cost that may be stale

    @property
    def predicted_done_s(self) -> float:
        return self.start_s + self.predicted_s

    @property
    def slack_s(self) -> float:
        """Predicted seconds to spare before the deadline (negative: predicted late)."""
        return self.deadline_s - self.predicted_done_s

    @property
    def degradation(self) -> Degradation | None:
        """The kind of degradation this decision is, or None at full quality."""
        if self.action is Action.GENERATE:
            return Degradation.FEWER_STEPS if self.rung > 0 else None
        return Degradation(self.action.value)


@dataclass(frozen=True)
class FrameRecord:
    """What happened to one video frame."""

    frame: int
    pts: int
    deadline_s: float
    completed_s: float | None  # when it was ready at the sink; None if dropped
    steps: int  # denoising steps of the chunk that made it; 0 if filled or dropped
    action: Action
    chunk: int

    @property
    def is_missed(self) -> bool:
        """Dropped, or ready after its deadline."""
        return self.completed_s is None or self.completed_s > self.deadline_s


class DeadlineScheduler:
    """Plans each chunk against its frames' deadlines and records what happened to every frame.

    Every `plan()` must be followed, in any order, by one `observe()` of its decision (a drop's too); a pipelined
    orchestrator may plan the next chunk before the previous one is observed. Not thread-safe: one orchestrator
    thread drives it. `records` keeps the newest `history_frames` frame records; the totals cover the whole stream.
    """

    def __init__(
        self,
        config: DeadlineConfig,
        cost_model: CostPredictor | None = None,
        *,
        now: Callable[[], float] = time.monotonic,
        start_s: float | None = None,
        history_frames: int = 4096,
    ) -> None:
        _check_int("history_frames", history_frames, 1)
        self.config = config
        self.cost_model = cost_model if cost_model is not None else CostModel()
        self.clock = MediaClock(config.fps, config.latency_budget_s, now=now, start_s=start_s)
        self.ladder = config.ladder
        self.rung = 0
        self.records: deque[FrameRecord] = deque(maxlen=history_frames)
        self.frames_total = 0
        self.frames_missed = 0
        self._next_chunk = 0
        self._pending: set[int] = set()
        self._has_generated = False
        self._calm = 0  # plans in a row in which the rung above would have made it
        self._idle = 0  # chunks in a row without generating

    @property
    def miss_rate(self) -> float:
        """Missed frames (late or dropped) over observed frames; 0.0 before any."""
        return self.frames_missed / self.frames_total if self.frames_total else 0.0

    def _predicted_s(self, rung: Rung) -> float:
        if rung.action is Action.DROP:
            return 0.0
        return self.cost_model.predict(rung.action, len(rung.steps))

    def _fits(self, rung: int, start_s: float, deadline_s: float, slack_s: float = 0.0) -> bool:
        return start_s + self._predicted_s(self.ladder[rung]) + slack_s <= deadline_s

    def plan(self, start_s: float | None = None) -> Decision:
        """Decide the next chunk. `start_s`: when it will start (default now; a pipelined orchestrator passes when the
        stage it waits for frees up)."""
        config, chunk = self.config, self._next_chunk
        frames = config.frames(chunk)
        start = self.clock.now() if start_s is None else float(start_s)
        deadline = self.clock.deadline_s(frames.start)
        cheapest = len(config.step_lists) - 1
        # nothing to repeat or interpolate before the first generated frame: the stream must start somehow
        floor = len(self.ladder) - 1 if self._has_generated else cheapest
        if self.rung > 0:
            self._climb(start, deadline, fill_rung=cheapest + 1)
        # a rung that generates nothing learns nothing: without probes a cost measured during a slowdown that has
        # passed could keep the stream filling forever; only probe while the chunk can still make its deadline
        is_probe = self.rung > cheapest and 0 < config.probe_chunks <= self._idle and start < deadline
        rung = cheapest if is_probe else self.rung
        while not is_probe and rung < floor and not self._fits(rung, start, deadline):
            rung += 1  # down the ladder, in the declared order, to the first rung predicted to make it
        if rung != self.rung:
            self.rung, self._calm = rung, 0
        action, steps = self.ladder[rung].action, self.ladder[rung].steps
        self._has_generated |= action is Action.GENERATE
        self._idle = 0 if action is Action.GENERATE else self._idle + 1
        self._pending.add(chunk)
        self._next_chunk += 1
        predicted = self._predicted_s(self.ladder[rung])
        return Decision(chunk, frames, action, steps, rung, start, predicted, deadline, is_probe)

    def _climb(self, start_s: float, deadline_s: float, fill_rung: int) -> None:
        """One rung up after recovery_chunks plans in a row in which the rung above fits with recovery_slack_s."""
        calm = self._fits(self.rung - 1, start_s, deadline_s, self.config.recovery_slack_s)
        self._calm = self._calm + 1 if calm else 0
        # from a drop to the fill at once: the viewer sees the same frozen frame, only now it is on time
        needed = 1 if self.rung - 1 == fill_rung else self.config.recovery_chunks
        if self._calm >= needed:
            self.rung, self._calm = self.rung - 1, 0

    def observe(
        self,
        decision: Decision,
        stage_seconds: Mapping[str, float] | None = None,
        completed_at: float | None = None,
    ) -> tuple[FrameRecord, ...]:
        """Learn from a planned chunk and record its frames. `stage_seconds`: seconds per stage (e.g. the engine's
        "denoise" and "context", the sink's "decode"; "repeat" for a fill); `completed_at`: when its frames were
        ready at the sink (default now). A drop needs neither. Returns the chunk's frame records.

        Raises:
            RuntimeError: the decision was not planned by this scheduler or was already observed.
            ValueError: a stage time that is negative or not finite.
        """
        if decision.chunk not in self._pending:
            raise RuntimeError(f"chunk {decision.chunk} was not planned or was already observed")
        dropped = decision.action is Action.DROP
        if decision.is_probe:  # the estimate it was made against is suspect: let the probe's measurement replace it
            self.cost_model.forget(decision.action)
        if not dropped:
            self.cost_model.observe(decision.action, len(decision.steps), stage_seconds or {})
        self._pending.discard(decision.chunk)
        done = None if dropped else (self.clock.now() if completed_at is None else float(completed_at))
        records = tuple(
            FrameRecord(
                frame, self.clock.pts(frame), self.clock.deadline_s(frame), done, len(decision.steps), decision.action,
                decision.chunk,
            )
            for frame in decision.frames
        )
        self.records.extend(records)
        self.frames_total += len(records)
        self.frames_missed += sum(record.is_missed for record in records)
        return records
