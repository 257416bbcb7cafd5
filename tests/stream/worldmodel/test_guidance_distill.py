import numpy as np
import pytest
import torch

from framecast.models.errors import ConfigError
from framecast.models.loading import load_dit
from framecast.stream.worldmodel.bundle import shipped_weights_present
from framecast.stream.worldmodel.guidance_distill import (
    PUPIL_FILE, GuidanceSettings, RolloutPlan, distil_guidance,
)
from framecast.stream.worldmodel.recipe import CHUNK_FRAMES, STUDENT_FILE, WEIGHTS_DIR

needs_weights = pytest.mark.skipif(not shipped_weights_present(), reason="the shipped world model is not in the tree")


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(guidance=1.0), r"guidance=1.0 must be in \(1, 10\]: there is nothing to distil at 1"),
        (dict(batch=0), "batch=0 must be a positive integer"),
        (dict(warmup_chunks=-1), "warmup_chunks=-1 must be an integer >= 0"),
        (dict(switch_share=1.5), r"switch_share=1.5 must be in \[0, 1\]"),
        (dict(schedule_weights=(1.0,)), "4 schedules for 1 schedule_weights"),
        (dict(schedules=((500, 1000),), schedule_weights=(1.0,)), "strictly descend"),
    ],
)
def test_settings_errors_name_the_value(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GuidanceSettings(**changes)


def test_a_rollout_plan_switches_at_a_scored_chunk_to_a_different_scene() -> None:
    settings = GuidanceSettings(batch=3, rollout_chunks=4, warmup_chunks=2, switch_share=1.0)
    for seed in range(5):
        plan = RolloutPlan(settings, np.random.default_rng(seed))
        assert 1 <= plan.switch_chunk < settings.rollout_chunks and 0 <= plan.warmup <= 2
        assert all(a != b for a, b in zip(plan.first, plan.second))
        assert plan.actions.shape == (3, (plan.warmup + 4) * CHUNK_FRAMES)
        assert plan.chunk_actions(plan.warmup + 3).shape == (3, CHUNK_FRAMES)
        assert plan.steps in settings.schedules
    assert RolloutPlan(GuidanceSettings(switch_share=0.0), np.random.default_rng(0)).switch_chunk is None


@needs_weights
def test_the_pupil_learns_the_guided_students_estimates_and_resumes(tmp_path) -> None:
    """The pupil starts as the student itself, unguided: its first loss is the gap guidance makes, and a few updates
    at a high learning rate close part of it. A second call resumes where the first stopped."""
    settings = GuidanceSettings(batch=2, rollout_chunks=4, warmup_chunks=0, switch_share=0.0, schedules=((1000,),),
                                schedule_weights=(1.0,), learning_rate=1e-3, updates=12, checkpoint_every_s=1e9)
    history = distil_guidance(tmp_path, settings, progress=False)
    losses = history["loss"]
    assert len(losses) == 12 and losses[0] > 1e-3
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    pupil, guide = (load_dit(path, dtype=torch.float32) for path in (tmp_path / PUPIL_FILE, WEIGHTS_DIR / STUDENT_FILE))
    guide_weights = guide.state_dict()
    moved = [name for name, w in pupil.state_dict().items() if not torch.equal(w, guide_weights[name])]
    assert any(name.startswith("blocks.0.") for name in moved) and any(name.startswith("head.") for name in moved)
    again = distil_guidance(tmp_path, GuidanceSettings(**{**settings.__dict__, "updates": 16}), progress=False)
    assert again["loss"][:12] == losses and len(again["loss"]) == 16
