"""The producer on fake time: pacing to media time, generation with planned steps, fills and drops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from framecast.models.config import preset
from framecast.models.dit import CausalWanDiT
from framecast.models.preview import PreviewDecoder
from framecast.stream.bench import degradation_steps
from framecast.stream.deadline import Action, DeadlineConfig, DeadlineScheduler, Fill
from framecast.stream.engine import EngineConfig, StreamEngine
from framecast.stream.metrics import StreamMetrics
from framecast.stream.producer import Producer, fill_frames


class FakeTime:
    def __init__(self) -> None:
        self.now_s = 100.0

    def now(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now_s += seconds


def make_producer(seconds_per_step: list[float], fill: Fill = Fill.REPEAT, budget: float = 0.5):
    """A tiny engine whose chunks 'take' seconds_per_step[i] per step (fake time) for the i-th generated chunk."""
    torch.manual_seed(0)
    dit = CausalWanDiT(preset("tiny")).float()
    engine = StreamEngine(dit, EngineConfig(latent_height=2, latent_width=2), torch.randn(1, 4, dit.config.text_dim))
    fake = FakeTime()
    costs = iter(seconds_per_step)
    real_next_chunk = engine.next_chunk

    def timed_next_chunk(steps=None):
        chunk = real_next_chunk(steps)
        fake.now_s += next(costs) * len(chunk.steps)
        return chunk

    engine.next_chunk = timed_next_chunk
    config = DeadlineConfig(fps=16, latency_budget_s=budget, step_lists=degradation_steps((1000, 750, 500, 250)), fill=fill)
    scheduler = DeadlineScheduler(config, now=fake.now)
    metrics = StreamMetrics(now=fake.now, start_s=scheduler.clock.start_s)
    return Producer(engine, PreviewDecoder(16), scheduler, metrics, sleep=fake.sleep), fake, scheduler, metrics


def test_fast_generation_is_paced_to_media_time_with_full_steps() -> None:
    producer, fake, scheduler, metrics = make_producer([0.01] * 100)
    frames = list(itertools.islice(producer.frames(), 9 + 12 * 4))
    assert [f.index for f in frames] == list(range(57))
    assert [f.pts for f in frames] == [i * 5625 for i in range(57)]  # 90 kHz at 16 fps
    assert all(f.action is Action.GENERATE for f in frames)
    assert scheduler.miss_rate == 0.0
    # chunk 4 (frames 45..56) may not start before its media time 45/16 s
    assert fake.now_s >= scheduler.clock.start_s + 45 / 16
    assert all(f.rgb.shape == (16, 16, 3) and f.rgb.dtype == np.uint8 for f in frames)
    summary = metrics.to_json()
    assert summary["deadline"] == {"frames": 57, "missed": 0, "miss_rate": 0.0}
    assert summary["chunks"]["generate"] == 5 and summary["denoising_steps"] == 4


def test_slow_generation_degrades_steps_then_fills_with_the_last_frame() -> None:
    # 0.01 s per step at first, then 0.3 s per step: 4 steps (1.2 s) and 2 steps (0.6 s) miss a 0.5 s budget,
    # 1 step (0.3 s) makes it
    producer, fake, scheduler, _ = make_producer([0.01] * 3 + [0.3] * 100)
    frames = list(itertools.islice(producer.frames(), 9 + 12 * 12))
    steps_by_chunk = [r.steps for r in scheduler.records if r.action is Action.GENERATE]
    assert max(steps_by_chunk) == 4 and 1 in steps_by_chunk
    generated_after_slowdown = [r for r in scheduler.records if r.chunk >= 5 and r.action is Action.GENERATE]
    assert all(r.steps == 1 for r in generated_after_slowdown)
    assert [f.index for f in frames] == list(range(len(frames)))


def test_fill_frames_repeat_and_interpolate() -> None:
    previous, last = np.full((2, 2, 3), 100, np.uint8), np.full((2, 2, 3), 120, np.uint8)
    repeated = fill_frames(Action.REPEAT, previous, last, 3)
    assert repeated.shape == (3, 2, 2, 3) and (repeated == 120).all()
    continued = fill_frames(Action.INTERPOLATE, previous, last, 3)
    assert continued[:, 0, 0, 0].tolist() == [130, 135, 138]  # 120 + 20 * (0.5, 0.75, 0.875)


def test_bench_command_prints_metrics(capsys, tmp_path) -> None:
    from framecast.stream.cli import main

    out = tmp_path / "m.json"
    code = main(["bench", "--preset", "tiny", "--seconds", "1.5", "--fps", "16", "--height", "32", "--width", "32",
                 "--dtype", "float32", "--json", str(out), "--latency-budget", "1.0"])
    assert code == 0
    text = capsys.readouterr().out
    assert "time to first frame" in text and "deadline misses" in text
    assert out.read_text().startswith("{")


@pytest.mark.parametrize("argv, message", [(["--seconds", "0"], "--seconds=0.0 must be > 0")])
def test_bench_rejects_bad_arguments(capsys, argv, message) -> None:
    from framecast.stream.cli import main

    assert main(["bench", "--preset", "tiny", *argv]) == 2
    assert message in capsys.readouterr().err
