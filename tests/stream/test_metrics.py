"""Stream metrics: quantiles against numpy, time to first frame, deadline and degradation counts from a real
scheduler run, Prometheus text checked line by line against the exposition grammar, the JSON summary, threads."""

from __future__ import annotations

import json
import math
import random
import re
import threading

import numpy as np
import pytest

from framecast.models.errors import ConfigError
from framecast.stream.deadline import Action, DeadlineConfig, DeadlineScheduler
from framecast.stream.metrics import PROMETHEUS_CONTENT_TYPE, StreamMetrics, quantile


class FakeTime:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- a strict reader of the Prometheus text exposition format 0.0.4

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
HELP_LINE = re.compile(rf"# HELP ({NAME}) (.+)")
TYPE_LINE = re.compile(rf"# TYPE ({NAME}) (counter|gauge|summary|histogram|untyped)")
SAMPLE_LINE = re.compile(rf"({NAME})(?:\{{({LABEL}(?:,{LABEL})*)\}})? (\S+)")
VALUE = re.compile(r"NaN|[+-]Inf|[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
SUFFIXES = {"counter": ("",), "gauge": ("",), "untyped": ("",), "summary": ("", "_sum", "_count"),
            "histogram": ("_bucket", "_sum", "_count")}


def parse_prometheus(text: str) -> dict[str, dict]:
    """Families by name: {"type", "help", "samples": [(sample name, labels, value)]}; asserts the grammar."""
    assert text.endswith("\n") and "\n\n" not in text
    families: dict[str, dict] = {}
    current = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            match = HELP_LINE.fullmatch(line)
            assert match, line
            name = match[1]
            assert name not in families, f"{name} described twice"
            families[name] = {"help": match[2], "type": None, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            match = TYPE_LINE.fullmatch(line)
            assert match and match[1] == current and families[current]["type"] is None, line
            assert not families[current]["samples"], f"TYPE after samples: {line}"
            families[current]["type"] = match[2]
        else:
            assert not line.startswith("#"), line
            match = SAMPLE_LINE.fullmatch(line)
            assert match and current and families[current]["type"], line
            name, labels, value = match[1], match[2], match[3]
            assert name in {current + suffix for suffix in SUFFIXES[families[current]["type"]]}, line
            assert VALUE.fullmatch(value), line
            label_pairs = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))
            families[current]["samples"].append((name, label_pairs, float(value)))
    return families


def sample(families: dict, name: str, **labels: str) -> float:
    family = families[re.sub(r"_(sum|count)$", "", name) if name not in families else name]
    values = [v for n, l, v in family["samples"] if n == name and l == labels]
    assert len(values) == 1, (name, labels, family["samples"])
    return values[0]


# --- quantiles and intervals


@pytest.mark.parametrize("size", [1, 2, 3, 10, 101, 1000])
def test_quantile_matches_numpy(size: int) -> None:
    rng = np.random.default_rng(size)
    values = sorted(rng.exponential(0.06, size).tolist())
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        assert quantile(values, q) == pytest.approx(float(np.quantile(values, q)), rel=1e-12, abs=1e-15)
    assert math.isnan(quantile([], 0.5))


def test_frame_intervals_over_a_bounded_window_match_numpy() -> None:
    rng = random.Random(3)
    now = FakeTime(5.0)
    metrics = StreamMetrics(window=256, now=now)
    times = [5.3]
    for _ in range(999):
        times.append(times[-1] + rng.choice([1 / 16, 1 / 16, 1 / 16, 0.2]) * rng.uniform(0.9, 1.1))
    for t in times:
        now.t = t
        metrics.frame_at_sink()
    intervals = np.diff(times)
    summary = metrics.to_json()
    assert summary["time_to_first_frame_s"] == pytest.approx(0.3)
    assert summary["frames_at_sink"] == 1000
    window = intervals[-256:]  # quantiles over the newest 256 intervals only: bounded memory
    assert summary["frame_interval_s"]["p50"] == pytest.approx(float(np.quantile(window, 0.5)), rel=1e-12)
    assert summary["frame_interval_s"]["p99"] == pytest.approx(float(np.quantile(window, 0.99)), rel=1e-12)
    assert summary["frame_interval_s"]["window"] == 256
    assert summary["frame_interval_s"]["count"] == 999  # totals cover the whole stream
    assert summary["frame_interval_s"]["mean"] == pytest.approx(float(intervals.mean()), rel=1e-9)
    families = parse_prometheus(metrics.to_prometheus())
    assert sample(families, "framecast_frame_interval_seconds", quantile="0.99") == pytest.approx(
        float(np.quantile(window, 0.99)), rel=1e-12
    )
    assert sample(families, "framecast_frame_interval_seconds_count") == 999
    assert sample(families, "framecast_frame_interval_seconds_sum") == pytest.approx(float(intervals.sum()), rel=1e-9)


