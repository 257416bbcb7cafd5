"""The world model's evaluation: rows under one script and the pooled drift streams, on the shipped files."""

import dataclasses
import json

import pytest

from framecast.models.errors import ConfigError
from framecast.models.world.evaluation import stream_metrics
from framecast.stream.worldmodel.bundle import WorldModel, shipped_weights_present
from framecast.stream.worldmodel.evaluate import EvalSettings, evaluate_world
from framecast.stream.worldmodel.recipe import STREAM_GUIDANCE, STUDENT_STEPS
from framecast.stream.worldmodel.rollout import model_rollout, random_script


@pytest.mark.skipif(not shipped_weights_present(), reason="the shipped world model files are not in this checkout")
def test_drift_pools_the_first_and_the_last_windows_of_every_stream(tmp_path):
    settings = EvalSettings(frames=60, switch_every=30, long_frames=60, drift_window=24, long_switch_every=30,
                            long_streams=2, rows=("ground truth", "student 1 step"))
    results = evaluate_world(settings=settings, out=tmp_path, progress=False)
    assert results["rows"]["ground truth"]["prompt_adherence"] == 100
    drift = results["drift"]
    assert len(drift["streams"]) == 2
    assert drift["first"]["frames"] == drift["last"]["frames"] == 2 * 24
    assert set(drift["difference"]) == set(drift["streams"][0])
    assert json.loads((tmp_path / "eval.json").read_text())["settings"]["long_streams"] == 2
    assert (tmp_path / "eval_drift.png").exists()


@pytest.mark.skipif(not shipped_weights_present(), reason="the shipped world model files are not in this checkout")
def test_student_rows_stream_at_the_student_guidance_and_the_unguided_row_does_not():
    settings = EvalSettings(frames=60, switch_every=30, long_frames=0, seed=7, student_guidance=1.5,
                            rows=("student 1 step", "student 1 step unguided"))
    results = evaluate_world(settings=settings, progress=False)
    student, script = WorldModel.load(), random_script(7, 60, 30)
    for name, guidance in (("student 1 step", settings.student_guidance), ("student 1 step unguided", 1.0)):
        expected = stream_metrics(model_rollout(student, script, STUDENT_STEPS[1], seed=7, guidance=guidance))
        assert json.dumps(results["rows"][name], sort_keys=True) == json.dumps(dataclasses.asdict(expected), sort_keys=True)
    assert results["rows"]["student 1 step"] != results["rows"]["student 1 step unguided"]
    assert results["settings"]["student_guidance"] == 1.5
    assert EvalSettings().student_guidance == STREAM_GUIDANCE == 1  # the shipped student is guidance-distilled


def test_eval_settings_refuse_no_drift_streams():
    with pytest.raises(ConfigError, match="long_streams"):
        EvalSettings(long_streams=0)


def test_eval_settings_refuse_a_replay_off_the_chunk_grid():
    with pytest.raises(ConfigError, match="long_frames - drift_window = 4750 must be a multiple"):
        EvalSettings(drift_window=250)
    assert EvalSettings(drift_window=250, drift_replay=False).drift_window == 250
