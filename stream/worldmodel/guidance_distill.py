"""Guidance distillation: a student that streams unguided what the guided student streams.

Classifier-free guidance runs every DiT call on the prompt and on the null prompt, ~1.5x the DiT's time on a CPU.
Here a copy of the student (the pupil) learns, in one unguided pass, the clean estimates that the student (the
guide) makes under guidance: the first stage of Meng et al., "On Distillation of Guided Diffusion Models" (2023),
on the pupil's own rollouts. Each chunk runs the pupil's few-step sampler as the engine does (clean estimate, fresh
noise at the next sigma); at every step the pupil's clean estimate is regressed onto the guide's guided estimate
from the same noisy latents under the same context, and the pupil's estimate (not the guide's) goes on. Both sides
commit the pupil's output as their clean context, so the pupil learns on contexts of its own making (Self-Forcing's
fix for exposure bias). A rollout first streams up to `warmup_chunks` chunks unscored, and may switch prompt once
(with re-cache) part-way, as streams and the evaluation do. Each chunk is one optimizer step.

No data is needed: prompts and keys are drawn as the evaluation draws them (`random_settings`, `HeldKeys`).

    python3 -m framecast.stream.worldmodel.guidance_distill --out runs/guidance --max-minutes 40
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from framecast.kernels.compute_dtype import bf16_autocast_enabled, default_dtype
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import ConfigError
from framecast.models.loading import load_dit, save_dit
from framecast.models.world.episodes import HeldKeys
from framecast.models.world.prompt import random_settings
from framecast.models.world.text_encoder import WorldTextEncoder, load_text_encoder
from framecast.stream.sampler import FlowMatchSchedule, Step, renoise, to_clean
from framecast.stream.worldmodel.recipe import (
    CHUNK_FRAMES, GUIDED_STUDENT_GUIDANCE, LATENT_SIZE, SHIFT, STREAM_STEPS, STUDENT_FILE, STUDENT_STEPS,
    TEXT_ENCODER_FILE, WEIGHTS_DIR,
)
from framecast.stream.worldmodel.student import GuidedTeacher, Rollout
from framecast.stream.worldmodel.teacher import CheckpointClock, update_ema

STATE_FILE = "guidance_state.pt"
PUPIL_FILE = "student.safetensors"


@dataclass(frozen=True)
class GuidanceSettings:
    guidance: float = GUIDED_STUDENT_GUIDANCE  # the scale the guide streams with
    batch: int = 8
    rollout_chunks: int = 6
    warmup_chunks: int = 8  # unscored chunks before the scored ones: 0..this many (uniform)
    switch_share: float = 0.5  # rollouts that switch prompt (with re-cache) at a random scored chunk
    # the step lists a rollout samples with, and how often: the default stream's first, then those the deadline
    # scheduler degrades to and the evaluation's other rows
    schedules: tuple[tuple[int, ...], ...] = (STREAM_STEPS, STUDENT_STEPS[4], STUDENT_STEPS[2], STUDENT_STEPS[1])
    schedule_weights: tuple[float, ...] = (0.55, 0.15, 0.15, 0.15)
    learning_rate: float = 1e-4
    ema_decay: float = 0.995
    updates: int = 1_000_000  # --max-minutes usually ends training first
    checkpoint_every_s: float = 180.0
    bfloat16_autocast: bool | None = None  # None: where the device multiplies bf16 natively (compute_dtype)

    def __post_init__(self) -> None:
        for name in ("batch", "rollout_chunks", "updates"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.warmup_chunks, int) or self.warmup_chunks < 0:
            raise ConfigError(f"warmup_chunks={self.warmup_chunks!r} must be an integer >= 0")
        if not 1.0 < self.guidance <= 10.0:
            raise ConfigError(f"guidance={self.guidance} must be in (1, 10]: there is nothing to distil at 1")
        if not 0 <= self.switch_share <= 1:
            raise ConfigError(f"switch_share={self.switch_share} must be in [0, 1]")
        if len(self.schedules) != len(self.schedule_weights) or not self.schedules:
            raise ConfigError(f"{len(self.schedules)} schedules for {len(self.schedule_weights)} schedule_weights")
        if min(self.schedule_weights) < 0 or sum(self.schedule_weights) <= 0:
            raise ConfigError(f"schedule_weights={self.schedule_weights} must be >= 0, not all 0")
        for steps in self.schedules:
            FlowMatchSchedule(SHIFT).warp(steps)  # raises ConfigError on a bad step list


def pupil_chunk(
    pupil: CausalWanDiT, mine: Rollout, guide: GuidedTeacher | None, noise: Tensor, schedule: Sequence[Step],
    actions: Tensor, generator: torch.Generator, autocast: torch.autocast,
) -> tuple[Tensor, float]:
    """One chunk of the pupil's sampler from `noise`; with a `guide`, every step's clean estimate is regressed onto
    the guide's guided one from the same latents (gradients accumulate). Returns (the chunk's clean latents, the
    mean loss over its steps; NaN without a guide)."""
    x, x0, losses = noise, noise, []
    batch, frames = actions.shape
    for step in schedule:
        timesteps = torch.full((batch, frames), step.timestep, dtype=torch.float32, device=noise.device)
        target = None
        if guide is not None:
            with torch.no_grad():
                guide.memory.begin_chunk(frames)
                flow = guide(x.to(guide.dtype), timesteps, guide.text, guide.memory, actions)
                target = to_clean(x.float(), flow.float(), step.sigma)
        mine.memory.begin_chunk(frames)
        with autocast, torch.set_grad_enabled(target is not None):
            flow = pupil(x, timesteps, mine.text, mine.memory, actions)
        x0 = x.float() - step.sigma * flow.float()
        if target is not None:
            loss = ((x0 - target) ** 2).mean()
            (loss / len(schedule)).backward()
            losses.append(float(loss.detach()))
        x0 = x0.detach()
        if not step.is_last:
            x = renoise(x0, torch.randn(x0.shape, generator=generator).to(x0.device), step.next_sigma)
    return x0, float(np.mean(losses)) if losses else float("nan")


class RolloutPlan:
    """What one rollout asks: each clip's first and (when it switches) second scene, its keys, the warm-up length
    and the scored chunk the switch lands on (None: no switch)."""

    def __init__(self, settings: GuidanceSettings, rng: np.random.Generator) -> None:
        self.warmup = int(rng.integers(settings.warmup_chunks + 1))
        self.first = [random_settings(rng) for _ in range(settings.batch)]
        self.switch_chunk = None
        if settings.rollout_chunks > 1 and rng.random() < settings.switch_share:
            self.switch_chunk = int(rng.integers(1, settings.rollout_chunks))
        self.second = [random_settings(rng, unlike=s) for s in self.first]
        frames = (self.warmup + settings.rollout_chunks) * CHUNK_FRAMES
        self.actions = torch.from_numpy(np.stack([HeldKeys().actions(rng, frames) for _ in range(settings.batch)]))
        weights = np.array(settings.schedule_weights) / sum(settings.schedule_weights)
        self.steps = settings.schedules[int(rng.choice(len(settings.schedules), p=weights))]

    def chunk_actions(self, chunk: int) -> Tensor:
        return self.actions[:, chunk * CHUNK_FRAMES : (chunk + 1) * CHUNK_FRAMES]


def distil_rollout(
    pupil: CausalWanDiT, guide_dit: CausalWanDiT, text_encoder: WorldTextEncoder, settings: GuidanceSettings,
    plan: RolloutPlan, generator: torch.Generator, device: torch.device, step_optimizer,
) -> list[float]:
    """One rollout: warm-up chunks, then scored chunks, each followed by `step_optimizer()`. Returns the losses."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=bf16_autocast_enabled(device, settings.bfloat16_autocast))
    mine, guide = Rollout(pupil), GuidedTeacher(guide_dit, settings.guidance)
    schedule = FlowMatchSchedule(SHIFT).steps(plan.steps)
    with torch.no_grad():
        first, second = (text_encoder.encode(scenes).to(device) for scenes in (plan.first, plan.second))
    with autocast:
        mine.set_prompt(first, recache=False)
    guide.set_prompt(first.to(guide.dtype), recache=False)
    shape = (settings.batch, CHUNK_FRAMES, pupil.config.in_dim, LATENT_SIZE, LATENT_SIZE)
    losses = []
    for chunk in range(plan.warmup + settings.rollout_chunks):
        scored = chunk >= plan.warmup
        if plan.switch_chunk is not None and chunk == plan.warmup + plan.switch_chunk:
            with autocast:
                mine.set_prompt(second, recache=True)
            guide.set_prompt(second.to(guide.dtype), recache=True)
        actions = plan.chunk_actions(chunk).to(device)
        noise = torch.randn(shape, generator=generator).to(device)
        clean, loss = pupil_chunk(pupil, mine, guide if scored else None, noise, schedule, actions, generator, autocast)
        if scored:
            step_optimizer()
            losses.append(loss)
        with autocast:
            mine.commit(clean, actions)
        guide.commit(clean.to(guide.dtype), actions)
    return losses


