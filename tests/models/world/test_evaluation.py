"""Stream metrics: ground truth scores perfectly, and each way a model can fail shows on the metric meant for it."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest

from framecast.models.errors import ConfigError, ShapeError
from framecast.models.world.episodes import make_episode
from framecast.models.world.evaluation import (
    HEADLINE_METRICS,
    SLOT_NAMES,
    Rollout,
    StreamMetrics,
    adherence_over_time,
    drift,
    metrics_table,
    plot_drift,
    plot_metrics,
    pool_metrics,
    rollout_from_episode,
    stream_metrics,
    window,
)
from framecast.models.world.render import Renderer
from framecast.models.world.state import WorldConfig, WorldState

CONFIG = WorldConfig()
SEEDS = (0, 1, 2)
FRAMES, SWITCH_EVERY = 240, 60
PNG_MAGIC = b"\x89PNG"
# read positions are the drawn pixel, up to 0.5 px off per axis; the jump's prediction p[t-1] + k (p[t-1] - p[t-2])
# weighs three of them by 1, 1 + k and k, so one ground-truth jump may be up to 0.5 (2 + 2k) px per axis
ROUNDING_JUMP_BOUND_PX = 0.5 * (2 + 2 * CONFIG.velocity_retention) * math.sqrt(2)


@functools.lru_cache(maxsize=None)
def _ground_truth(seed: int) -> Rollout:
    episode = make_episode(seed, FRAMES, switch_every=SWITCH_EVERY)
    return rollout_from_episode(episode)


@functools.lru_cache(maxsize=None)
def _ground_truth_metrics(seed: int) -> StreamMetrics:
    return stream_metrics(_ground_truth(seed))


def _with_frames(rollout: Rollout, frames: np.ndarray) -> Rollout:
    return dataclasses.replace(rollout, frames=frames)


def _grey_noise(frames: int, seed: int = 0) -> np.ndarray:
    # uniform noise over the whole cube is not used: enough of its pixels fall near a saturated agent colour for
    # read_agent to call an agent in it (a limit of the reader, not of the metrics)
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(128, 40, (frames, CONFIG.height, CONFIG.width, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", SEEDS)
def test_ground_truth_scores_perfectly(seed: int) -> None:
    metrics = _ground_truth_metrics(seed)
    assert metrics.frames == FRAMES and metrics.switches == FRAMES // SWITCH_EVERY - 1
    assert metrics.graded_frames == FRAMES - 3 * metrics.switches
    assert metrics.prompt_adherence == 100 and set(metrics.slot_adherence.values()) == {100.0}
    assert set(metrics.slot_adherence) == set(SLOT_NAMES)
    assert metrics.action_following == 100 and metrics.action_steps > 80
    assert metrics.switch_frames_to_visible_mean == metrics.switch_frames_to_visible_max == 0
    assert metrics.switches_never_visible == 0
    assert metrics.switch_jumps_measured == metrics.switches and metrics.switch_jumps_skipped == 0
    assert metrics.switch_agent_jump_px_max <= ROUNDING_JUMP_BOUND_PX
    assert metrics.agent_found == 100


def test_ground_truth_agent_does_not_jump_at_switches() -> None:
    # many switches: one switch's jump is pixel rounding, up to ROUNDING_JUMP_BOUND_PX; their mean is well below
    metrics = stream_metrics(rollout_from_episode(make_episode(4, FRAMES, switch_every=12)))
    assert metrics.switch_jumps_measured == metrics.switches == FRAMES // 12 - 1
    assert metrics.switch_agent_jump_px_mean < 0.5 and metrics.switch_agent_jump_px_max <= ROUNDING_JUMP_BOUND_PX
    assert metrics.prompt_adherence == 100 and metrics.switch_frames_to_visible_max == 0


def test_a_lagging_model_shows_its_prompts_a_frame_late() -> None:
    truth = _ground_truth(0)
    lagging = _with_frames(truth, np.concatenate([truth.frames[:1], truth.frames[:-1]]))
    metrics = stream_metrics(lagging)
    assert metrics.switch_frames_to_visible_mean == metrics.switch_frames_to_visible_max == 1
    assert metrics.prompt_adherence == 100  # within the grace: a one-frame lag is allowed for
    assert stream_metrics(lagging, response_grace=0).prompt_adherence < 99
    assert metrics.action_following < _ground_truth_metrics(0).action_following - 3  # the agent turns a frame late


def test_prompts_shown_in_the_wrong_order_score_no_adherence() -> None:
    truth = _ground_truth(1)
    # every segment is shown under the next segment's prompt (adjacent prompts always differ)
    segment_prompts = truth.settings[::SWITCH_EVERY]
    rotated = segment_prompts[1:] + segment_prompts[:1]
    shuffled = dataclasses.replace(truth, settings=tuple(rotated[t // SWITCH_EVERY] for t in range(FRAMES)))
    metrics = stream_metrics(shuffled)
    assert metrics.prompt_adherence < 5
    assert metrics.switches_never_visible == metrics.switches
    assert metrics.switch_frames_to_visible_mean == SWITCH_EVERY
    assert metrics.action_following == 100  # the frames are right; only the prompts are not


def test_noise_scores_nothing() -> None:
    truth = _ground_truth(2)
    metrics = stream_metrics(_with_frames(truth, _grey_noise(FRAMES)))
    assert metrics.prompt_adherence < 1 and metrics.agent_found < 1
    assert metrics.action_steps == 0 and math.isnan(metrics.action_following)
    assert metrics.switch_jumps_measured == 0 and metrics.switch_jumps_skipped == metrics.switches
    assert math.isnan(metrics.switch_agent_jump_px_mean)
    assert metrics.switches_never_visible == metrics.switches


def test_an_agent_teleported_at_the_switch_jumps_by_the_distance() -> None:
    episode = make_episode(3, FRAMES, switch_every=SWITCH_EVERY)
    truth = rollout_from_episode(episode)
    frames, renderer = truth.frames.copy(), Renderer(CONFIG)
    for t in truth.switch_frames:
        x, y = episode.agent_xy[t]
        moved_x = x + 10 if x < CONFIG.width / 2 else x - 10  # away from the nearer wall, so it stays inside
        # the objects are left out: the metrics read only the agent and the setting; frame t follows t + 1 steps
        frames[t] = renderer.render(WorldState(t + 1, truth.settings[t], (moved_x, y), (0.0, 0.0), ()))
    metrics = stream_metrics(_with_frames(truth, frames))
    assert metrics.switch_jumps_measured == metrics.switches
    assert abs(metrics.switch_agent_jump_px_mean - 10) < 1.5 and metrics.switch_agent_jump_px_max < 11.5
    assert metrics.prompt_adherence == 100 and metrics.switch_frames_to_visible_max == 0


def test_window_keeps_the_frames_and_switches_inside_it() -> None:
    truth = _ground_truth(0)
    part = window(truth, SWITCH_EVERY, 3 * SWITCH_EVERY)
    assert len(part.frames) == 2 * SWITCH_EVERY and np.array_equal(part.frames[0], truth.frames[SWITCH_EVERY])
    assert part.switch_frames == (SWITCH_EVERY,)  # the switch at the window's start is not one inside it
    assert stream_metrics(part).prompt_adherence == 100
    for start, stop in ((-1, 10), (10, 10), (0, FRAMES + 1)):
        with pytest.raises(ConfigError, match="window"):
            window(truth, start, stop)


def test_drift_is_last_minus_first_per_headline_metric() -> None:
    good = _ground_truth_metrics(0)
    bad = stream_metrics(_with_frames(_ground_truth(0), _grey_noise(FRAMES)))
    change = drift(good, bad)
    assert tuple(change) == HEADLINE_METRICS
    assert change["prompt_adherence"] == pytest.approx(bad.prompt_adherence - 100)
    assert change["agent_found"] == pytest.approx(bad.agent_found - 100)
    assert drift(good, good)["switch_agent_jump_px_mean"] == 0


def test_pooled_streams_weigh_each_share_by_what_it_counts() -> None:
    good, other = _ground_truth_metrics(0), _ground_truth_metrics(1)
    bad = stream_metrics(_with_frames(_ground_truth(2), _grey_noise(FRAMES)))
    assert pool_metrics([good]) == good
    pooled = pool_metrics([good, bad, other])
    graded = good.graded_frames + bad.graded_frames + other.graded_frames
    assert pooled.graded_frames == graded and pooled.frames == 3 * FRAMES
    assert pooled.prompt_adherence == pytest.approx((100 * (good.graded_frames + other.graded_frames)
                                                     + bad.prompt_adherence * bad.graded_frames) / graded)
    assert pooled.slot_adherence["terrain"] == pytest.approx(
        sum(m.slot_adherence["terrain"] * m.graded_frames for m in (good, bad, other)) / graded)
    steps = good.action_steps + other.action_steps + bad.action_steps
    assert pooled.action_following == pytest.approx(
        sum(m.action_following * m.action_steps for m in (good, bad, other) if m.action_steps) / steps)
    assert pooled.switches == good.switches + bad.switches + other.switches
    assert pooled.switch_frames_to_visible_max == max(
        m.switch_frames_to_visible_max for m in (good, bad, other) if not math.isnan(m.switch_frames_to_visible_max))
    assert pooled.switch_jumps_measured == good.switch_jumps_measured + other.switch_jumps_measured + bad.switch_jumps_measured
    with pytest.raises(ConfigError, match="at least one"):
        pool_metrics([])


def test_adherence_over_time_per_bucket() -> None:
    truth = _ground_truth(1)
    assert np.array_equal(adherence_over_time(truth, bucket_frames=100), [100.0, 100.0, 100.0])
    noise = adherence_over_time(_with_frames(truth, _grey_noise(FRAMES)), bucket_frames=120)
    assert noise.shape == (2,) and (noise < 1).all()
    with pytest.raises(ConfigError, match="bucket_frames"):
        adherence_over_time(truth, bucket_frames=0)


def test_table_and_plots(tmp_path) -> None:
    rows = {
        "ground truth": _ground_truth_metrics(0),
        "noise": stream_metrics(_with_frames(_ground_truth(0), _grey_noise(FRAMES))),
    }
    table = metrics_table(rows)
    assert "ground truth" in table and "noise" in table and "prompt adherence %" in table
    assert len(table.strip().splitlines()) == 2 + len(rows)
    chart = plot_metrics(rows, tmp_path / "metrics.png")
    series = {name: adherence_over_time(_ground_truth(0), 60) for name in ("teacher", "student")}
    drift_plot = plot_drift(series, 60, tmp_path / "drift.png")
    for path in (chart, drift_plot):
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == PNG_MAGIC


def test_bad_inputs_raise_naming_the_problem() -> None:
    truth = _ground_truth(0)
    frames, settings, actions = truth.frames[:10], truth.settings[:10], truth.actions[:10]
    with pytest.raises(ShapeError, match="uint8"):
        Rollout(frames.astype(np.float32), settings, actions)
    with pytest.raises(ShapeError, match=r"\[T, H, W, 3\]"):
        Rollout(frames[..., :2], settings, actions)
    with pytest.raises(ShapeError, match="no frames"):
        Rollout(frames[:0], (), actions[:0])
    with pytest.raises(ShapeError, match="9 settings for 10 frames"):
        Rollout(frames, settings[:9], actions)
    with pytest.raises(ShapeError, match="actions"):
        Rollout(frames, settings, actions[:9])
    with pytest.raises(ConfigError, match="action ids"):
        Rollout(frames, settings, actions + 10)
    with pytest.raises(ConfigError, match="SceneSettings"):
        Rollout(frames, ("a red circle",) * 10, actions)
    with pytest.raises(ShapeError, match="expected \\[96, 96, 3\\]"):
        stream_metrics(Rollout(frames, settings, actions), WorldConfig(height=96, width=96))
    with pytest.raises(ConfigError, match="response_grace"):
        stream_metrics(Rollout(frames, settings, actions), response_grace=-1)
    with pytest.raises(ConfigError, match="at least one row"):
        metrics_table({})


def test_each_frame_is_read_once(monkeypatch) -> None:
    from framecast.models.world import evaluation

    calls = []
    monkeypatch.setattr(evaluation, "read_agent", lambda frame, config: calls.append(1) or None)
    truth = _ground_truth(0)
    rollout = Rollout(truth.frames[:30], truth.settings[:30], truth.actions[:30])
    stream_metrics(rollout)
    stream_metrics(rollout, response_grace=0)
    adherence_over_time(rollout, bucket_frames=10)
    assert len(calls) == 30
    stream_metrics(dataclasses.replace(rollout, frames=rollout.frames.copy()))  # new frames are read anew
    assert len(calls) == 60
