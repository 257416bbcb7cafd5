"""The media clock: exact pts on the 90 kHz time base, deadlines from an absolute start, drift-free pacing."""

from __future__ import annotations

from fractions import Fraction

import pytest

from framecast.models.errors import ConfigError
from framecast.stream.clock import VIDEO_TIME_BASE, MediaClock


class FakeTime:
    """A monotonic time source the test moves by hand."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(
    "fps, ticks_per_frame",
    [(16, 5625), (24, 3750), (30, 3000), (60, 1500), (Fraction(30000, 1001), 3003), (Fraction(24000, 1001), 3753.75)],
)
def test_pts_are_exact_multiples_of_the_frame_duration(fps: int | Fraction, ticks_per_frame: float) -> None:
    clock = MediaClock(fps, now=FakeTime())
    assert VIDEO_TIME_BASE == Fraction(1, 90_000)
    for frame in (0, 1, 2, 7, 1_000, 10**7):
        assert clock.pts(frame) == round(Fraction(frame) * Fraction(ticks_per_frame))
        assert isinstance(clock.pts(frame), int)
    if float(ticks_per_frame).is_integer():  # the rate divides 90 kHz: media time is exactly frame / fps
        assert all(clock.media_time(frame) == frame / Fraction(fps) for frame in (1, 3, 10**7))


def test_pts_of_an_inexact_rate_round_to_the_nearest_tick_without_drift() -> None:
    clock = MediaClock(Fraction(24000, 1001), now=FakeTime())  # 3753.75 ticks per frame
    assert [clock.pts(i) for i in range(5)] == [0, 3754, 7508, 11261, 15015]
    # an hour in, still within half a tick of the exact time: each pts comes from the index, not the previous pts
    frame = 86_313
    exact = Fraction(frame) / clock.fps / VIDEO_TIME_BASE
    assert abs(clock.pts(frame) - exact) <= Fraction(1, 2)


def test_deadline_is_start_plus_budget_plus_media_time() -> None:
    now = FakeTime(50.0)
    clock = MediaClock(16, latency_budget_s=0.75, now=now)
    assert clock.start_s == 50.0  # captured from the time source at construction
    assert clock.deadline_s(0) == 50.75
    assert clock.deadline_s(16) == pytest.approx(51.75, abs=1e-12)
    assert clock.deadline_s(9) == pytest.approx(50.75 + 9 / 16, abs=1e-12)
    now.t = 51.0
    assert clock.seconds_until(0) == pytest.approx(-0.25)  # late: negative
    assert clock.seconds_until(16) == pytest.approx(0.75)
    clock.restart(60.0)
    assert clock.deadline_s(0) == 60.75
    now.t = 70.0
    clock.restart()
    assert clock.start_s == 70.0


def test_explicit_start_is_used_as_is() -> None:
    clock = MediaClock(Fraction(30000, 1001), 0.1, now=FakeTime(5.0), start_s=1.0)
    assert clock.deadline_s(30_000) == pytest.approx(1.0 + 0.1 + 1001.0, abs=1e-9)


def test_pacing_from_the_absolute_start_does_not_drift() -> None:
    """A pacer that sleeps seconds_until(i) wakes at frame i's deadline even though every sleep overshoots;
    one that sleeps a relative 1/fps accumulates the overshoot."""
    now = FakeTime(0.0)
    clock = MediaClock(Fraction(30000, 1001), latency_budget_s=0.2, now=now)
    overshoot = 0.0007  # each sleep wakes 0.7 ms late, as a loaded OS does
    wakes = []
    for frame in range(3000):
        now.t += max(0.0, clock.seconds_until(frame)) + overshoot
        wakes.append(now.t)
    errors = [wake - clock.deadline_s(frame) for frame, wake in enumerate(wakes)]
    assert max(errors) == pytest.approx(overshoot, abs=1e-9)  # bounded by one overshoot, not growing

    relative = 0.2
    for _ in range(3000):
        relative += float(1 / clock.fps) + overshoot
    assert relative - clock.deadline_s(3000) == pytest.approx(3000 * overshoot, rel=1e-6)  # ~2 s behind


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fps=0), r"fps=0 must be an int or Fraction in \(0, 1000\]"),
        (dict(fps=-16), r"fps=-16 must be"),
        (dict(fps=29.97), r"fps=29.97 must be an int or Fraction"),
        (dict(fps=True), r"fps=True must be"),
        (dict(fps=2000), r"fps=2000 must be an int or Fraction in \(0, 1000\]"),
        (dict(fps=16, latency_budget_s=-0.1), r"latency_budget_s=-0.1 must be a finite number of seconds >= 0"),
        (dict(fps=16, latency_budget_s=float("inf")), r"latency_budget_s=inf must be a finite number"),
        (dict(fps=16, time_base=Fraction(1, 10)), r"time_base=Fraction\(1, 10\) must be a Fraction in \(0, 1/fps"),
        (dict(fps=16, time_base=0.001), r"time_base=0.001 must be a Fraction"),
    ],
)
def test_bad_clock_settings_name_the_value_and_range(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MediaClock(now=FakeTime(), **kwargs)
