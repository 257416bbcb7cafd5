"""Distil the teacher into a 1/2/4-step student that trains on its own rollouts.

Method: trajectory distillation on self-rollouts. The student streams clips chunk by chunk exactly as the engine
will (few-step sampler with fresh noise between steps, a clean context pass of its own output into a rolling KV
cache, a prompt switch with recache where the clip switches, the clip's actions), so every chunk after the first is
conditioned on the student's own past: the exposure-bias fix of Self-Forcing. For each chunk one exit step k of the
schedule is drawn (Self-Forcing's trick: gradients at one step, the earlier ones run without them); the student's
clean estimate at step k is regressed onto the teacher's answer from the same noisy latents under the same
(student-made) context (`distillation_target`): around the agent, where the teacher's own sampler takes them, with
the prompt's agent redrawn there by the world (`models/world/agent_redraw.py`: the teacher decides where the agent
goes, the world what it looks like); elsewhere the endpoint of its ODE. The ODE draws the agent's shape far worse than
the sampler, and a regression onto the sampler's random answer everywhere blurs falling rain and snow, which the ODE
keeps sharp (the model card has the A/Bs). The teacher's flow in both is classifier-free guided (`GuidedTeacher`,
`StudentSettings.guidance`): at 1.5 its 8-step stream reads the weather and the agent's shape right where the plain
teacher's does not (MODEL_CARD.md). No critic network as DMD needs: at this size a second network and its updates
would cost as much as the student's own. The teacher also answers for the parts of a frame that the context leaves
open (the first chunk's layout), which a regression onto recorded ground truth would blur. The chunk's output (its
context for the next) is the exit step's estimate. Before its trained chunks a rollout first streams up to
`warmup_chunks` chunks with the student alone (Self-Forcing++'s rollout past the trained horizon), so the trained
chunks sit as deep in the student's own output as a long stream's, where drawn detail fades.

    python3 -m framecast.stream.worldmodel.student --out runs/world --max-minutes 30
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
from framecast.models.dit import CausalWanDiT, TextContext
from framecast.models.errors import ConfigError
from framecast.models.loading import load_dit, save_dit
from framecast.kernels.attention import attention
from framecast.models.world.agent_redraw import redraw_agent
from framecast.models.world.autoencoder import WorldAutoencoder, frames_to_tensor, load_autoencoder, tensor_to_frames
from framecast.models.world.ground_truth import read_agent
from framecast.models.world.latent_clips import LatentClips
from framecast.models.world.prompt import SceneSettings
from framecast.models.world.state import WorldConfig
from framecast.models.world.text_encoder import WorldTextEncoder, load_text_encoder, tokens_settings
from framecast.models.world.world import agent_path
from framecast.stream.sampler import FlowMatchSchedule, Step, renoise, to_clean
from framecast.stream.worldmodel.recipe import (
    AUTOENCODER_FILE, CHUNK_FRAMES, GUIDANCE, SHIFT, STUDENT_STEPS, WEIGHTS_DIR, WINDOW_FRAMES, teacher_step_list,
)
from framecast.stream.worldmodel.teacher import (
    CLIPS_FILE, CheckpointClock, agent_weights, null_text, shifted_sigmas, update_ema,
)

STATE_FILE = "student_state.pt"
TARGET_SAMPLERS = ("renoise", "ode", "agent-renoise", "agent-redraw", "agent-physics")


@dataclass(frozen=True)
class StudentSettings:
    steps: int = 100_000  # iterations (one batch of rollouts each); --max-minutes usually ends training first
    batch: int = 4
    rollout_chunks: int = 8
    learning_rate: float = 1e-4
    # the target: "renoise" continues the exit step's noisy latents with the teacher run as the engine runs it (clean
    # estimate, fresh noise at the next sigma) on a `teacher_substeps`-step grid; "ode" takes the endpoint of the
    # teacher's probability-flow ODE (Euler, `teacher_substeps` steps from the exit sigma), which draws the agent's
    # shape far worse than the teacher's own sampler does (MODEL_CARD.md); "agent-renoise" takes the teacher's
    # sampler around the agent and the ODE elsewhere (a regression onto a random target blurs what is random in it:
    # falling rain and snow, which the ODE keeps sharp); "agent-redraw" is "agent-renoise" with the prompt's agent
    # sprite redrawn by the world over the teacher's sample where it drew the agent (`AgentLocator.redraw`);
    # "agent-physics" is "agent-redraw" with the sprite drawn where the world's physics takes the agent from the
    # student's last two context frames under the chunk's keys (`world.agent_path`), not where the teacher put it:
    # the teacher's own guided stream jumps the agent by 2.9 px (max 6.5) at a prompt switch (MODEL_CARD.md)
    target_sampler: str = "agent-redraw"
    teacher_substeps: int = 8
    # classifier-free guidance of the teacher's flow (1: none): null + scale x (prompt - null), the null prompt being
    # the one the teacher trained on with `TeacherSettings.prompt_dropout`
    guidance: float = GUIDANCE
    step_weights: tuple[float, float, float] = (0.25, 0.25, 0.5)  # how often rollouts use 1, 2, 4 steps
    # before its trained chunks a rollout streams 0..warmup_chunks chunks (uniform) with the student's own sampler,
    # no teacher target and no gradients, as Self-Forcing++ rolls out past the trained horizon: the trained chunks
    # then sit on contexts as deep in the student's own output as an eval scene's 20 chunks, where corners round off
    # and rain thins (MODEL_CARD.md). Half of the warm-ups stream another clip's prompt, so that the trained chunks
    # follow a prompt switch after a long scene, as in the eval (clips switch at most 4 chunks before their end).
    warmup_chunks: int = 12
    agent_weight: float = 10.0  # extra loss weight under the agent, found in the decoded target (as the teacher's)
    ema_decay: float = 0.99
    checkpoint_every_s: float = 180.0
    bfloat16_autocast: bool | None = None  # None: where the device multiplies bf16 natively (compute_dtype)

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "rollout_chunks", "teacher_substeps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.warmup_chunks, int) or self.warmup_chunks < 0:
            raise ConfigError(f"warmup_chunks={self.warmup_chunks!r} must be an integer >= 0")
        if not 1.0 <= self.guidance <= 10.0:
            raise ConfigError(f"guidance={self.guidance} must be in [1, 10] (1: no guidance)")
        if self.target_sampler not in TARGET_SAMPLERS:
            raise ConfigError(f"target_sampler={self.target_sampler!r} must be one of {TARGET_SAMPLERS}")
        if len(self.step_weights) != len(STUDENT_STEPS) or min(self.step_weights) < 0 or sum(self.step_weights) <= 0:
            raise ConfigError(f"step_weights={self.step_weights} must be {len(STUDENT_STEPS)} weights >= 0, not all 0")


def teacher_target(
    teacher: CausalWanDiT | GuidedTeacher, x: Tensor, sigma: float, text: TextContext, memory: TrainingWindow,
    actions: Tensor,
    substeps: int,
) -> Tensor:
    """Where the teacher's probability-flow ODE goes from x at `sigma` (Euler, shifted spacing): clean latents."""
    u_start = sigma / (SHIFT - (SHIFT - 1) * sigma)  # inverse of shifted_sigmas
    sigmas = shifted_sigmas(torch.linspace(u_start, 0.0, substeps + 1)).tolist()
    batch, frames = x.shape[:2]
    x = x.to(teacher.dtype)
    for now, after in zip(sigmas[:-1], sigmas[1:]):
        memory.begin_chunk(frames)
        timesteps = torch.full((batch, frames), now * 1000, dtype=torch.float32, device=x.device)
        flow = teacher(x, timesteps, text, memory, actions)
        x = (x.float() + (after - now) * flow.float()).to(teacher.dtype)
    return x.float()


