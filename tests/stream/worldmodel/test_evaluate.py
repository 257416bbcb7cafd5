"""The world model's evaluation: rows under one script and the pooled drift streams, on the shipped files."""

import json

import pytest

from framecast.models.errors import ConfigError
from framecast.stream.worldmodel.bundle import shipped_weights_present
from framecast.stream.worldmodel.evaluate import EvalSettings, evaluate_world


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


def test_eval_settings_refuse_no_drift_streams():
    with pytest.raises(ConfigError, match="long_streams"):
        EvalSettings(long_streams=0)
