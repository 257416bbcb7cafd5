"""The producer: engine -> decoder -> video frames on the media clock, under the deadline scheduler.

    for each chunk: wait for its media time -> plan -> generate (with the planned steps) | fill | drop -> observe

A chunk is not started before its first frame's media time (live content is generated as late as it can be, so
controls take effect quickly) and must be ready `latency_budget_s` after it. Frames come out as soon as they exist,
with their pts; presenting each at its time is the sink's job (its own thread), so generation never waits on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from framecast.stream.deadline import Action, DeadlineScheduler
from framecast.stream.engine import StreamEngine
from framecast.stream.metrics import StreamMetrics


class Decoder(Protocol):
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...  # [B, F, C, H, W] -> uint8 [B, F', H', W', 3]


@dataclass(frozen=True)
class VideoFrame:
    index: int  # video frame index on the media clock
    pts: int  # in the clock's time base (90 kHz)
    deadline_s: float  # monotonic time by which the sink should show it
    rgb: np.ndarray  # uint8 [H, W, 3]
    action: Action  # GENERATE, or the fill that made it


def fill_frames(action: Action, previous: np.ndarray, last: np.ndarray, count: int) -> np.ndarray:
    """Frames for a chunk the engine skipped: the last frame again (REPEAT), or the last frame continued along the
    motion of the last two with a decaying step (INTERPOLATE: smoother than a freeze, never overshoots far)."""
    if action is Action.REPEAT:
        return np.repeat(last[None], count, axis=0)
    motion = last.astype(np.float32) - previous.astype(np.float32)
    weights = 1.0 - 0.5 ** np.arange(1, count + 1, dtype=np.float32)  # 0.5, 0.75, ... -> at most one frame ahead
    frames = last.astype(np.float32)[None] + weights[:, None, None, None] * motion[None]
    return np.clip(frames.round(), 0, 255).astype(np.uint8)


class Producer:
    def __init__(
        self,
        engine: StreamEngine,
        decoder: Decoder,
        scheduler: DeadlineScheduler,
        metrics: StreamMetrics | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        before_chunk: Callable[[], None] | None = None,
    ) -> None:
        self.engine, self.decoder, self.scheduler, self.metrics = engine, decoder, scheduler, metrics
        self.sleep = sleep
        # called at each chunk's media time, just before it is planned: the latest moment controls can still land in it
        self.before_chunk = before_chunk
        self._chunk = 0
        self._recent: list[np.ndarray] = []  # the last two frames made, for fills

    def _wait_for_media_time(self, frame: int) -> None:
        clock = self.scheduler.clock
        ahead = clock.deadline_s(frame) - clock.latency_budget_s - clock.now()
        if ahead > 0:
            self.sleep(ahead)

    def _generate(self, steps: tuple[int, ...]) -> tuple[np.ndarray, dict[str, float]]:
        now = self.scheduler.clock.now
        start = now()
        chunk = self.engine.next_chunk(steps)
        generated = now()
        frames = self.decoder.decode(chunk.latents)[0].numpy()
        return frames, {"denoise": generated - start, "decode": now() - generated}

    def frames(self) -> Iterator[VideoFrame]:
        """Video frames forever, in order; a dropped chunk's frames are skipped (their indices never appear)."""
        clock = self.scheduler.clock
        while True:
            self._wait_for_media_time(self.scheduler.config.frames(self._chunk).start)
            if self.before_chunk is not None:
                self.before_chunk()
            decision = self.scheduler.plan()
            self._chunk += 1
            count = len(decision.frames)
            if decision.action is Action.GENERATE:
                rgb, stages = self._generate(decision.steps)
                if len(rgb) != count:
                    raise RuntimeError(f"decoder gave {len(rgb)} frames for chunk {decision.chunk}; scheduler expects {count}")
            elif decision.action is Action.DROP:
                rgb, stages = np.empty((0,)), {}
            else:
                start = clock.now()
                rgb = fill_frames(decision.action, self._recent[0], self._recent[-1], count)
                stages = {"fill": clock.now() - start}
            records = self.scheduler.observe(decision, stages, completed_at=clock.now())
            if self.metrics is not None:
                self.metrics.record_chunk(decision, records)
            if len(rgb):
                self._recent = [rgb[-2] if len(rgb) > 1 else rgb[-1], rgb[-1]]
                for frame, record, image in zip(decision.frames, records, rgb):
                    yield VideoFrame(frame, record.pts, record.deadline_s, image, decision.action)