def teacher_sample(
    teacher: CausalWanDiT | GuidedTeacher, x: Tensor, sigma: float, text: TextContext, memory: TrainingWindow,
    actions: Tensor,
    substeps: int, generator: torch.Generator,
) -> Tensor:
    """Where the teacher's own sampler takes x at `sigma`: a clean estimate, then fresh noise at the next sigma of
    its `substeps`-step grid (the engine's teacher step list), down to 0. Returns clean latents (float32)."""
    grid = [step.sigma for step in FlowMatchSchedule(SHIFT).steps(teacher_step_list(substeps))] + [0.0]
    sigmas = [sigma] + [g for g in grid if g < sigma - 1e-9]
    batch, frames = x.shape[:2]
    x = x.to(teacher.dtype)
    for now, after in zip(sigmas[:-1], sigmas[1:]):
        memory.begin_chunk(frames)
        timesteps = torch.full((batch, frames), now * 1000, dtype=torch.float32, device=x.device)
        x0 = to_clean(x.float(), teacher(x, timesteps, text, memory, actions).float(), now)
        x = renoise(x0, torch.randn(x.shape, generator=generator).to(x.device), after).to(teacher.dtype)
    return x0


class TrainingWindow:
    """The engine's rolling KV cache (no sinks) for training: the same frames attended at the same RoPE positions,
    but context kept as per-layer tensors that are concatenated, never written in place, so autograd can go
    through the frames in flight (a KVCache writes every layer into one buffer, which backward cannot allow)."""

    def __init__(self, layers: int, window_frames: int, tokens_per_frame: int) -> None:
        self.window_frames, self.tokens_per_frame = window_frames, tokens_per_frame
        self.keys: list[Tensor | None] = [None] * layers
        self.values: list[Tensor | None] = [None] * layers
        self.pending: list[tuple[Tensor, Tensor] | None] = [None] * layers
        self.committed_frames = 0
        self._plan: tuple[int, int, bool] | None = None  # first, stop, is a recache

    nbytes = 0

    def begin_chunk(self, num_frames: int) -> None:
        self._plan = (self.committed_frames, self.committed_frames + num_frames, False)

    def begin_recache(self) -> range:
        first = max(self.committed_frames - self.window_frames, 0)
        self._plan = (first, self.committed_frames, True)
        return range(first, self.committed_frames)

    def rope_positions(self) -> tuple[int, ...]:
        first, stop, _ = self._plan
        return tuple(range(first, stop))

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        first, stop, recache = self._plan
        self.pending[layer] = (k, v)
        context = 0 if recache or self.keys[layer] is None else (self.window_frames - (stop - first)) * self.tokens_per_frame
        if context:
            k = torch.cat([self.keys[layer][:, -context:].to(k.dtype), k], 1)
            v = torch.cat([self.values[layer][:, -context:].to(v.dtype), v], 1)
        return attention(q, k, v)

    def commit(self) -> None:
        first, stop, recache = self._plan
        keep = self.window_frames * self.tokens_per_frame
        for layer, (k, v) in enumerate(self.pending):
            k, v = k.detach(), v.detach()
            if not recache and self.keys[layer] is not None:
                k, v = torch.cat([self.keys[layer], k], 1), torch.cat([self.values[layer], v], 1)
            self.keys[layer], self.values[layer] = k[:, -keep:], v[:, -keep:]
        if not recache:
            self.committed_frames = stop
        self._plan = None

    def reset(self) -> None:
        self.__init__(len(self.keys), self.window_frames, self.tokens_per_frame)


