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
    with pytest.raises(ConfigError, match="the teacher, the student and its guidance distillation need time"):
        TrainWorldSettings(teacher_minutes=0)
    with pytest.raises(ConfigError, match="streams the student unguided, as distilled"):
        TrainWorldSettings(guidance_minutes=0)
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


def test_compacted_histories_keep_the_curve_ends_and_the_final_loss():
    from framecast.stream.worldmodel.card import CURVE_POINTS, compact_history

    losses = [1.0 / (i + 1) for i in range(1000)]
    history = {"step": list(range(1, 1001)), "loss": losses, "seconds": [float(i) for i in range(1000)],
               "settings": {"batch": 4}}
    compact = compact_history(history)
    assert len(compact["loss"]) <= CURVE_POINTS + 1 and compact["step"][0] == 1 and compact["step"][-1] == 1000
    assert compact["final_step"] == 1000 and compact["final_loss"] == pytest.approx(sum(losses[-50:]) / 50)
    assert compact["settings"] == {"batch": 4} and compact["seconds"][-1] == 999.0


def test_the_card_keeps_the_histories_in_the_model_folder_and_writes_again_from_them(tmp_path):
    from framecast.stream.worldmodel.card import HISTORY_FILE

    run, model = tmp_path / "run", tmp_path / "model"
    (run / "guidance").mkdir(parents=True), model.mkdir()
    guidance = {"update": list(range(1, 31)), "loss": [0.01 - 0.0002 * i for i in range(30)],
                "seconds": [60.0 * i for i in range(30)], "steps_used": [3] * 30,
                "settings": {"guidance": 1.5, "batch": 8, "rollout_chunks": 6, "warmup_chunks": 8,
                             "schedules": [[1000, 500, 250]], "schedule_weights": [1.0], "learning_rate": 1e-4,
                             "ema_decay": 0.995}}
    torch.save({"history": guidance}, run / "guidance" / "guidance_state.pt")
    by_hand = {"kept_by_hand": "from an earlier card", "settings": {"prompt_dropout": 0.15}, "step": [2742],
               "loss": [1.1649], "seconds": [4194.0], "final_step": 2742, "final_loss": 1.1649}
    (model / HISTORY_FILE).write_text(json.dumps({"teacher": by_hand}))
    card = write_model_card(run, model).read_text()
    assert "| teacher | 2,742 | 69.9 | 1.1649 |" in card and "| guidance distillation | 30 |" in card
    assert "The teacher rows and plots are kept from earlier cards" in card
    assert "**Guidance distillation: the guided student in one pass.**" in card and "guidance at 1.5" in card
    assert (model / "guidance_loss.png").stat().st_size > 0 and not (model / "teacher_loss.png").exists()
    kept = json.loads((model / HISTORY_FILE).read_text())
    assert set(kept) == {"teacher", "guidance"} and kept["guidance"]["final_step"] == 30
    (run / "guidance" / "guidance_state.pt").unlink()  # the run folder gone: the card comes from the model folder
    assert write_model_card(run, model).read_text() == card
