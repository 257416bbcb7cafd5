"""The media clock: integer pts on a 90 kHz time base, and each frame's deadline in absolute monotonic seconds.

Frame i is due at the sink at `start_s + latency_budget_s + pts(i) * time_base`. Every time is computed from the
absolute start, never by adding 1/fps to the previous frame, so rounding and sleep overshoot never accumulate.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from fractions import Fraction

from framecast.models.errors import ConfigError

VIDEO_TIME_BASE = Fraction(1, 90_000)  # RTP video clock (RFC 3551)
MAX_FPS = 1000


def check_fps(fps: object) -> Fraction:
    """`fps` as an exact Fraction; raises ConfigError unless it is an int or Fraction in (0, MAX_FPS].

    Floats are refused: 29.97 is not 30000/1001, and the difference drifts by a frame every ~9 hours.
    """
    if isinstance(fps, bool) or not isinstance(fps, (int, Fraction)) or not 0 < fps <= MAX_FPS:
        raise ConfigError(f"fps={fps!r} must be an int or Fraction in (0, {MAX_FPS}], e.g. 16 or Fraction(30000, 1001)")
    return Fraction(fps)


def check_seconds(name: str, value: object, low: float = 0.0) -> float:
    """`value` as a float; raises ConfigError unless it is a finite real number >= low."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < low:
        raise ConfigError(f"{name}={value!r} must be a finite number of seconds >= {low}")
    return float(value)


class MediaClock:
    """Maps frame indices to pts and to deadlines on one monotonic time source.

    `now` is the time source in seconds (monotonic; tests pass a fake one). `start_s` is when media time 0 is, on
    that source; by default the moment of construction. Frame i is due at the sink `latency_budget_s` after its media
    time, so the budget is the time the pipeline has to produce a frame, the first one included.

    Raises:
        ConfigError: fps not an int/Fraction in (0, 1000], a negative or non-finite budget, or a time base too
            coarse for one tick per frame.
    """

    def __init__(
        self,
        fps: int | Fraction,
        latency_budget_s: float = 0.0,
        *,
        time_base: Fraction = VIDEO_TIME_BASE,
        now: Callable[[], float] = time.monotonic,
        start_s: float | None = None,
    ) -> None:
        self.fps = check_fps(fps)
        self.latency_budget_s = check_seconds("latency_budget_s", latency_budget_s)
        if not isinstance(time_base, Fraction) or not 0 < time_base <= 1 / self.fps:
            raise ConfigError(f"time_base={time_base!r} must be a Fraction in (0, 1/fps = {1 / self.fps}]")
        self.time_base = time_base
        self.now = now
        self._ticks_per_frame = 1 / (self.fps * time_base)  # exact: 5625 at 16 fps, 3003 at 30000/1001
        self.start_s = now() if start_s is None else float(start_s)

    def restart(self, start_s: float | None = None) -> None:
        """Put media time 0 at `start_s` (default: now)."""
        self.start_s = self.now() if start_s is None else float(start_s)

    def pts(self, frame_index: int) -> int:
        """Presentation timestamp of a frame, in ticks of `time_base` (rounded to the nearest tick)."""
        return round(frame_index * self._ticks_per_frame)

    def media_time(self, frame_index: int) -> Fraction:
        """Exact seconds from media time 0 to the frame: pts * time_base."""
        return self.pts(frame_index) * self.time_base

    def deadline_s(self, frame_index: int) -> float:
        """Absolute time (on the `now` source) at which the frame is due at the sink."""
        return self.start_s + self.latency_budget_s + float(self.media_time(frame_index))

    def seconds_until(self, frame_index: int) -> float:
        """Seconds left before the frame is due (negative once it is late); a pacer sleeps this long."""
        return self.deadline_s(frame_index) - self.now()

    def __repr__(self) -> str:
        return f"MediaClock(fps={self.fps}, latency_budget_s={self.latency_budget_s}, time_base={self.time_base})"