class Rollout:
    """One model's side of a rollout: its context window and text context; the chunk loop is `rollout_loss`."""

    def __init__(self, dit: CausalWanDiT) -> None:
        self.dit = dit
        self.memory = TrainingWindow(dit.config.num_layers, WINDOW_FRAMES, dit.config.tokens_per_frame(16, 16))
        self.text: TextContext | None = None
        self.history: list[tuple[Tensor, Tensor]] = []  # (clean latents, actions) of committed chunks

    def set_prompt(self, prompt: Tensor, recache: bool) -> None:
        with torch.no_grad():
            self.text = self.dit.encode_text(prompt)
        if recache and self.memory.committed_frames:
            frames = self.memory.begin_recache()
            latents = torch.cat([h[0] for h in self.history], 1)[:, -len(frames):]
            actions = torch.cat([h[1] for h in self.history], 1)[:, -len(frames):]
            with torch.no_grad():
                self.dit(latents, torch.zeros(actions.shape, device=actions.device), self.text, self.memory, actions)
            self.memory.commit()

    def commit(self, clean: Tensor, actions: Tensor) -> None:
        """The clean context pass of a finished chunk."""
        self.memory.begin_chunk(clean.shape[1])
        with torch.no_grad():
            self.dit(clean, torch.zeros(actions.shape, device=actions.device), self.text, self.memory, actions)
        self.memory.commit()
        self.history = (self.history + [(clean.detach(), actions)])[-(WINDOW_FRAMES // CHUNK_FRAMES):]


class GuidedTeacher(Rollout):
    """The teacher's side of a rollout under classifier-free guidance, callable like the DiT: its flow is
    null + scale x (prompt - null). The null prompt keeps a context window of its own (context K/V depend on the
    prompt through every block's cross-attention), fed the same clean chunks. Scale 1 is the plain teacher."""

    def __init__(self, dit: CausalWanDiT, scale: float = 1.0) -> None:
        super().__init__(dit)
        self.scale = scale
        self.null = Rollout(dit) if scale != 1.0 else None
        self.dtype = dit.dtype

    def set_prompt(self, prompt: Tensor, recache: bool) -> None:
        super().set_prompt(prompt, recache)
        if self.null is not None:
            self.null.set_prompt(null_text(prompt), recache)

    def commit(self, clean: Tensor, actions: Tensor) -> None:
        super().commit(clean, actions)
        if self.null is not None:
            self.null.commit(clean, actions)

    def __call__(self, x: Tensor, timesteps: Tensor, text: TextContext, memory: TrainingWindow, actions: Tensor) -> Tensor:
        flow = self.dit(x, timesteps, text, memory, actions)
        if self.null is None:
            return flow
        self.null.memory.begin_chunk(x.shape[1])
        compute = torch.promote_types(flow.dtype, torch.float32)  # bf16 flows combine in float32
        null = self.dit(x, timesteps, self.null.text, self.null.memory, actions).to(compute)
        return (null + self.scale * (flow.to(compute) - null)).to(flow.dtype)


def pick_rollout_clips(clips: LatentClips, batch: int, chunks: int, rng: np.random.Generator) -> tuple[Tensor, int | None]:
    """Clip indices that all switch prompt at the same chunk (or never) within the rollout, and that chunk."""
    frames = chunks * CHUNK_FRAMES
    tokens = clips.tokens[:, :frames]
    changes = (tokens[:, 1:] != tokens[:, :-1]).any(-1)  # [N, frames-1]
    first_change = torch.where(changes.any(1), changes.float().argmax(1) + 1, torch.full((len(clips),), -1))
    anchor = int(first_change[rng.integers(len(clips))])
    pool = torch.nonzero(first_change == anchor).flatten().numpy()
    index = torch.from_numpy(rng.choice(pool, batch, replace=len(pool) < batch))
    return index, (anchor // CHUNK_FRAMES if anchor > 0 else None)


class AgentLocator:
    """Where the agent is in clean latents: decoded (one chunk, no carried state) and read by the exact pixel
    reader; frames where no agent is read get no extra weight. ~10 ms a chunk, next to ~1 s of teacher ODE."""

    def __init__(self, autoencoder: WorldAutoencoder) -> None:
        self.autoencoder = autoencoder.eval().requires_grad_(False)

    @torch.no_grad()
    def path_on(self, context: Tensor, actions: Tensor) -> Tensor:
        """Where the world's physics takes the agent over `actions` ([B, F]) from the last two frames of `context`
        (clean latents [B, >=2, ...]): [B, F, 2] px, NaN for a clip whose agent is not read in both frames."""
        seen = self(context[:, -2:])
        path = torch.full((*actions.shape, 2), float("nan"))
        for b, (before_last, last) in enumerate(seen.tolist()):
            if not np.isnan(before_last + last).any():
                path[b] = torch.from_numpy(agent_path(before_last, last, actions[b].tolist(), WorldConfig()))
        return path

    def _frames(self, latents: Tensor) -> np.ndarray:
        return tensor_to_frames(self.autoencoder.decode(latents.float().cpu())[0]).numpy()  # [B, F, H, W, 3]

    @torch.no_grad()
    def __call__(self, latents: Tensor) -> Tensor:
        frames = self._frames(latents)
        xy = torch.full((*frames.shape[:2], 2), float("nan"))
        for b, clip in enumerate(frames):
            for f, frame in enumerate(clip):
                reading = read_agent(frame)
                if reading is not None:
                    xy[b, f] = torch.tensor(reading.xy)
        return xy

    @torch.no_grad()
    def redraw(self, latents: Tensor, wanted: Sequence[SceneSettings], at: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The latents re-encoded from their frames with the agent redrawn as `wanted[b]` asks
        (`models.world.agent_redraw`), and where it was drawn ([B, F, 2] px, NaN where no agent was read: those
        frames come back re-encoded as they were). `at` ([B, F, 2] px, NaN: unknown) says where to draw it; where
        unknown, at the agent's place as read."""
        frames = self._frames(latents)
        xy = torch.full((*frames.shape[:2], 2), float("nan"))
        for b, clip in enumerate(frames):
            for f, frame in enumerate(clip):
                place = None if at is None or at[b, f].isnan().any() else tuple(at[b, f].tolist())
                redrawn = redraw_agent(frame, wanted[b].agent_shape, wanted[b].agent_colour, at=place)
                if redrawn is not None:
                    frames[b, f], xy[b, f] = redrawn[0], torch.tensor(redrawn[1])
        encoded = self.autoencoder.encode(frames_to_tensor(frames)).to(latents.device, latents.dtype)
        return encoded, xy


def distillation_target(
    settings: StudentSettings, theirs: GuidedTeacher, x: Tensor, sigma: float, actions: Tensor,
    generator: torch.Generator, locate_agent: AgentLocator | None, wanted: Sequence[SceneSettings] = (),
    agent_at: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The clean latents the student's estimate at `sigma` is regressed onto (`StudentSettings.target_sampler`), and
    where the agent is in them when that was read on the way ([B, F, 2], else None). `wanted`: each clip's scene
    in this chunk (for "agent-redraw" and "agent-physics"); `agent_at`: where the world's physics puts the agent
    ([B, F, 2], NaN: unknown; for "agent-physics")."""
    args = (theirs, x, sigma, theirs.text, theirs.memory, actions, settings.teacher_substeps)
    if settings.target_sampler == "ode":
        return teacher_target(*args), None
    sample = teacher_sample(*args, generator)
    if settings.target_sampler == "renoise":
        return sample, None
    if locate_agent is None:
        raise ConfigError(f"target_sampler={settings.target_sampler!r} needs the agent locator (an autoencoder)")
    if settings.target_sampler in ("agent-redraw", "agent-physics"):
        if len(wanted) != len(x):
            raise ConfigError(f"target_sampler={settings.target_sampler!r} needs the wanted scene of each of the "
                              f"{len(x)} clips")
        sample, xy = locate_agent.redraw(sample, wanted, agent_at if settings.target_sampler == "agent-physics" else None)
    else:
        xy = locate_agent(sample)
    near = agent_weights(torch.nan_to_num(xy, nan=-1e6).to(x.device), x.shape[-1], 1.0) > 1  # [B, F, h, w]
    return torch.where(near[:, :, None], sample, teacher_target(*args)), xy


def sample_chunk(
    student: CausalWanDiT, mine: Rollout, x: Tensor, steps: Sequence[Step], actions: Tensor,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor | None]:
    """The student's few-step sampler over `steps` from noisy x (no gradients): clean estimate, then fresh noise at
    the next sigma, as the engine runs it. Returns (x at the sigma after the last step, the last clean estimate)."""
    x0 = None
    with torch.no_grad():
        for step in steps:
            mine.memory.begin_chunk(x.shape[1])
            timesteps = torch.full(actions.shape, step.timestep, device=x.device)
            x0 = to_clean(x.float(), student(x, timesteps, mine.text, mine.memory, actions).float(), step.sigma)
            x = (1 - step.next_sigma) * x0 + step.next_sigma * torch.randn(x.shape, generator=generator).to(x.device)
    return x, x0


def warm_up(
    student: CausalWanDiT, mine: Rollout, theirs: GuidedTeacher, clips: LatentClips, chunks: int,
    prompt_tokens: Tensor, text_encoder: WorldTextEncoder, schedule: Sequence[Step], rng: np.random.Generator,
    generator: torch.Generator, autocast: torch.autocast,
) -> None:
    """`chunks` chunks streamed by the student alone (`StudentSettings.warmup_chunks`) under `prompt_tokens`, with
    the held keys of random clips; both sides commit each finished chunk as their clean context."""
    batch, frames = len(prompt_tokens), chunks * CHUNK_FRAMES
    actions = torch.cat([clips.actions[rng.integers(len(clips), size=batch)]
                         for _ in range(-(-frames // clips.frames))], 1)[:, :frames].to(prompt_tokens.device)
    with torch.no_grad():
        prompt = text_encoder(prompt_tokens)
    with autocast:
        mine.set_prompt(prompt, recache=False)
    theirs.set_prompt(prompt, recache=False)
    for chunk_actions in actions.split(CHUNK_FRAMES, 1):
        noise = torch.randn((batch, CHUNK_FRAMES, 16, 16, 16), generator=generator).to(actions.device)
        with autocast:
            clean = sample_chunk(student, mine, noise, schedule, chunk_actions, generator)[1]
            mine.commit(clean, chunk_actions)
        theirs.commit(clean.to(theirs.dtype), chunk_actions)


def rollout_loss(
    student: CausalWanDiT, teacher: CausalWanDiT, text_encoder: WorldTextEncoder, clips: LatentClips,
    settings: StudentSettings, rng: np.random.Generator, generator: torch.Generator, device: torch.device,
    locate_agent: AgentLocator | None = None,
) -> tuple[float, int]:
    """One batch of self-rollouts; accumulates gradients chunk by chunk; returns (mean loss, steps used)."""
    steps_used = list(STUDENT_STEPS)[rng.choice(len(STUDENT_STEPS), p=np.array(settings.step_weights) / sum(settings.step_weights))]
    schedule: tuple[Step, ...] = FlowMatchSchedule(SHIFT).steps(STUDENT_STEPS[steps_used])
    index, switch_chunk = pick_rollout_clips(clips, settings.batch, settings.rollout_chunks, rng)
    tokens, actions = clips.tokens[index].to(device), clips.actions[index].to(device)
    mine, theirs = Rollout(student), GuidedTeacher(teacher, settings.guidance)
    losses = []
    # bf16 autocast throughout where the machine streams in bf16 (the context passes included); losses in float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=bf16_autocast_enabled(device, settings.bfloat16_autocast))
    switched_after_warmup = False
    if settings.warmup_chunks:  # no draws without a warm-up: rollouts stay as they were
        warmup = int(rng.integers(settings.warmup_chunks + 1))
        switched_after_warmup = warmup > 0 and bool(rng.random() < 0.5)
        warmup_tokens = clips.tokens[rng.integers(len(clips), size=settings.batch), 0] if switched_after_warmup else tokens[:, 0]
        if warmup:
            warm_up(student, mine, theirs, clips, warmup, warmup_tokens.to(device), text_encoder, schedule, rng,
                    generator, autocast)
    for chunk in range(settings.rollout_chunks):
        frames = slice(chunk * CHUNK_FRAMES, (chunk + 1) * CHUNK_FRAMES)
        if chunk == 0 or chunk == switch_chunk:
            with torch.no_grad():
                prompt = text_encoder(tokens[:, frames.start])
            wanted = [tokens_settings(ids.tolist()) for ids in tokens[:, frames.start]]
            recache = chunk > 0 or switched_after_warmup
            with autocast:
                mine.set_prompt(prompt, recache=recache)
            theirs.set_prompt(prompt, recache=recache)
        chunk_actions = actions[:, frames]
        exit_step = int(rng.integers(len(schedule)))
        noise = torch.randn((settings.batch, CHUNK_FRAMES, 16, 16, 16), generator=generator).to(device)
        with autocast:
            x = sample_chunk(student, mine, noise, schedule[:exit_step], chunk_actions, generator)[0]
        step = schedule[exit_step]
        agent_at = None
        if settings.target_sampler == "agent-physics" and mine.history and locate_agent is not None:
            agent_at = locate_agent.path_on(mine.history[-1][0], chunk_actions.cpu())
        with torch.no_grad():
            target, xy = distillation_target(settings, theirs, x, step.sigma, chunk_actions, generator,
                                             locate_agent, wanted, agent_at)
        mine.memory.begin_chunk(CHUNK_FRAMES)
        with autocast:
            timesteps = torch.full(chunk_actions.shape, step.timestep, device=device)
            flow = student(x, timesteps, mine.text, mine.memory, chunk_actions)
        x0 = x - step.sigma * flow.float()
        error = ((x0 - target) ** 2).mean(dim=2)  # [B, F, h, w]
        if locate_agent is not None and settings.agent_weight:
            xy = locate_agent(target) if xy is None else xy
            weights = agent_weights(torch.nan_to_num(xy, nan=-1e6).to(device), target.shape[-1], settings.agent_weight)
            error = error * weights  # no agent read (NaN -> far away): weight 1 everywhere
        loss = error.mean()
        (loss / settings.rollout_chunks).backward()
        losses.append(float(loss.detach()))
        clean = x0.detach()
        with autocast:
            mine.commit(clean, chunk_actions)
        theirs.commit(clean.to(teacher.dtype), chunk_actions)
    return float(np.mean(losses)), steps_used


def initial_student(teacher: Path, init_from: Path, rebase_from: Path | None) -> dict[str, Tensor]:
    """The float32 weights a fresh student starts from (see `train_student`)."""
    weights = load_dit(init_from, dtype=torch.float32).state_dict()
    if rebase_from is None:
        return weights
    new, old = (load_dit(path, dtype=torch.float32).state_dict() for path in (teacher, rebase_from))
    if new.keys() != weights.keys() or old.keys() != weights.keys() or any(
        new[k].shape != w.shape or old[k].shape != w.shape for k, w in weights.items()
    ):
        raise ConfigError(f"{init_from}, {rebase_from} and {teacher} are not the same DiT: cannot rebase the student")
    return {k: w + new[k] - old[k] for k, w in weights.items()}


def train_student(
    out: Path, settings: StudentSettings = StudentSettings(), max_minutes: float | None = None, seed: int = 0,
    device: str = "cpu", autoencoder_path: Path = WEIGHTS_DIR / AUTOENCODER_FILE, init_from: Path | None = None,
    rebase_from: Path | None = None,
) -> dict:
    """Distil `out/teacher.safetensors` (resuming from `out` when a state is there); writes `out/student.safetensors`
    (EMA, bfloat16) at every checkpoint and at the end; returns the history.

    A fresh student starts from the teacher's weights, or from `init_from` (an earlier student) when given; with
    `rebase_from` (the teacher that earlier student was distilled from) it starts from init_from + (teacher -
    rebase_from): the earlier student's few-step skill carried onto the retrained teacher."""
    clips = LatentClips.load(out / CLIPS_FILE)
    device_ = torch.device(device)
    teacher = load_dit(out / "teacher.safetensors", dtype=default_dtype(device_), device=device_).eval().requires_grad_(False)
    text_encoder = load_text_encoder(out / "text_encoder.safetensors").to(device_).requires_grad_(False)
    locate_agent = AgentLocator(load_autoencoder(autoencoder_path))
    student = load_dit(out / "teacher.safetensors", dtype=torch.float32, device=device_).train()
    if init_from is not None:
        student.load_state_dict(initial_student(out / "teacher.safetensors", init_from, rebase_from))
    ema = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.learning_rate, weight_decay=0.0, betas=(0.9, 0.99))
    history: dict = {"step": [], "loss": [], "steps_used": [], "seconds": [], "settings": asdict(settings),
                     "started_from": {"init_from": init_from and str(init_from),
                                      "rebase_from": rebase_from and str(rebase_from)}}
    step, elapsed = 0, 0.0
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    state_path = out / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        student.load_state_dict(state["student"]), ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        generator.set_state(state["generator"])
        rng.bit_generator.state = state["rng"]

    def checkpoint() -> None:
        partial = out / (STATE_FILE + ".partial")
        torch.save({
            "student": student.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "step": step, "elapsed": elapsed, "history": history, "generator": generator.get_state(),
            "rng": rng.bit_generator.state,
        }, partial)
        partial.replace(state_path)
        save_dit(copy.deepcopy(ema).to(torch.bfloat16), out / "student.safetensors")

    started = time.perf_counter() - elapsed
    clock = CheckpointClock(checkpoint, settings.checkpoint_every_s)
    total = settings.steps
    bar = tqdm(total=total, initial=step, desc="student", unit="rollout")
    while step < total:
        if max_minutes is not None and (time.perf_counter() - started) / 60 >= max_minutes:
            break
        optimizer.zero_grad(set_to_none=True)
        loss, steps_used = rollout_loss(student, teacher, text_encoder, clips, settings, rng, generator, device_,
                                        locate_agent)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, student, settings.ema_decay)
        step += 1
        elapsed = time.perf_counter() - started
        history["step"].append(step), history["loss"].append(loss), history["steps_used"].append(steps_used)
        history["seconds"].append(elapsed)
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(history['loss'][-20:]):.4f}", min=f"{elapsed / 60:.1f}")
        clock.tick()
    bar.close()
    clock.final()
    return history


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the teacher's run folder (teacher + clips)")
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--steps", type=int, default=StudentSettings.steps)
    p.add_argument("--batch", type=int, default=StudentSettings.batch)
    p.add_argument("--lr", type=float, default=StudentSettings.learning_rate)
    p.add_argument("--target", choices=TARGET_SAMPLERS, default=StudentSettings.target_sampler,
                   help="the teacher's sampler that makes the regression target")
    p.add_argument("--guidance", type=float, default=StudentSettings.guidance,
                   help="classifier-free guidance scale of the teacher's flow in the target (1: none)")
    p.add_argument("--warmup-chunks", type=int, default=StudentSettings.warmup_chunks,
                   help="most chunks the student streams alone before the trained chunks of a rollout")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init-from", type=Path, help="a fresh student starts from this DiT file (an earlier student)")
    p.add_argument("--rebase-from", type=Path,
                   help="the teacher that --init-from was distilled from: start from it + (teacher - this)")
    args = p.parse_args(argv)
    if args.rebase_from is not None and args.init_from is None:
        p.error("--rebase-from needs --init-from")
    torch.set_num_threads(args.threads)
    settings = StudentSettings(steps=args.steps, batch=args.batch, learning_rate=args.lr, target_sampler=args.target,
                               guidance=args.guidance, warmup_chunks=args.warmup_chunks)
    train_student(args.out, settings, args.max_minutes, device=args.device, init_from=args.init_from,
                  rebase_from=args.rebase_from)


if __name__ == "__main__":
    main()