def test_an_empty_stream_exports_unknowns() -> None:
    metrics = StreamMetrics(now=FakeTime(1.0))
    summary = metrics.to_json()
    assert summary["time_to_first_frame_s"] is None and summary["frame_interval_s"]["p50"] is None
    assert summary["deadline"] == {"frames": 0, "missed": 0, "miss_rate": 0.0} and summary["denoising_steps"] is None
    json.dumps(summary, allow_nan=False)  # strict JSON: no NaN
    families = parse_prometheus(metrics.to_prometheus())
    assert math.isnan(sample(families, "framecast_time_to_first_frame_seconds"))
    assert math.isnan(sample(families, "framecast_frame_interval_seconds", quantile="0.5"))
    assert sample(families, "framecast_sink_frames_total") == 0


# --- deadlines and degradations, from a scheduler run


def scripted_run(metrics: StreamMetrics) -> DeadlineScheduler:
    """Chunks at 4 fps, one latent frame each (1 video frame, then 4), under a script of predicted and real costs:
    full steps; 2 steps; 1 step, late by one frame; repeat; drop; repeat; 1 step."""
    now = FakeTime(0.0)
    oracle_costs = {4: 0.0, 2: 9.0, 1: 9.0, 0: 9.0}

    class Oracle:
        def predict(self, action: Action, steps: int) -> float:
            return oracle_costs[steps]

        def observe(self, *args: object) -> None:
            pass

        def forget(self, action: Action) -> None:
            pass

    config = DeadlineConfig(fps=4, latency_budget_s=0.5, chunk_frames=1, recovery_chunks=1, probe_chunks=0)
    scheduler = DeadlineScheduler(config, Oracle(), now=now)
    script = [  # (predicted seconds by step count, done after, plan at)
        ({4: 0.0}, 0.1, 0.0),
        ({4: 9.0, 2: 0.0}, 0.1, 0.5),
        ({2: 9.0, 1: 0.0}, 0.4, 1.5),  # frames 5-8 due 1.75-2.5: ready at 1.9, frame 5 late
        ({1: 9.0, 0: 0.0}, 0.01, 2.5),
        ({0: 9.0}, None, 3.5),
        ({0: 0.0}, 0.01, 4.5),
        ({1: 0.0}, 0.1, 5.5),
    ]
    for costs, seconds, plan_at in script:
        oracle_costs.update(costs)
        now.t = plan_at
        decision = scheduler.plan()
        done = None if seconds is None else plan_at + seconds
        metrics.record_chunk(decision, scheduler.observe(decision, {}, completed_at=done))
    return scheduler


def test_deadline_misses_and_degradations_by_kind() -> None:
    metrics = StreamMetrics(now=FakeTime())
    scheduler = scripted_run(metrics)
    actions = [r.action for r in scheduler.records]
    assert actions.count(Action.DROP) == 4 and actions.count(Action.REPEAT) == 8
    summary = metrics.to_json()
    # frames: 1 + 6 * 4 = 25; missed: frame 5 (late) + the 4 dropped
    assert summary["deadline"] == {"frames": 25, "missed": 5, "miss_rate": 5 / 25}
    assert summary["deadline"]["miss_rate"] == scheduler.miss_rate
    assert summary["degradations"] == {"fewer_steps": 3, "repeat": 2, "interpolate": 0, "drop": 1}
    assert summary["chunks"] == {"generate": 4, "repeat": 2, "interpolate": 0, "drop": 1}
    assert summary["denoising_steps"] == 1
    families = parse_prometheus(metrics.to_prometheus())
    assert sample(families, "framecast_deadline_frames_total") == 25
    assert sample(families, "framecast_deadline_misses_total") == 5
    assert sample(families, "framecast_deadline_miss_ratio") == pytest.approx(0.2)
    assert sample(families, "framecast_degradations_total", kind="fewer_steps") == 3
    assert sample(families, "framecast_degradations_total", kind="drop") == 1
    assert sample(families, "framecast_chunks_total", action="generate") == 4
    assert sample(families, "framecast_denoising_steps") == 1


