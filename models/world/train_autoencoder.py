"""Train the world autoencoder on clips streamed from `make_episode`, with resumable checkpoints, and evaluate it.

Loss: squared error on pixels plus `edge_weight` x squared error on horizontal and vertical pixel differences, a
weighted mean with per-pixel weights from the target frame (`pixel_weights`: 1 on the ground, more on sprites and
particles, most on the agent). The agent covers < 2% of a frame and rain streaks are 2 px wide: with plain or
weighted L1 (the first recipe) the many small errors on the ground outweighed the few large ones where the agent and
the rain were missing, and both stayed blurred away for thousands of steps; squared errors let the large ones pull
(a 250-step A/B from the same checkpoint: agent shape 29% -> 94%, weather 38% -> 94% on held-out frames). The
difference term charges every missing edge pixel twice, which is what the pixel readers need (particle pairs along
the rain slant, the agent's mask moments). Training runs on 64x64 crops placed around the agent (4 crops per whole
frame's pixels, so 4x the agent examples per step) with a whole-frame step every 4th step for the real borders.

Every clip comes from a fresh episode with a random seed, random first settings and (usually) prompt switches inside
the clip, so every terrain, weather, time of day and agent appears, and the decoder's temporal layer sees cuts.

    python3 -m framecast.models.world.train_autoencoder --steps 3000 --out runs/world_ae
    python3 -m framecast.models.world.train_autoencoder --init-from models/world/weights/world_autoencoder.safetensors \\
        --batch 2 --steps 100000 --max-minutes 39 --out RUN --no-resume   # the fine-tune recipe
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from framecast.kernels.compute_dtype import bf16_autocast_enabled
from framecast.models.errors import ConfigError
from framecast.models.world.autoencoder import (
    WorldAutoencoder, WorldAutoencoderConfig, WorldDecoder, frames_to_tensor, load_autoencoder, preset, save_autoencoder,
    tensor_to_frames,
)
from framecast.models.world.episodes import make_episode
from framecast.models.world.ground_truth import read_agent, read_setting
from framecast.models.world.palette import AGENT_RGB
from framecast.models.world.state import WorldConfig
from framecast.models.world.vocabulary import AgentColour

CLIP_FRAMES = 4  # frames per training clip: the decoder's temporal layer sees 3 transitions
EVAL_SEED_BASE = 1_000_000_000  # held-out episodes; training seeds stay below this
WEIGHTS_FILE, STATE_FILE, OPTIMIZER_FILE = "autoencoder.safetensors", "state.json", "optimizer.pt"


@dataclass(frozen=True)
class TrainSettings:
    learning_rate: float = 1e-3
    edge_weight: float = 1.0
    checkpoint_every_s: float = 180.0
    switch_every_choices: tuple[int | None, ...] = (None, 1, 2, 3)  # per clip; 1 means a new prompt every frame
    # None: where the device multiplies bf16 natively (2-3x faster steps; tens of times slower where emulated)
    bfloat16_autocast: bool | None = None
    foreground_weight: float = 8.0  # extra loss weight on pixels off the frame's ground colour (sprites, particles)
    agent_weight: float = 24.0  # extra loss weight on agent-coloured pixels (the agent covers < 2% of a frame)
    crop: int = 64  # > 0: train on crops of this size (a multiple of 8) placed around the agent, 0: whole frames
    full_frame_every: int = 4  # with crops, every this many steps train on whole frames (real borders)
    squared: bool = True  # squared errors: with L1 the agent and rain stayed blurred away (see the report)

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate!r} must be > 0")
        for name in ("edge_weight", "foreground_weight", "agent_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be >= 0")
        if not isinstance(self.crop, int) or self.crop < 0 or self.crop % 8:
            raise ConfigError(f"crop={self.crop!r} must be 0 or a positive multiple of 8")
        if not isinstance(self.full_frame_every, int) or self.full_frame_every < 1:
            raise ConfigError(f"full_frame_every={self.full_frame_every!r} must be a positive integer")


def sample_clips(rng: np.random.Generator, batch: int, settings: TrainSettings, world: WorldConfig,
                 crop: int = 0) -> np.ndarray:
    """uint8 [batch, CLIP_FRAMES, H, W, 3]: the last frames of fresh episodes (random seeds, settings, switches).

    With `crop` > 0, each clip is cut to a `crop` x `crop` window (the same for all its frames) that holds the
    agent's first position at a random place, its corner on the 8-px latent grid."""
    clips = []
    for _ in range(batch):
        lead = int(rng.integers(0, 12))  # let the agent, balls and particles move away from their start
        switch = settings.switch_every_choices[int(rng.integers(len(settings.switch_every_choices)))]
        episode = make_episode(int(rng.integers(EVAL_SEED_BASE)), lead + CLIP_FRAMES, switch_every=switch, config=world)
        frames = episode.frames[lead:]
        if crop:
            corner = []
            for centre, size in zip(episode.agent_xy[lead][::-1], (world.height, world.width)):  # (y, x)
                low = int(np.clip(centre - crop + world.agent_radius_px + 4, 0, size - crop))
                high = int(np.clip(centre - world.agent_radius_px - 4, low, size - crop))
                corner.append(8 * int(rng.integers(-(-low // 8), max(high // 8, -(-low // 8)) + 1)))
            top, left = min(corner[0], world.height - crop), min(corner[1], world.width - crop)
            frames = frames[:, top : top + crop, left : left + crop]
        clips.append(frames)
    return np.stack(clips)


_AGENT_RGB = torch.tensor([AGENT_RGB[colour] for colour in AgentColour], dtype=torch.float32) / 255


def pixel_weights(target: Tensor, foreground_weight: float, agent_weight: float) -> Tensor:
    """Loss weight per pixel, [..., 1, H, W]: 1 on the ground, + `foreground_weight` on pixels more than 24 levels
    from the frame's median colour (sprites, particles) and + `agent_weight` within 60 levels of an agent colour,
    both masks grown by 1 px so the blurred rims of small things count too."""
    flat = target.flatten(-2)
    median = flat.median(dim=-1).values[..., None, None]  # the ground colour (it covers most of every frame)
    foreground = ((target - median).abs().amax(dim=-3, keepdim=True) > 24 / 255).float()
    agent_distance = (target.unsqueeze(-4) - _AGENT_RGB.to(target)[:, :, None, None]).square().sum(dim=-3)
    agent = (agent_distance.amin(dim=-3, keepdim=True) < (60 / 255) ** 2).float()
    grow = lambda mask: F.max_pool2d(mask.flatten(0, -4), 3, stride=1, padding=1).view(mask.shape)
    return 1 + foreground_weight * grow(foreground) + agent_weight * grow(agent)


def reconstruction_loss(video: Tensor, target: Tensor, edge_weight: float, weights: Tensor | None = None,
                        squared: bool = False) -> Tensor:
    """L1 on pixels + edge_weight * L1 on horizontal and vertical differences; [..., 3, H, W] tensors. With
    `weights` ([..., 1, H, W], from `pixel_weights`), a weighted mean (a difference takes its larger end's weight).
    `squared`: squared errors instead of absolute ones (large errors, a missing sprite, pull harder than the many
    small ones on the ground)."""
    if squared:
        weights = torch.ones_like(target[..., :1, :, :]) if weights is None else weights
    if weights is None:
        loss = F.l1_loss(video, target)
        if edge_weight:
            for dim in (-1, -2):
                loss = loss + edge_weight * F.l1_loss(video.diff(dim=dim), target.diff(dim=dim))
        return loss
    norm = torch.square if squared else torch.abs
    error = norm(video - target)
    loss = (error * weights).mean() / weights.mean()
    if edge_weight:
        for dim in (-1, -2):
            size = weights.shape[dim] - 1
            pair = torch.maximum(weights.narrow(dim, 0, size), weights.narrow(dim, 1, size))
            edge = norm(video.diff(dim=dim) - target.diff(dim=dim))
            loss = loss + edge_weight * (edge * pair).mean() / pair.mean()
    return loss


def _save_checkpoint(out_dir: Path, model: WorldAutoencoder, optimizer, state: dict) -> None:
    # write then rename, so a run killed mid-save leaves the previous checkpoint intact
    for name, write in (
        (WEIGHTS_FILE, lambda p: save_autoencoder(model, p)),
        (OPTIMIZER_FILE, lambda p: torch.save(optimizer.state_dict(), p)),
        (STATE_FILE, lambda p: Path(p).write_text(json.dumps(state, indent=1))),
    ):
        temporary = out_dir / (name + ".tmp")
        write(temporary)
        os.replace(temporary, out_dir / name)


def train_autoencoder(
    config: WorldAutoencoderConfig,
    steps: int,
    batch: int,
    seed: int,
    out_dir: str | os.PathLike,
    resume: bool = True,
    device: str | torch.device = "cpu",
    settings: TrainSettings = TrainSettings(),
    progress: bool = True,
    stats_clips: int = 64,
    max_seconds: float | None = None,
    init_from: str | os.PathLike | None = None,
) -> tuple[WorldAutoencoder, list[float]]:
    """Train for `steps` steps in total (a resumed run continues from its saved step) on `batch` clips of
    CLIP_FRAMES frames; checkpoint to `out_dir` every `settings.checkpoint_every_s` and at the end. The learning rate
    follows a cosine from `settings.learning_rate` to 5% of it over `steps`, or over `max_seconds` of training time
    when that is given and comes first (then training stops there). Latent statistics are measured at the end
    on `stats_clips` fresh clips.

    `init_from`: a `save_autoencoder` file to start a new run from (a fine-tune: its weights, a fresh optimizer);
    ignored when the run resumes from its own checkpoint.

    Returns the model (eval mode, on the CPU) and the loss of every step, resumed ones included.

    Raises:
        ConfigError: steps or batch < 1.
    """
    from tqdm import tqdm

    if not isinstance(steps, int) or steps < 1 or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"steps={steps!r} and batch={batch!r} must be positive integers")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = WorldConfig(height=config.image_size, width=config.image_size)
    torch.manual_seed(seed)
    model = WorldAutoencoder(config).to(device).train()
    autocast = bf16_autocast_enabled(device, settings.bfloat16_autocast)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    state = {"step": 0, "elapsed_s": 0.0, "losses": [], "config": asdict(config), "batch": batch, "seed": seed,
             "settings": asdict(settings), "init_from": str(init_from) if init_from else None}
    if init_from is not None:
        model.load_state_dict(load_autoencoder(init_from).state_dict())
    if resume and (out_dir / STATE_FILE).exists():
        state = json.loads((out_dir / STATE_FILE).read_text())
        model.load_state_dict(load_autoencoder(out_dir / WEIGHTS_FILE).state_dict())
        optimizer.load_state_dict(torch.load(out_dir / OPTIMIZER_FILE, map_location=device))
    rng = np.random.default_rng([seed, state["step"]])  # a resumed run draws new clips, not the same ones again
    started, last_save = time.monotonic() - state["elapsed_s"], time.monotonic()
    bar = tqdm(range(state["step"], steps), initial=state["step"], total=steps, disable=not progress, unit="step")
    for step in bar:
        progress_share = max(step / steps, state["elapsed_s"] / max_seconds if max_seconds else 0.0)
        if progress_share >= 1:
            break
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress_share)))
        crop = settings.crop if settings.crop and step % settings.full_frame_every else 0
        clips = batch * (world.height * world.width) // crop**2 if crop else batch  # about the same pixels per step
        target = frames_to_tensor(sample_clips(rng, clips, settings, world, crop)).to(device)  # (B, T, 3, H, W)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            video, _ = model(target)
        weights = None
        if settings.foreground_weight or settings.agent_weight:
            weights = pixel_weights(target, settings.foreground_weight, settings.agent_weight)
        loss = reconstruction_loss(video.float(), target, settings.edge_weight, weights, settings.squared)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state["losses"].append(loss.item())
        state["step"], state["elapsed_s"] = step + 1, time.monotonic() - started
        bar.set_postfix(loss=f"{state['losses'][-1]:.4f}")
        if time.monotonic() - last_save > settings.checkpoint_every_s:
            _save_checkpoint(out_dir, model, optimizer, state)
            last_save = time.monotonic()
    model = model.cpu().eval()
    measure_latent_stats(model, seed=seed, clips=stats_clips)
    _save_checkpoint(out_dir, model, optimizer, state)
    return model, state["losses"]


