"""`framecast train world`: the whole recipe of the embedded model, resumable, in one command.

    data (episodes of the world) -> autoencoder -> latent clips -> teacher -> student -> guidance distillation
        -> evaluation -> model card

Every stage checkpoints into its run folder every few minutes and is skipped once done (`progress.json`), so a
rerun after an interruption continues where it stopped, also on a fresh machine given the folder. Time caps per
stage keep the whole run within ~2 hours on a 2-core CPU: each stage fits its learning-rate schedule into its cap
(the pace is measured as it trains), so a faster machine (`--device cuda`) trains more steps in the same caps.
`--ship` copies the finished model, its evaluation and its card into models/world/weights.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from framecast.models.errors import ConfigError
from framecast.stream.worldmodel.recipe import (
    AUTOENCODER_FILE, STUDENT_FILE, TEACHER_FILE, TEXT_ENCODER_FILE, WEIGHTS_DIR,
)

PROGRESS_FILE = "progress.json"
MODEL_FOLDER = "model"


@dataclass(frozen=True)
class TrainWorldSettings:
    autoencoder_minutes: float = 30.0  # 0: use the shipped autoencoder (the latents the shipped DiTs were trained on)
    # with the 30 of the autoencoder, 15 + 15 of the student and ~25 of eval: < 2 hours
    teacher_minutes: float = 35.0
    student_minutes: float = 15.0
    # the guided student distilled into one that streams unguided (guidance_distill.py): the shipped student
    # streams its 3 steps at ~1.5x the speed of the guided one
    guidance_minutes: float = 15.0
    clips: int = 3000
    evaluate: bool = True
    eval_frames: int = 1800  # as EvalSettings.frames (30 scenes)
    eval_long_frames: int = 5000

    def __post_init__(self) -> None:
        for name in ("autoencoder_minutes", "teacher_minutes", "student_minutes", "guidance_minutes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if self.teacher_minutes == 0 or self.student_minutes == 0 or self.guidance_minutes == 0:
            raise ConfigError("the teacher, the student and its guidance distillation need time (> 0 minutes): "
                              "every command streams the student unguided, as distilled")


class Progress:
    """Which stages of a run are done, and how long each took (a JSON file in the run folder)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / PROGRESS_FILE
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {"done": {}}

    def done(self, stage: str) -> bool:
        return stage in self.state["done"]

    def mark(self, stage: str, seconds: float, **facts: object) -> None:
        self.state["done"][stage] = {"seconds": round(seconds, 1), **facts}
        self.path.write_text(json.dumps(self.state, indent=1))


def train_world(out: Path, settings: TrainWorldSettings = TrainWorldSettings(), device: str = "cpu",
                ship: bool = False) -> Path:
    """Run (or resume) the recipe in `out`; returns the folder holding the finished model files."""
    from framecast.models.world.autoencoder import preset as autoencoder_preset
    from framecast.models.world.train_autoencoder import TrainSettings, ship as ship_autoencoder, train_autoencoder
    from framecast.stream.worldmodel.guidance_distill import GuidanceSettings, distil_guidance
    from framecast.stream.worldmodel.student import StudentSettings, train_student
    from framecast.stream.worldmodel.teacher import TeacherSettings, train_teacher

    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(out)
    model_dir = out / MODEL_FOLDER
    model_dir.mkdir(exist_ok=True)
    (out / "settings.json").write_text(json.dumps(asdict(settings), indent=1))

    autoencoder = WEIGHTS_DIR / AUTOENCODER_FILE
    if settings.autoencoder_minutes:
        run = out / "autoencoder"
        if not progress.done("autoencoder"):
            started = time.perf_counter()
            # the shipped recipe's last run (squared errors, agent-centred crops), from scratch
            train_autoencoder(autoencoder_preset("world-128"), steps=100_000, batch=2, seed=0, out_dir=run,
                              device=device, settings=TrainSettings(), max_seconds=settings.autoencoder_minutes * 60)
            ship_autoencoder(run, model_dir)
            progress.mark("autoencoder", time.perf_counter() - started)
        autoencoder = model_dir / AUTOENCODER_FILE
    elif not (model_dir / AUTOENCODER_FILE).exists():
        shutil.copy2(autoencoder, model_dir / AUTOENCODER_FILE)

    if not progress.done("teacher"):
        started = time.perf_counter()
        train_teacher(out, TeacherSettings(clips=settings.clips), settings.teacher_minutes, device, autoencoder)
        progress.mark("teacher", time.perf_counter() - started)
    if not progress.done("student"):
        started = time.perf_counter()
        train_student(out, StudentSettings(), settings.student_minutes, device=device, autoencoder_path=autoencoder)
        progress.mark("student", time.perf_counter() - started)
    guided = out / "guided_student"  # the guide of the guidance distillation: the student and its text encoder
    guided.mkdir(exist_ok=True)
    for source, name in (("student.safetensors", STUDENT_FILE), ("text_encoder.safetensors", TEXT_ENCODER_FILE)):
        shutil.copy2(out / source, guided / name)
    if not progress.done("guidance"):
        started = time.perf_counter()
        distil_guidance(out / "guidance", GuidanceSettings(), settings.guidance_minutes, device=device, source=guided)
        progress.mark("guidance", time.perf_counter() - started)
    for source, name in (("teacher.safetensors", TEACHER_FILE), ("guidance/student.safetensors", STUDENT_FILE),
                         ("text_encoder.safetensors", TEXT_ENCODER_FILE)):
        shutil.copy2(out / source, model_dir / name)

    if settings.evaluate and not progress.done("evaluate"):
        from framecast.stream.worldmodel.evaluate import EvalSettings, evaluate_world

        started = time.perf_counter()
        evaluate_world(model_dir, EvalSettings(frames=settings.eval_frames, long_frames=settings.eval_long_frames),
                       out=model_dir)
        progress.mark("evaluate", time.perf_counter() - started)
    from framecast.stream.worldmodel.card import write_model_card

    write_model_card(out, model_dir)
    if ship:
        for path in model_dir.iterdir():
            shutil.copy2(path, WEIGHTS_DIR / path.name)
    return model_dir


def main_train(out: Path, settings: TrainWorldSettings, device: str, ship: bool, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    folder = train_world(out, settings, device, ship)
    print(f"framecast: the world model is in {folder}" + (f" and shipped to {WEIGHTS_DIR}" if ship else ""))