def distil_guidance(
    out: Path, settings: GuidanceSettings = GuidanceSettings(), max_minutes: float | None = None, seed: int = 0,
    device: str = "cpu", source: Path = WEIGHTS_DIR, progress: bool = True,
) -> dict:
    """Distil the guided student of `source` (its student and text encoder files) into `out/student.safetensors`
    (EMA, bfloat16), resuming from `out` when a state is there; returns the history."""
    out.mkdir(parents=True, exist_ok=True)
    device_ = torch.device(device)
    guide = load_dit(source / STUDENT_FILE, dtype=default_dtype(device_), device=device_).eval().requires_grad_(False)
    text_encoder = load_text_encoder(source / TEXT_ENCODER_FILE).to(device_).requires_grad_(False)
    pupil = load_dit(source / STUDENT_FILE, dtype=torch.float32, device=device_).train()
    ema = copy.deepcopy(pupil).requires_grad_(False)
    optimizer = torch.optim.AdamW(pupil.parameters(), lr=settings.learning_rate, weight_decay=0.0, betas=(0.9, 0.99))
    history: dict = {"update": [], "loss": [], "steps_used": [], "seconds": [], "settings": asdict(settings),
                     "source": str(source)}
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    state_path, elapsed = out / STATE_FILE, 0.0
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        pupil.load_state_dict(state["pupil"]), ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        elapsed, history = state["elapsed"], state["history"]
        generator.set_state(state["generator"])
        rng.bit_generator.state = state["rng"]

    def checkpoint() -> None:
        partial = out / (STATE_FILE + ".partial")
        torch.save({"pupil": pupil.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                    "elapsed": elapsed, "history": history, "generator": generator.get_state(),
                    "rng": rng.bit_generator.state}, partial)
        partial.replace(state_path)
        save_dit(copy.deepcopy(ema).to(torch.bfloat16), out / PUPIL_FILE)

    def step_optimizer() -> None:
        torch.nn.utils.clip_grad_norm_(pupil.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, pupil, settings.ema_decay)

    started, clock = time.perf_counter() - elapsed, CheckpointClock(checkpoint, settings.checkpoint_every_s)
    bar = tqdm(total=settings.updates, initial=len(history["update"]), desc="guidance distillation", unit="update",
               disable=not progress)
    while len(history["update"]) < settings.updates:
        if max_minutes is not None and (time.perf_counter() - started) / 60 >= max_minutes:
            break
        plan = RolloutPlan(settings, rng)
        optimizer.zero_grad(set_to_none=True)
        losses = distil_rollout(pupil, guide, text_encoder, settings, plan, generator, device_, step_optimizer)
        elapsed = time.perf_counter() - started
        for loss in losses:
            history["update"].append(len(history["update"]) + 1)
            history["loss"].append(loss), history["steps_used"].append(len(plan.steps))
            history["seconds"].append(elapsed)
        bar.update(len(losses))
        bar.set_postfix(loss=f"{np.mean(history['loss'][-60:]):.4f}", min=f"{elapsed / 60:.1f}")
        clock.tick()
    bar.close()
    clock.final()
    return history


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the run folder (state and student.safetensors)")
    p.add_argument("--source", type=Path, default=WEIGHTS_DIR, help="the folder of the guided student")
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--batch", type=int, default=GuidanceSettings.batch)
    p.add_argument("--lr", type=float, default=GuidanceSettings.learning_rate)
    p.add_argument("--guidance", type=float, default=GuidanceSettings.guidance)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = GuidanceSettings(batch=args.batch, learning_rate=args.lr, guidance=args.guidance)
    distil_guidance(args.out, settings, args.max_minutes, device=args.device, source=args.source)


if __name__ == "__main__":
    main()