def test_prometheus_text_follows_the_exposition_grammar_and_conventions() -> None:
    now = FakeTime(0.0)
    metrics = StreamMetrics(now=now)
    scripted_run(metrics)
    for t in (0.6, 0.7, 0.75, 1.0):
        metrics.frame_at_sink(t)
    text = metrics.to_prometheus()
    families = parse_prometheus(text)
    assert PROMETHEUS_CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    assert set(families) == {
        "framecast_time_to_first_frame_seconds", "framecast_sink_frames_total", "framecast_frame_interval_seconds",
        "framecast_deadline_frames_total", "framecast_deadline_misses_total", "framecast_deadline_miss_ratio",
        "framecast_degradations_total", "framecast_chunks_total", "framecast_denoising_steps",
    }
    for name, family in families.items():
        assert name.startswith("framecast_") and family["help"] and family["type"]
        assert name.endswith("_total") == (family["type"] == "counter"), name
        assert all(v >= 0 for _, _, v in family["samples"] if not math.isnan(v)), name
    summary = families["framecast_frame_interval_seconds"]
    assert summary["type"] == "summary"
    assert [labels for n, labels, _ in summary["samples"] if n == "framecast_frame_interval_seconds"] == [
        {"quantile": "0.5"}, {"quantile": "0.99"},
    ]
    kinds = {l["kind"] for _, l, _ in families["framecast_degradations_total"]["samples"]}
    assert kinds == {"fewer_steps", "repeat", "interpolate", "drop"}  # every kind, zeros included
    assert sample(families, "framecast_time_to_first_frame_seconds") == pytest.approx(0.6)
    assert sample(families, "framecast_sink_frames_total") == 4
    assert sample(families, "framecast_frame_interval_seconds", quantile="0.5") == pytest.approx(0.1)


def test_the_reader_rejects_malformed_text() -> None:
    """The grammar check above is only worth something if it fails on bad text."""
    good = "# HELP framecast_x_total X.\n# TYPE framecast_x_total counter\nframecast_x_total 1\n"
    parse_prometheus(good)
    for bad in (
        good[:-1],  # no final newline
        good.replace("framecast_x_total 1", "framecast_x_total one"),
        good.replace("framecast_x_total 1", 'framecast_x_total{kind=drop} 1'),
        good.replace("framecast_x_total 1", "framecast_y_total 1"),  # a sample outside its family
        good.replace("counter", "count"),
        "framecast_x_total 1\n",  # no TYPE
    ):
        with pytest.raises(AssertionError):
            parse_prometheus(bad)


def test_text_summary_names_every_figure() -> None:
    metrics = StreamMetrics(now=FakeTime())
    scripted_run(metrics)
    metrics.frame_at_sink(0.25)
    metrics.frame_at_sink(0.3125)
    text = metrics.to_text()
    assert "time to first frame  250.0 ms" in text
    assert "p50 62.5 ms" in text and "deadline misses      5/25 (20.00%)" in text
    assert "fewer_steps 3, repeat 2, interpolate 0, drop 1" in text


# --- threads and settings


def test_updates_from_threads_while_exporting_lose_nothing() -> None:
    metrics = StreamMetrics(window=64, now=FakeTime())
    stop = threading.Event()
    exports = []

    def reader() -> None:
        while not stop.is_set():
            exports.append(parse_prometheus(metrics.to_prometheus()))

    def writer(offset: float) -> None:
        for i in range(2000):
            metrics.frame_at_sink(offset + i)

    threads = [threading.Thread(target=writer, args=(k * 1e5,)) for k in range(4)]
    server = threading.Thread(target=reader)
    server.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    server.join()
    summary = metrics.to_json()
    assert summary["frames_at_sink"] == 8000 and summary["frame_interval_s"]["count"] == 7999
    assert exports  # the reader ran alongside


@pytest.mark.parametrize("window", [0, 1, 2.5, True])
def test_bad_window_raises_config_error_naming_it(window: object) -> None:
    with pytest.raises(ConfigError, match=f"window={window!r} must be an integer >= 2"):
        StreamMetrics(window=window)  # type: ignore[arg-type]
