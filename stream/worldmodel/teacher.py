"""Train the teacher: the world DiT with flow matching on latent clips under the block-causal mask.

Diffusion forcing at chunk granularity: every 3-frame chunk of a 24-frame clip gets its own noise level, drawn from
the shifted schedule the sampler uses, and a share of chunks stays clean. The block-causal, 12-frame windowed mask
is exactly what the streaming engine attends to, so one forward trains every chunk of the clip against every
mixture of clean and noisy context, including the clean context the engine's context pass gives at inference
(teacher forcing would train one chunk per clip, on clean context only). Frames shown under an earlier prompt than
the clip's (see `latent_clips.py`) are clean context without loss.

The prompt's text encoder (models/world/text_encoder.py) trains jointly; an EMA of both is what gets saved.

    python3 -m framecast.stream.worldmodel.teacher --out runs/world --max-minutes 45
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from framecast.kernels.compute_dtype import bf16_autocast_enabled
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import ConfigError
from framecast.models.loading import load_dit, save_dit
from framecast.models.memory import BlockCausal
from framecast.models.world.autoencoder import load_autoencoder
from framecast.models.world.latent_clips import LatentClips, agent_positions, make_latent_clips
from framecast.models.world.text_encoder import TextEncoderConfig, WorldTextEncoder, load_text_encoder, save_text_encoder
from framecast.stream.worldmodel.recipe import AUTOENCODER_FILE, CHUNK_FRAMES, SHIFT, WEIGHTS_DIR, WINDOW_FRAMES, WORLD_DIT

STATE_FILE = "teacher_state.pt"
CLIPS_FILE = "latent_clips.pt"


@dataclass(frozen=True)
class TeacherSettings:
    steps: int = 100_000  # the schedule's length; --max-minutes usually ends training first
    batch: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    final_lr_share: float = 0.05  # cosine decay to this share of the learning rate
    weight_decay: float = 0.01
    clean_chunk_share: float = 0.4  # chunks kept clean (context only) besides the pre-switch ones
    agent_weight: float = 10.0  # extra loss weight on the latent pixels under the agent (see `agent_weights`)
    # share of samples trained on the null prompt (`null_text`), so that the teacher also knows the unconditional
    # flow that classifier-free guidance pushes away from
    prompt_dropout: float = 0.15
    ema_decay: float = 0.998
    clip_frames: int = 24  # frames per encoded clip (the data)
    window_frames: int = 9  # frames per training sample: a chunk-aligned window of a clip at a random offset
    clips: int = 3000
    checkpoint_every_s: float = 180.0
    bfloat16_autocast: bool | None = None  # None: where the device multiplies bf16 natively (compute_dtype)

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "clip_frames", "window_frames", "clips", "warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.clip_frames % CHUNK_FRAMES or self.window_frames % CHUNK_FRAMES or self.window_frames > self.clip_frames:
            raise ConfigError(f"clip_frames={self.clip_frames} and window_frames={self.window_frames} must be multiples "
                              f"of the chunk ({CHUNK_FRAMES}), the window no longer than the clip")
        if not 0 <= self.clean_chunk_share < 1 or not 0 < self.ema_decay < 1:
            raise ConfigError("clean_chunk_share must be in [0, 1) and ema_decay in (0, 1)")
        if not 0 <= self.prompt_dropout < 1:
            raise ConfigError(f"prompt_dropout={self.prompt_dropout} must be in [0, 1)")


def shifted_sigmas(u: Tensor, shift: float = SHIFT) -> Tensor:
    """Uniform u in (0, 1] -> sigma of the shifted schedule (the sampler's table, continuous)."""
    return shift * u / (1 + (shift - 1) * u)


def learning_rate(settings: TeacherSettings, step: int, total: int) -> float:
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = min((step - settings.warmup_steps) / max(total - settings.warmup_steps, 1), 1.0)
    share = settings.final_lr_share + (1 - settings.final_lr_share) * 0.5 * (1 + math.cos(math.pi * progress))
    return settings.learning_rate * share


def null_text(text_states: Tensor) -> Tensor:
    """The unconditional prompt: all-zero text-encoder rows, what the DiT sees past the end of every prompt (Wan pads
    prompts with zero rows), so the null prompt is an empty one rather than a learned token."""
    return torch.zeros_like(text_states)


def agent_weights(agent_xy: Tensor, latent_size: int, extra: float, scale: int = 8, reach_px: float = 13.0) -> Tensor:
    """Per-latent-pixel loss weights [B, T, s, s]: 1, plus `extra` on latent pixels whose 8x8 footprint reaches
    within `reach_px` of the agent's centre (the sprite's 9 px radius and a margin: ~3x3 latent pixels).

    The agent is < 2% of a frame, but it is what the prompt's shape and colour and every action are read from;
    with an even loss the model learned the ground long before it drew an agent. The weighting moves gradient,
    not the optimum: at every pixel the weighted loss is still minimised by the same prediction."""
    centres = torch.arange(latent_size, dtype=torch.float32, device=agent_xy.device) * scale + (scale - 1) / 2
    near_x = (centres[None, None, :] - agent_xy[..., :1]).abs() <= reach_px  # [B, T, s]
    near_y = (centres[None, None, :] - agent_xy[..., 1:]).abs() <= reach_px
    return 1 + extra * (near_y[..., :, None] & near_x[..., None, :]).float()


class FlowMatchingLoss:
    """Chunk-level diffusion-forcing flow-matching loss of a DiT + text encoder on a batch of latent clips."""

    def __init__(self, frames: int, tokens_per_frame: int, clean_chunk_share: float, device: torch.device,
                 agent_weight: float = 0.0, prompt_dropout: float = 0.0) -> None:
        self.frames, self.clean_chunk_share, self.device = frames, clean_chunk_share, device
        self.agent_weight, self.prompt_dropout = agent_weight, prompt_dropout
        self.memory = BlockCausal(
            WORLD_DIT, num_frames=frames, chunk_frames=CHUNK_FRAMES, tokens_per_frame=tokens_per_frame,
            window_frames=WINDOW_FRAMES, sink_frames=0, device=device,
        )

    def noise_levels(self, batch: int, generator: torch.Generator) -> Tensor:
        """Per-frame sigma [B, T], one level per chunk; some chunks clean."""
        chunks = self.frames // CHUNK_FRAMES
        sigma = shifted_sigmas(1 - torch.rand(batch, chunks, generator=generator))  # (0, 1]
        sigma = torch.where(torch.rand(batch, chunks, generator=generator) < self.clean_chunk_share, 0.0, sigma)
        return sigma.repeat_interleave(CHUNK_FRAMES, dim=1)

    def __call__(
        self, dit: CausalWanDiT, text_encoder: WorldTextEncoder, latents: Tensor, actions: Tensor, tokens: Tensor,
        generator: torch.Generator, agent_xy: Tensor | None = None,
    ) -> Tensor:
        latents = latents.to(self.device, torch.float32)
        batch = latents.shape[0]
        prompt = tokens[:, -1]  # the clip's last prompt conditions the whole clip
        under_prompt = (tokens == prompt[:, None]).all(-1).to(self.device)  # [B, T]
        sigma = self.noise_levels(batch, generator).to(self.device)
        sigma = torch.where(under_prompt, sigma, 0.0)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        s = sigma[:, :, None, None, None]
        noisy = (1 - s) * latents + s * noise
        states = text_encoder(prompt.to(self.device))
        if self.prompt_dropout:
            dropped = (torch.rand(batch, generator=generator) < self.prompt_dropout).to(self.device)
            states = torch.where(dropped[:, None, None], null_text(states), states)
        text = dit.encode_text(states)
        flow = dit(noisy, sigma * 1000, text, self.memory, actions.to(self.device)).float()
        error = ((flow - (noise - latents)) ** 2).mean(dim=2)  # [B, T, h, w]
        if self.agent_weight and agent_xy is not None:
            error = error * agent_weights(agent_xy.to(self.device), latents.shape[-1], self.agent_weight)
        per_frame = error.mean(dim=(2, 3))
        weight = ((sigma > 0) & under_prompt).float()
        return (per_frame * weight).sum() / weight.sum().clamp(min=1)


class CheckpointClock:
    """A long run's periodic checkpoint: `tick()` calls `save` once `every_s` seconds have passed since the last
    save (or since the clock was made); `final()` saves once more at the end. Shared by the world model's trainers."""

    def __init__(self, save, every_s: float) -> None:
        self.save, self.every_s, self.last = save, every_s, time.perf_counter()

    def tick(self) -> None:
        if time.perf_counter() - self.last > self.every_s:
            self.save()
            self.last = time.perf_counter()

    def final(self) -> None:
        self.save()


def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)


