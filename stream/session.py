"""The live session: one stream that many clients watch and token holders steer.

    generation thread: [chunk boundary: apply controls | hold while paused] -> Producer.frames() -> bounded queue
    pacing thread:     queue -> at each frame's deadline -> frames relay (+ a chunk event to the events relay)
    event loop:        viewers read their mailboxes; `submit(control)` from any thread, acks come back by `reply`

Controls are applied between chunks, never inside one: at each chunk's media time, just before the chunk is made (the
latest moment they can still land in it), the generation thread takes everything submitted since the
previous boundary, keeps the newest control of each kind (pause and resume are one kind), applies those, and
acknowledges every control with the engine chunk index from which it is in effect (superseded ones with the index at
which their replacement took effect). So 1,000 prompt switches within one chunk cost one prompt encoding and one
recache. While paused the generation thread waits at the boundary and the media clock is shifted by the pause on
resume, so pts stay continuous and the deadline scheduler sees no lateness.

With a video input (`video`, stream/live_input.py: video-to-video), the generation thread encodes the input frames
that arrived since the previous chunk just before each chunk it generates and passes their latents to the engine
(`next_chunk(source=...)`); the encode counts in the chunk's time, so the deadline scheduler sees its cost. The
warm-up encodes a still gray input, then the encoder starts over.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import numpy as np

from framecast.models.errors import BadMessage, ConfigError, FrameCastError, SessionClosed
from framecast.stream.bench import engine_step_lists, warm_up
from framecast.stream.clock import check_fps, check_seconds
from framecast.stream.control import (
    ActionControl, Control, PauseControl, PromptControl, ResumeControl, SeedControl, StepsControl, encode,
    encode_ack, encode_error,
)
from framecast.stream.deadline import Action, DeadlineConfig, DeadlineScheduler, decoder_frame_rule
from framecast.stream.engine import LatentChunk
from framecast.stream.live_input import LiveVideo, check_video_input
from framecast.stream.metrics import StreamMetrics
from framecast.stream.producer import Decoder, Producer, VideoFrame
from framecast.stream.relay import Relay

log = logging.getLogger("framecast.session")

Reply = Callable[[str], None]  # where a control's ack or error goes (a viewer's event mailbox `put`); any thread
PromptEncoder = Callable[[str], Any]  # prompt text -> what the engine's set_prompt takes; may raise FrameCastError


class LiveEngine(Protocol):
    """What a session drives: StreamEngine, or the world simulator (stream/simulator.py)."""

    config: Any  # .denoising_steps and .chunk_frames (latent frames per chunk)
    chunk_index: int  # the next chunk's index

    @property
    def num_actions(self) -> int: ...
    def next_chunk(self, steps: Sequence[int] | None = None) -> LatentChunk: ...
    def set_prompt(self, prompt: Any) -> None: ...
    def set_action(self, action: int) -> None: ...
    def reseed(self, seed: int) -> None: ...
    def reset(self) -> None: ...


@dataclass(frozen=True)
class SessionConfig:
    """Settings of one live session, validated at construction."""

    fps: int | Fraction = 16
    latency_budget_s: float = 1.0  # from a frame's media time to when it is sent
    speed: float = 1.0  # media seconds per wall second: 1 is real time; tests run faster
    frame_capacity: int = 2  # per-viewer frame mailbox slots (overflow drops the oldest)
    event_capacity: int = 4096  # per-viewer event mailbox slots: acks of a burst of controls must fit
    queue_frames: int = 256  # frames between generation and pacing (generation is at most one budget ahead)
    max_pending_controls: int = 4096  # controls waiting for the next chunk boundary; more are refused
    warm_up: bool = True  # teach the deadline scheduler's cost model before streaming (as `framecast bench`)
    output_scale: int = 1  # frames are enlarged this many times (nearest) once, before every sink, not per viewer

    def __post_init__(self) -> None:
        check_fps(self.fps)
        check_seconds("latency_budget_s", self.latency_budget_s)
        if isinstance(self.speed, bool) or not isinstance(self.speed, (int, float)) or not 0 < self.speed < math.inf:
            raise ConfigError(f"speed={self.speed!r} must be a finite number > 0")
        for name in ("frame_capacity", "event_capacity", "queue_frames", "max_pending_controls", "output_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")


def upscale(frame: VideoFrame, scale: int) -> VideoFrame:
    """The frame enlarged `scale` times by pixel repetition (sharp edges: small models' frames stay readable)."""
    if scale == 1:
        return frame
    rgb = np.repeat(np.repeat(frame.rgb, scale, axis=0), scale, axis=1)
    return dataclasses.replace(frame, rgb=rgb)


class ScaledTime:
    """Monotonic seconds running `speed` times faster than the wall clock (speed 1: plain time.monotonic)."""

    def __init__(self, speed: float) -> None:
        self.speed, self.origin = float(speed), time.monotonic()

    def now(self) -> float:
        return self.origin + (time.monotonic() - self.origin) * self.speed

    def wall_seconds(self, seconds: float) -> float:
        return seconds / self.speed


class _Stopped(Exception):
    """Raised inside the generation thread when the session closes (never escapes it)."""


class _SteppedEngine:
    """The engine as the producer sees it: the client's step cap applied to the scheduler's step lists, and the
    video input's next latents passed along (video-to-video)."""

    def __init__(self, engine: LiveEngine, step_lists: Sequence[tuple[int, ...]], video: LiveVideo | None) -> None:
        self.engine, self.step_lists, self.video = engine, tuple(step_lists), video
        self.max_steps: int | None = None

    def next_chunk(self, steps: Sequence[int] | None = None) -> LatentChunk:
        if self.max_steps is not None and steps is not None and len(steps) > self.max_steps:
            # the best degradation list within the cap (the cheapest one has a single step, so one always fits)
            # (a sampler with fixed steps -- rolling window, stream batch -- has only its full list: it keeps it)
            steps = next((s for s in self.step_lists if len(s) <= self.max_steps), self.step_lists[0])
        source = None if self.video is None else self.video.next_latents()
        if source is None:  # no video input, or it closed because the session is closing
            return self.engine.next_chunk(steps)
        return self.engine.next_chunk(steps, source=source)


class _StillVideoEngine:
    """The engine as the warm-up sees it with a video input: every chunk encodes a still input first (so the cost
    model learns the encoder's cost too) without taking live frames; `reset` starts the encoder over as well."""

    def __init__(self, engine: LiveEngine, video: LiveVideo) -> None:
        self.engine, self.video = engine, video

    def next_chunk(self, steps: Sequence[int] | None = None) -> LatentChunk:
        return self.engine.next_chunk(steps, source=self.video.still_latents())

    def reset(self) -> None:
        self.engine.reset()
        self.video.reset()


@dataclass(frozen=True)
class _Pending:
    control: Control
    seq: int
    reply: Reply


class Session:
    """Owns the engine, the deadline scheduler and the producer; runs them in their own threads once started.

    `frames` and `events` are the relays viewers subscribe to (events: JSON text, see stream/control.py). Controls
    need the session's `token` (viewers without it can only watch). `video`: input video for video-to-video (the
    session starts and closes it).

    Raises:
        ConfigError: `video` is given and the engine takes no video input.
    """

    def __init__(
        self,
        engine: LiveEngine,
        decoder: Decoder,
        encode_prompt: PromptEncoder,
        config: SessionConfig | None = None,
        *,
        token: str | None = None,
        session_id: str | None = None,
        video: LiveVideo | None = None,
    ) -> None:
        if video is not None:
            check_video_input(engine)
        self.engine, self.decoder, self.encode_prompt, self.video = engine, decoder, encode_prompt, video
        self.config = config = config if config is not None else SessionConfig()
        self.id = session_id if session_id is not None else secrets.token_hex(4)
        self.token = token if token is not None else secrets.token_urlsafe(16)
        self.num_actions = engine.num_actions
        self.time = ScaledTime(config.speed)
        step_lists = engine_step_lists(engine)
        self.scheduler = DeadlineScheduler(
            DeadlineConfig(fps=config.fps, latency_budget_s=config.latency_budget_s, step_lists=step_lists,
                           chunk_frames=engine.config.chunk_frames, **decoder_frame_rule(decoder)),
            now=self.time.now,
        )
        self.metrics = StreamMetrics(now=self.time.now, start_s=self.scheduler.clock.start_s)
        self._stepped = _SteppedEngine(engine, step_lists, video)
        self.frames: Relay[VideoFrame] = Relay(config.frame_capacity)
        self.events: Relay[str] = Relay(config.event_capacity)
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._is_stopping = False
        self._stop = threading.Event()  # wakes the sleeping threads
        self._queue: queue.Queue[tuple[VideoFrame, str | None] | None] = queue.Queue(config.queue_frames)
        self._threads: list[threading.Thread] = []
        self.is_paused = False
        self.prompt_switches = 0  # prompt switches applied to the engine (after coalescing)
        self.controls_applied = 0
        self.controls_superseded = 0
        self.failure: BaseException | None = None

    # the client side (event loop thread)
    def can_steer(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.token.encode())

    def submit(self, control: Control, *, token: str | None, seq: int, reply: Reply) -> None:
        """Queue a control for the next chunk boundary; its ack (or error) goes to `reply` later. Any thread.

        Raises:
            BadMessage: the token does not allow steering, or too many controls are already pending.
            SessionClosed: the session is closed.
        """
        if not self.can_steer(token):
            raise BadMessage(f"{control.type}: not allowed without the session token (this connection can only watch)")
        with self._cond:
            if self._is_stopping:
                raise SessionClosed(f"session {self.id} is closed")
            if len(self._pending) >= self.config.max_pending_controls:
                raise BadMessage(
                    f"{control.type}: {len(self._pending)} controls are already waiting for the next chunk; "
                    "slow down"
                )
            self._pending.append(_Pending(control, seq, reply))
            self._cond.notify_all()

    def hello(self, *, can_steer: bool, frame_format: str) -> str:
        """The first message a viewer gets: what it is watching and whether it may steer."""
        return encode("hello", session=self.id, can_steer=can_steer, fps=str(Fraction(self.config.fps)),
                      format=frame_format, num_actions=self.num_actions, paused=self.is_paused,
                      latency_budget_s=self.config.latency_budget_s)

    # lifecycle
    def start(self) -> None:
        """Start the generation and pacing threads (once)."""
        if self._threads:
            raise RuntimeError(f"session {self.id} is already started")
        if self.video is not None:
            self.video.start()
        self._threads = [
            threading.Thread(target=self._generate, name=f"framecast-session-{self.id}", daemon=True),
            threading.Thread(target=self._pace, name=f"framecast-pacer-{self.id}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the threads and close the relays (idempotent; blocks until the threads end, at most timeout_s)."""
        with self._cond:
            self._is_stopping = True
            self._cond.notify_all()
        self._stop.set()
        if self.video is not None:
            self.video.close()  # wakes a generation thread waiting for input frames
        for thread in self._threads:
            thread.join(timeout_s)
        self.frames.close()
        self.events.close()

    @property
    def is_running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    # the generation thread
    def _generate(self) -> None:
        try:
            if self.config.warm_up:
                warm_up(self.engine if self.video is None else _StillVideoEngine(self.engine, self.video),
                        self.decoder, self.scheduler)
            clock = self.scheduler.clock
            clock.restart()
            self.metrics.start_s = clock.start_s
            producer = Producer(self._stepped, self.decoder, self.scheduler, self.metrics,
                                sleep=lambda s: self._stop.wait(self.time.wall_seconds(s)), before_chunk=self._boundary)
            frames_of = self.scheduler.config.frames
            chunk = 0
            for frame in producer.frames():
                while frame.index >= frames_of(chunk).stop:  # the next scheduler chunk (a dropped one has no frames)
                    chunk += 1
                frames = frames_of(chunk)
                self._enqueue(frame, self._chunk_event(frame, frames) if frame.index == frames.start else None)
        except _Stopped:
            pass
        except Exception as exc:  # anything else ends this session only, loudly
            log.exception("session %s: the stream failed", self.id)
            self.failure = exc
            self.events.publish(encode("error", seq=None, id=None, error=f"the stream failed: {exc}"))
        finally:
            self._enqueue_final()

    def _chunk_event(self, frame: VideoFrame, frames: range) -> str:
        record = self.scheduler.records[-len(frames)]  # this chunk's first frame: its deadline binds the chunk
        generated = frame.action is Action.GENERATE
        return encode(
            "chunk", chunk=self.engine.chunk_index - 1 if generated else None, first_frame=frame.index,
            frames=len(frames), action=frame.action.value, steps=record.steps,
            slack_s=None if record.completed_s is None else round(record.deadline_s - record.completed_s, 6),
        )

    def _enqueue(self, frame: VideoFrame, event: str | None) -> None:
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                self._queue.put((frame, event), timeout=0.1)
                return
            except queue.Full:
                continue

    def _enqueue_final(self) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(None, timeout=0.1)
                return
            except queue.Full:
                continue

    def _boundary(self) -> None:
        """At a chunk's media time, before it is made: apply what was submitted, and hold here while paused."""
        # the first chunk a control given now reaches: the next one the engine makes (the generator is suspended);
        # with stream batch, the next to enter its first step slot
        chunk = getattr(self.engine, "controls_reach", self.engine.chunk_index)
        clock = self.scheduler.clock
        paused_since = None
        while True:
            with self._cond:
                while self.is_paused and not self._pending and not self._is_stopping:
                    self._cond.wait()
                if self._is_stopping:
                    raise _Stopped
                pending, self._pending = self._pending, []
            if pending:
                self._apply(pending, chunk)
            if not self.is_paused:
                break
            if paused_since is None:
                paused_since = clock.now()
        if paused_since is not None:  # media time stood still: shift the clock, pts stay continuous
            clock.restart(clock.start_s + clock.now() - paused_since)

    def _apply(self, pending: list[_Pending], chunk: int) -> None:
        newest: dict[str, _Pending] = {}
        for item in pending:
            kind = "run" if isinstance(item.control, (PauseControl, ResumeControl)) else item.control.type
            newest[kind] = item
        errors: dict[int, str] = {}  # id(item) -> why applying it failed
        for item in newest.values():
            try:
                self._apply_one(item.control)
            except FrameCastError as exc:
                errors[id(item)] = f"{item.control.type}: {exc}"
                log.info("session %s: %s control refused at chunk %d: %s", self.id, item.control.type, chunk, exc)
        winners = {id(item) for item in newest.values()}
        for item in pending:
            if id(item) in errors:
                item.reply(encode_error(item.seq, errors[id(item)], item.control.id))
                continue
            is_superseded = id(item) not in winners
            self.controls_superseded += is_superseded
            self.controls_applied += not is_superseded
            item.reply(encode_ack(item.seq, item.control, chunk, superseded=is_superseded))

    def _apply_one(self, control: Control) -> None:
        engine = self.engine
        if isinstance(control, PromptControl):
            engine.set_prompt(self.encode_prompt(control.text))
            self.prompt_switches += 1
        elif isinstance(control, ActionControl):
            engine.set_action(control.action)
        elif isinstance(control, SeedControl):
            engine.reseed(control.seed)
        elif isinstance(control, StepsControl):
            self._stepped.max_steps = control.steps
        else:
            self.is_paused = isinstance(control, PauseControl)

    # the pacing thread
    def _pace(self) -> None:
        """Send each frame at its deadline (at once when late), as a sink would show it."""
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is None:
                break
            frame, event = item
            wait_s = self.time.wall_seconds(frame.deadline_s - self.time.now())
            if wait_s > 0 and self._stop.wait(wait_s):
                break
            if event is not None:
                self.events.publish(event)
            self.frames.publish(upscale(frame, self.config.output_scale))
            self.metrics.frame_at_sink()
        self.frames.close()
        self.events.close()
