"""Stream metrics: time to first frame, frame intervals at the sink, deadline misses, degradations.

One `StreamMetrics` per stream. The sink calls `frame_at_sink()` per frame it sends; the orchestrator calls
`record_chunk()` with each observed decision and its frame records. Exported as Prometheus text (`/metrics`) and as a
JSON summary (`framecast bench`). Memory is bounded: interval quantiles are taken over the newest `window`
intervals, everything else is a running total. Updates and exports take one lock, so the server may read from
another thread while the stream writes.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from framecast.models.errors import ConfigError
from framecast.stream.deadline import Action, Decision, Degradation, FrameRecord

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
QUANTILES = (0.5, 0.99)
Sample = tuple[str, dict[str, str], float]  # name suffix (e.g. "_sum"), labels, value


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile by linear interpolation between closest ranks (numpy's default); NaN when empty."""
    if not sorted_values:
        return math.nan
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _number(value: float | int) -> str:
    """A sample value as Prometheus text writes it (Go ParseFloat syntax)."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class StreamMetrics:
    """Counters and a bounded window of frame intervals for one stream.

    `now` is the time source (monotonic seconds, injectable); `start_s` is when the stream was requested, the origin
    of time to first frame (default: construction; pass the media clock's `start_s` to share its origin).

    Raises:
        ConfigError: window < 2 (a quantile needs intervals).
    """

    def __init__(
        self, window: int = 2048, *, now: Callable[[], float] = time.monotonic, start_s: float | None = None
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ConfigError(f"window={window!r} must be an integer >= 2")
        self.now = now
        self.start_s = now() if start_s is None else float(start_s)
        self._lock = threading.Lock()
        self._intervals: deque[float] = deque(maxlen=window)
        self._interval_sum = 0.0
        self._interval_count = 0
        self._first_frame_s: float | None = None
        self._last_frame_s: float | None = None
        self._sink_frames = 0
        self._deadline_frames = 0
        self._deadline_misses = 0
        self._degradations = {kind: 0 for kind in Degradation}
        self._chunks = {action: 0 for action in Action}
        self._last_steps: int | None = None

    def frame_at_sink(self, at_s: float | None = None) -> None:
        """One frame reached the sink at `at_s` (default now)."""
        at_s = self.now() if at_s is None else float(at_s)
        with self._lock:
            if self._last_frame_s is None:
                self._first_frame_s = at_s
            else:
                interval = at_s - self._last_frame_s
                self._intervals.append(interval)
                self._interval_sum += interval
                self._interval_count += 1
            self._last_frame_s = at_s
            self._sink_frames += 1

    def record_chunk(self, decision: Decision, records: Iterable[FrameRecord]) -> None:
        """One observed chunk: its action, its degradation if any, and its frames' deadline outcomes."""
        records = tuple(records)
        missed = sum(record.is_missed for record in records)
        with self._lock:
            self._chunks[decision.action] += 1
            if decision.degradation is not None:
                self._degradations[decision.degradation] += 1
            if decision.action is Action.GENERATE:
                self._last_steps = len(decision.steps)
            self._deadline_frames += len(records)
            self._deadline_misses += missed

    def _snapshot(self) -> dict:
        with self._lock:  # copy under the lock, sort outside it: the stream thread never waits on a sort
            intervals = list(self._intervals)
            snapshot = {
                "ttff": None if self._first_frame_s is None else self._first_frame_s - self.start_s,
                "sink_frames": self._sink_frames,
                "interval_sum": self._interval_sum,
                "interval_count": self._interval_count,
                "window": len(intervals),
                "deadline_frames": self._deadline_frames,
                "deadline_misses": self._deadline_misses,
                "degradations": dict(self._degradations),
                "chunks": dict(self._chunks),
                "last_steps": self._last_steps,
            }
        intervals.sort()
        snapshot["quantiles"] = {q: quantile(intervals, q) for q in QUANTILES}
        return snapshot

    def to_json(self) -> dict:
        """A JSON-serialisable summary; values not yet known are None."""
        s = self._snapshot()

        def known(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {
            "time_to_first_frame_s": s["ttff"],
            "frames_at_sink": s["sink_frames"],
            "frame_interval_s": {
                "p50": known(s["quantiles"][0.5]),
                "p99": known(s["quantiles"][0.99]),
                "mean": s["interval_sum"] / s["interval_count"] if s["interval_count"] else None,
                "count": s["interval_count"],
                "window": s["window"],  # intervals the quantiles are taken over
            },
            "deadline": {
                "frames": s["deadline_frames"],
                "missed": s["deadline_misses"],
                "miss_rate": s["deadline_misses"] / s["deadline_frames"] if s["deadline_frames"] else 0.0,
            },
            "degradations": {kind.value: count for kind, count in s["degradations"].items()},
            "chunks": {action.value: count for action, count in s["chunks"].items()},
            "denoising_steps": s["last_steps"],
        }

    def to_prometheus(self) -> str:
        """Prometheus text exposition format 0.0.4 (serve with PROMETHEUS_CONTENT_TYPE)."""
        s = self._snapshot()
        interval = "framecast_frame_interval_seconds"
        families: list[tuple[str, str, str, list[Sample]]] = [
            ("framecast_time_to_first_frame_seconds", "gauge", "Seconds from stream start to the first frame sent.",
             [("", {}, math.nan if s["ttff"] is None else s["ttff"])]),
            ("framecast_sink_frames_total", "counter", "Frames delivered to the sink.", [("", {}, s["sink_frames"])]),
            (interval, "summary", "Seconds between frames at the sink; quantiles over the newest intervals.",
             [("", {"quantile": str(q)}, value) for q, value in s["quantiles"].items()]
             + [("_sum", {}, s["interval_sum"]), ("_count", {}, s["interval_count"])]),
            ("framecast_deadline_frames_total", "counter", "Frames whose deadline outcome is known.",
             [("", {}, s["deadline_frames"])]),
            ("framecast_deadline_misses_total", "counter", "Frames late at the sink or dropped.",
             [("", {}, s["deadline_misses"])]),
            ("framecast_deadline_miss_ratio", "gauge", "Missed frames over frames with a known outcome.",
             [("", {}, s["deadline_misses"] / s["deadline_frames"] if s["deadline_frames"] else 0.0)]),
            ("framecast_degradations_total", "counter", "Degraded chunks by kind of degradation.",
             [("", {"kind": kind.value}, n) for kind, n in s["degradations"].items()]),
            ("framecast_chunks_total", "counter", "Chunks by action taken.",
             [("", {"action": action.value}, n) for action, n in s["chunks"].items()]),
            ("framecast_denoising_steps", "gauge", "Denoising steps of the newest generated chunk.",
             [("", {}, math.nan if s["last_steps"] is None else s["last_steps"])]),
        ]
        lines = []
        for name, kind, help_text, samples in families:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for suffix, labels, value in samples:
                label_text = ",".join(f'{key}="{_label(val)}"' for key, val in labels.items())
                label_text = f"{{{label_text}}}" if labels else ""
                lines.append(f"{name}{suffix}{label_text} {_number(value)}")
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        """The JSON summary as a few human-readable lines (what `framecast bench` prints)."""
        j = self.to_json()

        def ms(x: float | None) -> str:
            return "n/a" if x is None else f"{1000 * x:.1f} ms"

        degradations = ", ".join(f"{kind} {n}" for kind, n in j["degradations"].items())
        return "\n".join([
            f"time to first frame  {ms(j['time_to_first_frame_s'])}",
            f"frame interval       p50 {ms(j['frame_interval_s']['p50'])}, p99 {ms(j['frame_interval_s']['p99'])}"
            f" ({j['frames_at_sink']} frames)",
            f"deadline misses      {j['deadline']['missed']}/{j['deadline']['frames']}"
            f" ({100 * j['deadline']['miss_rate']:.2f}%)",
            f"degradations         {degradations}",
        ])