@torch.no_grad()
def measure_latent_stats(model: WorldAutoencoder, seed: int, clips: int = 64) -> None:
    """Set the model's per-channel latent mean and std from the raw latents of `clips` random training clips."""
    world = WorldConfig(height=model.config.image_size, width=model.config.image_size)
    frames = frames_to_tensor(sample_clips(np.random.default_rng([seed, 7]), clips, TrainSettings(), world))
    raw = model.encode_raw(frames)  # (B, T, C, s, s)
    model.latent_mean.copy_(raw.mean(dim=(0, 1, 3, 4)))
    model.latent_std.copy_(raw.std(dim=(0, 1, 3, 4)).clamp_min(1e-6))


@torch.no_grad()
def evaluate(model: WorldAutoencoder, episodes: int = 40, frames: int = 8, switch_every: int = 3,
             seed_base: int = EVAL_SEED_BASE) -> dict:
    """PSNR and pixel-reader agreement on held-out episodes (seeds from `seed_base`, training seeds stay below
    EVAL_SEED_BASE).

    Reader accuracy compares what `read_setting` / `read_agent` read on the reconstruction with what they read on the
    rendered frame: per slot, all five slots at once (`scene`), and the agent position error in px.
    """
    world = WorldConfig(height=model.config.image_size, width=model.config.image_size)
    squared_errors, agree, position_errors = [], {k: 0 for k in ("terrain", "weather", "time", "shape", "colour",
                                                                    "agent_found", "scene")}, []
    total = 0
    for index in range(episodes):
        episode = make_episode(seed_base + index, frames, switch_every=switch_every, config=world)
        truth = frames_to_tensor(episode.frames)[None]
        video = model.decode(model.encode(truth))[0]
        reconstruction = tensor_to_frames(video)[0].numpy()
        squared_errors.append(((reconstruction.astype(np.float64) - episode.frames) ** 2).mean(axis=(1, 2, 3)))
        for original, decoded in zip(episode.frames, reconstruction):
            total += 1
            setting_true, setting_read = read_setting(original, world), read_setting(decoded, world)
            agent_true, agent_read = read_agent(original, world), read_agent(decoded, world)
            slots = {
                "terrain": setting_true.terrain == setting_read.terrain,
                "weather": setting_true.weather == setting_read.weather,
                "time": setting_true.time == setting_read.time,
                "agent_found": (agent_true is None) == (agent_read is None),
                "shape": agent_true is not None and agent_read is not None and agent_true.shape == agent_read.shape,
                "colour": agent_true is not None and agent_read is not None and agent_true.colour == agent_read.colour,
            }
            if agent_true is None and agent_read is None:
                slots["shape"] = slots["colour"] = True
            slots["scene"] = all(slots.values())
            for key, value in slots.items():
                agree[key] += bool(value)
            if agent_true is not None and agent_read is not None:
                position_errors.append(math.dist(agent_true.xy, agent_read.xy))
    mse = np.concatenate(squared_errors)
    return {
        "frames": total,
        "psnr_db": float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)))),
        "psnr_min_db": float(np.min(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)))),
        "reader_accuracy": {key: value / total for key, value in agree.items()},
        "agent_position_error_px_mean": float(np.mean(position_errors)) if position_errors else float("nan"),
        "agent_position_error_px_max": float(np.max(position_errors)) if position_errors else float("nan"),
    }


