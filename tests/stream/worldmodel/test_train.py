import json

import pytest
import torch

from framecast.models.config import preset
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import ConfigError
from framecast.models.loading import save_dit
from framecast.stream.worldmodel.card import write_model_card
from framecast.stream.worldmodel.train import Progress, TrainWorldSettings


def test_progress_remembers_finished_stages_across_runs(tmp_path):
    progress = Progress(tmp_path)
    assert not progress.done("teacher")
    progress.mark("teacher", 12.34, steps=5)
    again = Progress(tmp_path)
    assert again.done("teacher") and not again.done("student")
    assert json.loads((tmp_path / "progress.json").read_text())["done"]["teacher"] == {"seconds": 12.3, "steps": 5}


def test_train_settings_refuse_a_stage_without_time():
    with pytest.raises(ConfigError, match="teacher and the student"):
        TrainWorldSettings(teacher_minutes=0)
    with pytest.raises(ConfigError, match="autoencoder_minutes"):
        TrainWorldSettings(autoencoder_minutes=-1)


def test_the_model_card_is_written_from_what_the_run_has(tmp_path):
    run, model = tmp_path / "run", tmp_path / "model"
    run.mkdir(), model.mkdir()
    save_dit(CausalWanDiT(preset("world")).to(torch.bfloat16), model / "world_teacher.safetensors")
    history = {"step": [1, 2, 3], "loss": [2.0, 1.5, 1.2], "seconds": [1.0, 2.0, 3.0]}
    torch.save({"history": history}, run / "teacher_state.pt")
    (run / "RUN_HISTORY.md").write_text("### Run history\n\nrun 1 then run 2")
    card = write_model_card(run, model).read_text()
    assert "world_teacher.safetensors" in card and "within" in card  # the size budget is checked
    assert "| teacher | 3 |" in card and "run 1 then run 2" in card
    assert (model / "teacher_loss.png").stat().st_size > 0


def test_the_model_card_says_what_the_student_started_from(tmp_path):
    run, model = tmp_path / "run", tmp_path / "model"
    run.mkdir(), model.mkdir()
    history = {"step": [1, 2], "loss": [0.2, 0.1], "seconds": [1.0, 2.0]}
    torch.save({"history": history}, run / "student_state.pt")
    card = write_model_card(run, model).read_text()
    assert "The student (initialised from the teacher)" in card and "probability-flow ODE" in card
    assert "Around the agent" not in card  # a run from before the target's choice distilled onto the ODE
    history["settings"] = {"target_sampler": "agent-renoise", "teacher_substeps": 8}
    history["started_from"] = {"init_from": "runs/old/student.safetensors", "rebase_from": "runs/old/teacher.safetensors"}
    torch.save({"history": history}, run / "student_state.pt")
    card = write_model_card(run, model).read_text()
    assert "moved by the teacher's change since: `runs/old/student.safetensors` + (teacher - `runs/old/teacher" in card
    assert "Around the agent it is where the teacher's own sampler takes them" in card and "8-step list" in card


def test_the_model_card_names_the_physics_placement_and_the_warm_up_only_when_the_run_had_them(tmp_path):
    run, model = tmp_path / "run", tmp_path / "model"
    run.mkdir(), model.mkdir()
    history = {"step": [1, 2], "loss": [0.2, 0.1], "seconds": [1.0, 2.0],
               "settings": {"target_sampler": "agent-redraw", "teacher_substeps": 8, "warmup_chunks": 0}}
    torch.save({"history": history}, run / "student_state.pt")
    card = write_model_card(run, model).read_text()
    assert "drawn again by the world" in card and "agent_path" not in card and "streams 0 to" not in card
    history["settings"].update(target_sampler="agent-physics", warmup_chunks=12)
    torch.save({"history": history}, run / "student_state.pt")
    card = write_model_card(run, model).read_text()
    assert "drawn again by the world" in card and "`agent_path`" in card and "streams 0 to 12 chunks" in card