def load_or_make_clips(out: Path, settings: TeacherSettings, autoencoder_path: Path) -> LatentClips:
    path = out / CLIPS_FILE
    if path.exists():
        clips = LatentClips.load(path)
        if len(clips) == settings.clips and clips.frames == settings.clip_frames:
            if clips.agent_xy is None:  # clips saved before agent positions were kept: replay the episodes
                clips.agent_xy = agent_positions(clips.seeds, clips.frames, CHUNK_FRAMES)
                clips.save(path)
            return clips
    clips = make_latent_clips(load_autoencoder(autoencoder_path), settings.clips, settings.clip_frames, CHUNK_FRAMES)
    clips.save(path)
    return clips


def train_teacher(
    out: Path, settings: TeacherSettings = TeacherSettings(), max_minutes: float | None = None,
    device: str = "cpu", autoencoder_path: Path = WEIGHTS_DIR / AUTOENCODER_FILE, seed: int = 0,
    init_from: Path | None = None,
) -> dict:
    """Train (resuming from `out` when a state is there); returns the history. Writes `teacher.safetensors` and
    `text_encoder.safetensors` (EMA weights, bfloat16 DiT) into `out` at every checkpoint and at the end."""
    out.mkdir(parents=True, exist_ok=True)
    device_ = torch.device(device)
    autocast = bf16_autocast_enabled(device_, settings.bfloat16_autocast)
    clips = load_or_make_clips(out, settings, autoencoder_path)
    torch.manual_seed(seed)
    dit = CausalWanDiT(WORLD_DIT).to(device_)
    text_encoder = WorldTextEncoder(TextEncoderConfig(width=WORLD_DIT.text_dim)).to(device_)
    nn.init.normal_(dit.action_embedding.weight, std=0.02)  # a zero table would stay zero under weight decay alone
    if init_from is not None:  # a fine-tune: weights of an earlier run, fresh optimizer and schedule
        dit.load_state_dict(load_dit(init_from / "teacher.safetensors", dtype=torch.float32).state_dict())
        text_encoder.load_state_dict(load_text_encoder(init_from / "text_encoder.safetensors").state_dict())
    parameters = [*dit.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay, betas=(0.9, 0.99))
    ema_dit, ema_text = copy.deepcopy(dit).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    history: dict = {"step": [], "loss": [], "seconds": [], "settings": asdict(settings)}
    step, elapsed = 0, 0.0
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    state_path = out / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        dit.load_state_dict(state["dit"]), text_encoder.load_state_dict(state["text_encoder"])
        ema_dit.load_state_dict(state["ema_dit"]), ema_text.load_state_dict(state["ema_text"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        generator.set_state(state["generator"])
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
    total = settings.steps
    if max_minutes is not None:
        total = min(total, history.get("planned_steps", total))
    in_force = (history.get("changes") or [history])[-1]["settings"]
    if in_force != asdict(settings):  # resumed with changed settings: say from which step
        history.setdefault("changes", []).append({"step": step, "settings": asdict(settings)})
    loss_fn = FlowMatchingLoss(settings.window_frames, WORLD_DIT.tokens_per_frame(16, 16), settings.clean_chunk_share, device_,
                               settings.agent_weight, settings.prompt_dropout)

    def checkpoint() -> None:
        torch.save({
            "dit": dit.state_dict(), "text_encoder": text_encoder.state_dict(), "ema_dit": ema_dit.state_dict(),
            "ema_text": ema_text.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed,
            "history": history, "generator": generator.get_state(), "rng": rng.bit_generator.state,
        }, out / (STATE_FILE + ".partial"))
        (out / (STATE_FILE + ".partial")).replace(state_path)
        export(ema_dit, ema_text, out)

    dit.train(), text_encoder.train()
    started = time.perf_counter() - elapsed
    clock = CheckpointClock(checkpoint, settings.checkpoint_every_s)
    bar = tqdm(total=total, initial=step, desc="teacher", unit="step")
    while step < total:
        minutes = (time.perf_counter() - started) / 60
        if max_minutes is not None and minutes >= max_minutes:
            break
        if max_minutes is not None and step > settings.warmup_steps and step % 50 == 0:
            # fit the cosine schedule into the time cap from the measured pace
            pace = (time.perf_counter() - started) / step
            total = min(settings.steps, step + int((max_minutes * 60 - (time.perf_counter() - started)) / pace))
            history["planned_steps"] = total
            bar.total = total
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step, total)
        index = torch.from_numpy(rng.choice(len(clips), settings.batch, replace=False))
        offset = int(rng.integers((settings.clip_frames - settings.window_frames) // CHUNK_FRAMES + 1)) * CHUNK_FRAMES
        frames = slice(offset, offset + settings.window_frames)
        with torch.autocast(device_.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(dit, text_encoder, clips.latents[index, frames], clips.actions[index, frames],
                           clips.tokens[index, frames], generator, clips.agent_xy[index, frames])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        update_ema(ema_dit, dit, settings.ema_decay if step > settings.warmup_steps else 0.9)
        update_ema(ema_text, text_encoder, settings.ema_decay if step > settings.warmup_steps else 0.9)
        step += 1
        elapsed = time.perf_counter() - started
        history["step"].append(step), history["loss"].append(float(loss.detach()))
        history["seconds"].append(elapsed)
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(history['loss'][-50:]):.4f}", min=f"{elapsed / 60:.1f}")
        clock.tick()
    bar.close()
    clock.final()
    (out / "teacher_history.json").write_text(
        json.dumps({k: history[k] for k in ("settings", "planned_steps", "changes") if k in history}))
    return history


def export(dit: CausalWanDiT, text_encoder: WorldTextEncoder, out: Path) -> None:
    """The shippable files: the DiT in bfloat16 (half the bytes; the engine runs bf16 on CPUs), the text encoder."""
    save_dit(copy.deepcopy(dit).to(torch.bfloat16), out / "teacher.safetensors")
    save_text_encoder(text_encoder, out / "text_encoder.safetensors")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--steps", type=int, default=TeacherSettings.steps)
    p.add_argument("--batch", type=int, default=TeacherSettings.batch)
    p.add_argument("--clips", type=int, default=TeacherSettings.clips)
    p.add_argument("--lr", type=float, default=TeacherSettings.learning_rate)
    p.add_argument("--prompt-dropout", type=float, default=TeacherSettings.prompt_dropout,
                   help="share of samples on the null prompt (for classifier-free guidance)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init-from", type=Path, help="start from this run folder's teacher and text encoder (fine-tune)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = TeacherSettings(steps=args.steps, batch=args.batch, clips=args.clips, learning_rate=args.lr,
                               prompt_dropout=args.prompt_dropout)
    train_teacher(args.out, settings, args.max_minutes, args.device, init_from=args.init_from)


if __name__ == "__main__":
    main()