def plot_losses(losses: list[float], path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(losses, alpha=0.3, label="step")
    window = max(1, len(losses) // 50)
    if len(losses) >= window:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axes.plot(np.arange(window - 1, len(losses)), smooth, label=f"mean of {window}")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("L1 + edge loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


@torch.inference_mode()
def decode_frames_per_s(model: WorldAutoencoder, dtype: torch.dtype, chunk_frames: int = 4, chunks: int = 12) -> float:
    """Video frames per second of `WorldDecoder` streaming random latents in chunks (uint8 output included)."""
    decoder = WorldDecoder(copy.deepcopy(model), dtype)
    size = model.config.latent_size
    latents = torch.randn(1, chunk_frames, model.config.latent_channels, size, size)
    for _ in range(3):  # warm-up: oneDNN picks its kernels on the first calls
        decoder.decode(latents)
    started = time.perf_counter()
    for _ in range(chunks):
        decoder.decode(latents)
    return chunks * chunk_frames * model.config.frames_per_latent / (time.perf_counter() - started)


def ship(run_dir: str | os.PathLike, weights_dir: str | os.PathLike) -> dict:
    """Evaluate a finished run, benchmark its decoder, and write the weights, loss plot and report to `weights_dir`."""
    run_dir, weights_dir = Path(run_dir), Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    state = json.loads((run_dir / STATE_FILE).read_text())
    model = load_autoencoder(run_dir / WEIGHTS_FILE)
    save_autoencoder(model, weights_dir / "world_autoencoder.safetensors")
    plot_losses(state["losses"], weights_dir / "autoencoder_loss.png")
    report = evaluate(model)
    speeds = {str(dtype).removeprefix("torch."): decode_frames_per_s(model, dtype)
              for dtype in (torch.float32, torch.bfloat16)}
    summary = {"eval": report, "decode_frames_per_s": speeds, "steps": state["step"], "batch_clips": state["batch"],
               "clip_frames": CLIP_FRAMES, "train_time_s": state["elapsed_s"], "threads": torch.get_num_threads(),
               "parameters": sum(p.numel() for p in model.parameters()),
               "decoder_parameters": sum(p.numel() for p in model.decoder.parameters()),
               "settings": state.get("settings"), "init_from": state.get("init_from"),
               "config": asdict(model.config), "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores, torch {torch.__version__}"}
    (weights_dir / "autoencoder_eval.json").write_text(json.dumps(summary, indent=1))
    (weights_dir / "autoencoder_report.md").write_text(_report_markdown(summary))
    return summary


def _loss_text(settings: dict | None) -> str:
    if not settings:
        return "L1 + 1.0 x L1 of pixel differences."
    norm = "squared error" if settings.get("squared") else "L1"
    text = f"{norm} + {settings['edge_weight']} x {norm} of pixel differences"
    if settings.get("foreground_weight") or settings.get("agent_weight"):
        text += (f", per-pixel weights 1 + {settings['foreground_weight']} on sprites and particles + "
                 f"{settings['agent_weight']} on the agent (masks from the target frame, grown by 1 px)")
    if settings.get("crop"):
        text += (f"; {settings['crop']}x{settings['crop']} crops around the agent (as many pixels per step as whole frames), whole frames "
                 f"every {settings['full_frame_every']}th step")
    return text + f"; learning rate {settings['learning_rate']:g}, cosine to 5%."


def _report_markdown(summary: dict) -> str:
    report, speeds = summary["eval"], summary["decode_frames_per_s"]
    accuracy = ", ".join(f"{key} {100 * value:.1f}%" for key, value in report["reader_accuracy"].items())
    return "\n".join([
        "# World autoencoder: results",
        "",
        f"Config: `{summary['config']}`; {summary['parameters']:,} parameters ({summary['decoder_parameters']:,} in the "
        "decoder). Spatial x8 (128x128x3 -> 16x16x16), 1 video frame per latent frame.",
        "",
        f"Training (this run): {summary['steps']} steps of {summary['batch_clips']} clips x {summary['clip_frames']} "
        f"frames, {summary['train_time_s'] / 60:.1f} min of training on {summary['machine']} (bf16 autocast), "
        + _loss_text(summary.get("settings")) + " Loss curve: `autoencoder_loss.png`."
        + (f" Started from `{summary['init_from']}`." if summary.get("init_from") else ""),
        "",
        f"Held-out eval ({report['frames']} frames of episodes with seeds from 1e9, prompt switch every 3 frames): "
        f"PSNR {report['psnr_db']:.2f} dB mean, {report['psnr_min_db']:.2f} dB worst frame.",
        "",
        f"Pixel readers on reconstructions vs on the rendered frames: {accuracy}. Agent position error "
        f"{report['agent_position_error_px_mean']:.2f} px mean, {report['agent_position_error_px_max']:.2f} px max "
        "(frames where both find the agent).",
        "",
        f"Decode speed (`WorldDecoder`, chunks of 4 latents, uint8 out, {summary['threads']} threads): "
        + ", ".join(f"{dtype} {fps:.0f} frames/s ({1000 / fps:.2f} ms/frame)" for dtype, fps in speeds.items()) + ".",
        "",
        "Reproduce: the runs listed under 'Run history' (each `python3 -m framecast.models.world.train_autoencoder "
        "... --init-from PREVIOUS_WEIGHTS --out RUN --no-resume`), then `--out RUN --ship models/world/weights`.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="world-128")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/world_autoencoder")
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (learning rate annealed) after this")
    parser.add_argument("--ship", metavar="WEIGHTS_DIR", help="skip training: evaluate --out and write it here")
    parser.add_argument("--init-from", metavar="SAFETENSORS", help="start a new run from these weights (fine-tune)")
    parser.add_argument("--lr", type=float, default=TrainSettings.learning_rate)
    parser.add_argument("--crop", type=int, default=TrainSettings.crop, help="train on agent-centred crops (px)")
    parser.add_argument("--foreground-weight", type=float, default=TrainSettings.foreground_weight)
    parser.add_argument("--agent-weight", type=float, default=TrainSettings.agent_weight)
    parser.add_argument("--loss", choices=("squared", "l1"), default="squared", help="per-pixel error")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ship:
        print(json.dumps(ship(args.out, args.ship), indent=1))
        return
    model, losses = train_autoencoder(preset(args.preset), args.steps, args.batch, args.seed, args.out,
                                      resume=not args.no_resume,
                                      max_seconds=args.max_minutes * 60 if args.max_minutes else None,
                                      settings=TrainSettings(learning_rate=args.lr, crop=args.crop,
                                                             foreground_weight=args.foreground_weight,
                                                             agent_weight=args.agent_weight, squared=args.loss == "squared"),
                                      init_from=args.init_from)
    plot_losses(losses, Path(args.out) / "loss.png")
    report = evaluate(model)
    (Path(args.out) / "eval.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
