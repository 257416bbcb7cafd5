"""The `framecast` command line.

    framecast generate --prompt "a cyan triangle on snow at night" --actions right:20,up:10 -o out.mp4
    framecast generate --preset tiny --prompt "a red fox in snow" --frames 64 -o out.mp4   (random weights)
    framecast train world --out runs/world --ship                 the embedded model, end to end
    framecast eval world                                           its metrics against the world's ground truth
    framecast bench --seconds 10
    framecast serve --output-scale 4 [--vcam]     live: browsers, programs, WebRTC (and a virtual camera)
    framecast vcam --output-scale 4                live to a virtual camera only (v4l2loopback, OBS Virtual Camera)
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from framecast.models.config import PRESETS, preset
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import ConfigError, FrameCastError
from framecast.models.text import HashedTextEncoder, load_prompt_embeds
from framecast.kernels.compute_dtype import DTYPE_NAMES, default_dtype
from framecast.stream.engine import CacheKind, EngineConfig, StreamEngine

log = logging.getLogger("framecast")

VAE_SPATIAL, VAE_TEMPORAL = 8, 4  # Wan VAE: 8x8 pixels and 4 frames per latent (the first latent gives 1 frame)
DEFAULT_PROMPT = "a quiet lake at dawn"


def parse_steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps {text!r} must be comma-separated integers, e.g. 1000,750,500,250")


def add_generate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("generate", help="generate a video file from a prompt")
    p.add_argument("--preset", help=f"model size: {', '.join(PRESETS)} (default: the embedded world model; other "
                   "presets run with random weights unless --weights is given)")
    p.add_argument("--weights", type=Path, help="checkpoint (.pt/.pth of the causal-Wan families, or .safetensors)")
    p.add_argument("--prompt", help="prompt text (the world model: words of its vocabulary, e.g. 'a cyan triangle on "
                   "snow at night in rain'; default: a red circle on grass by day in clear weather)")
    add_world_flags(p)
    p.add_argument("--prompt-embeds", type=Path, help="precomputed text-encoder output [T, text_dim] (.pt/.safetensors)")
    p.add_argument("--text-encoder", type=Path, help="Wan's umT5 checkpoint (models_t5_umt5-xxl-enc-bf16.pth)")
    p.add_argument("--tokenizer", type=Path, help="local google/umt5-xxl tokenizer folder (with --text-encoder)")
    p.add_argument("--decoder", choices=["preview", "wan-vae", "taehv"],
                   help="latent decoder of Wan-size models: the preview (default, no weights), the Wan VAE or TAEHV "
                   "(needs --decoder-weights); the world model has its own")
    p.add_argument("--decoder-weights", type=Path, help="Wan2.1_VAE.pth or taew2_1.pth")
    p.add_argument("--input", type=Path, help="input video for video-to-video (needs --decoder wan-vae); start the "
                   "step list below 1000 to keep its structure, e.g. --steps 700,500")
    p.add_argument("--frames", type=int, default=33, help="video frames to write (default 33)")
    p.add_argument("--stages", type=int, default=1, help="split the DiT's layers over this many stage processes "
                   "(torch.distributed: gloo on CPU, NCCL on GPUs); the chunks are exactly those of one process")
    add_placement_flags(p)
    p.add_argument("-o", "--output", type=Path, help="video file to write (mp4)")
    p.add_argument("--latents-out", type=Path, help="also save the latents [B, F, C, H, W] (.safetensors)")
    p.add_argument("--height", type=int, default=128, help="frame height in pixels (multiple of 16)")
    p.add_argument("--width", type=int, default=128, help="frame width in pixels (multiple of 16)")
    p.add_argument("--fps", type=int, help="frame rate of the file (default 30 for the world model, 16 for Wan's)")
    p.add_argument("--family", help="a causal-Wan family preset (self-forcing, causvid, longlive, streamdiffusionv2, "
                   "rolling-forcing): its DiT, checkpoint layout and stream settings; --weights is its file or folder")
    add_stream_flags(p)
    p.add_argument("--seed", type=int, default=0)
    add_dtype_flag(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--memory-profile", help="a named device-memory profile of the 1.3B model (e.g. 24gb: bf16, umT5 "
                   "offloaded to the CPU, TAEHV, 832x480; see stream/memory_profile.py): sets the family, dtype, decoder, "
                   "size and window, and prints its memory estimate")
    p.set_defaults(run=run_generate)


def add_world_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--actions", default="random", help="world model: the keys held, 'random' (default: as a person "
                   "plays) or e.g. 'right:12,up:6,none:3,left' (key:frames, repeated to the end)")
    p.add_argument("--switch", action="append", default=[], metavar="FRAME:PROMPT",
                   help="world model: a new prompt from this frame on, naming only what changes, e.g. '48:at night "
                   "in rain' (repeatable; lands at the chunk boundary at or before FRAME)")
    add_world_model_flags(p)


def add_world_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-dit", choices=["student", "teacher"], default="student",
                   help="world model: the few-step student (default, 4 steps) or the teacher (32 steps by default)")
    p.add_argument("--world-weights", type=Path, help="world model: a folder with its files (default: the shipped "
                   "models/world/weights; or a `framecast train world` run folder)")


def uses_world_model(args: argparse.Namespace) -> bool:
    """The embedded world model runs unless the flags name another model (a preset, weights or a family)."""
    other = getattr(args, "weights", None) or getattr(args, "family", None) or getattr(args, "simulator", False)
    return not other and getattr(args, "preset", None) in (None, "world")


def check_world_args(args: argparse.Namespace) -> None:
    """Refuse flags the world model does not take, naming them."""
    if (args.height, args.width) != (128, 128):
        raise ConfigError(f"the world model makes 128x128 frames; --height/--width {args.height}x{args.width} "
                          "(enlarge with --output-scale where a command has it)")
    fixed = [f"--{name.replace('_', '-')}" for name in ("chunk_frames", "shift", "cache", "window_frames", "sink_frames")
             if getattr(args, name, None) is not None]
    fixed += [flag for flag, name in (("--decoder", "decoder"), ("--prompt-embeds", "prompt_embeds"),
                                      ("--text-encoder", "text_encoder"), ("--input", "input"),
                                      ("--latents-out", "latents_out")) if getattr(args, name, None)]
    if fixed:
        raise ConfigError(f"{', '.join(fixed)}: the world model streams with its trained settings, its own text "
                          "encoder and decoder; these flags are for Wan-size models (--preset/--weights/--family)")
    if getattr(args, "stages", 1) > 1:
        raise ConfigError("--stages splits Wan-size models; the world model runs in one process")


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """A `--dtype` value ("auto" or a dtype's name) -> the dtype; float16 on the CPU is refused (~50x slower)."""
    if name == "auto":
        return default_dtype(device)
    if name not in DTYPE_NAMES:
        raise ConfigError(f"--dtype {name!r}: choose auto or one of {', '.join(DTYPE_NAMES)}")
    dtype = DTYPE_NAMES[name]
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ConfigError("--dtype float16 on the CPU is ~50x slower than float32; use auto, bfloat16 or float32")
    return dtype


def add_dtype_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                   help="compute dtype (auto: bfloat16 on GPUs and on CPUs that multiply it natively, float32 on other "
                   "CPUs, where bfloat16 is emulated and tens of times slower); weights load from any stored dtype")


def world_steps(args: argparse.Namespace) -> tuple[int, ...]:
    from framecast.stream.worldmodel.recipe import STREAM_STEPS, teacher_step_list

    if args.denoising_steps:
        return args.denoising_steps
    return teacher_step_list() if args.world_dit == "teacher" else STREAM_STEPS


def load_world_model(args: argparse.Namespace):
    from framecast.stream.worldmodel.bundle import WorldModel
    from framecast.stream.worldmodel.recipe import WEIGHTS_DIR

    return WorldModel.load(args.world_weights or WEIGHTS_DIR, args.world_dit,
                           dtype=resolve_dtype(args.dtype, args.device),
                           device=args.device)


def run_generate_world(args: argparse.Namespace) -> None:
    from framecast.stream.sinks.file import VideoFileSink
    from framecast.stream.worldmodel.bundle import DEFAULT_WORLD_PROMPT
    from framecast.stream.worldmodel.rollout import command_line_script, parse_switch, stream_frames

    check_world_args(args)
    if not args.output:
        raise ConfigError("nothing to write: give -o/--output")
    if args.decode_device is not None:
        raise ConfigError("--decode-device: `generate` decodes the world model in this process (its 128x128 decoder "
                          "is cheap); bench, serve and vcam take it, and so do Wan-size models (--preset/--weights)")
    switches = [parse_switch(text) for text in args.switch]
    script = command_line_script(args.prompt or DEFAULT_WORLD_PROMPT, switches, args.actions, args.frames, args.seed)
    model = load_world_model(args)
    steps = world_steps(args)
    fps = args.fps or 30
    sink = VideoFileSink(args.output, fps)
    written, start = 0, time.perf_counter()
    try:
        for frames in stream_frames(model, script, steps, seed=args.seed, progress=True,
                                    stream_batch=bool(args.stream_batch), guidance=args.guidance,
                                    guided_steps=args.guided_steps):
            frames = frames[: args.frames - written]
            sink.write(frames)
            written += len(frames)
    finally:
        sink.close()
    seconds = time.perf_counter() - start
    print(f"wrote {written} frames (128x128, {fps} fps, world {args.world_dit}, {len(steps)} steps) to {args.output}: "
          f"{written / seconds:.1f} frames/s")


STREAM_DEFAULTS = dict(chunk_frames=3, denoising_steps=(1000, 750, 500, 250), shift=5.0, cache="rolling",
                       window_frames=12, sink_frames=3, stream_batch=False, guidance=1.0, guided_steps=None)


def add_stream_flags(p: argparse.ArgumentParser) -> None:
    """Engine settings; unset flags take the family's values (with --family) or STREAM_DEFAULTS."""
    p.add_argument("--chunk-frames", type=int, help="latent frames per chunk (default 3)")
    p.add_argument("--steps", dest="denoising_steps", type=parse_steps, help="denoising steps (default 1000,750,500,250; the world model's student: 1000,500,250)")
    p.add_argument("--shift", type=float, help="schedule shift (default 5)")
    p.add_argument("--cache", choices=[k.value for k in CacheKind], help="rolling (default) or full")
    p.add_argument("--window-frames", type=int, help="frames attended, sinks included (default 12)")
    p.add_argument("--sink-frames", type=int, help="attention-sink frames (default 3)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale, 1 for none (the default: the world model's student has guidance "
                        "at 1.5 distilled in, and runs above 1 cost ~1.5x the DiT's time)")
    p.add_argument("--guided-steps", type=int,
                   help="with --guidance above 1, guide only the first N steps of each chunk (default: all); the later "
                        "steps run the prompt alone at half the batch (faster, a little less adherence)")
    p.add_argument("--stream-batch", action="store_const", const=True,
                   help="denoise the steps of successive chunks at once (StreamDiffusionV2's stream batch): one stream "
                        "keeps every --stages stage busy; controls act S + 1 chunks later and the model sees its past "
                        "at each step's noise level (a quality cost: see benchmarks/results/pipeline-cpu.md)")


def engine_config(args: argparse.Namespace, latent_height: int, latent_width: int) -> EngineConfig:
    """The engine settings: explicit flags over the family's (or the defaults)."""
    given = {name: getattr(args, name) for name in STREAM_DEFAULTS if getattr(args, name) is not None}
    if "cache" in given:
        given["cache"] = CacheKind(given["cache"])
    if given.get("cache") is CacheKind.FULL and "sink_frames" not in given:
        given["sink_frames"] = 0
    if getattr(args, "family", None):
        from framecast.stream.families import family

        return family(args.family).engine_config(latent_height, latent_width, seed=args.seed, **given)
    settings = {**STREAM_DEFAULTS, "cache": CacheKind(STREAM_DEFAULTS["cache"]), **given}
    return EngineConfig(latent_height=latent_height, latent_width=latent_width, seed=args.seed, **settings)


def build_model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> CausalWanDiT:
    if getattr(args, "family", None):
        from framecast.stream.families import load_family

        if not args.weights:
            raise ConfigError(f"--family {args.family} needs --weights (the family's checkpoint file or folder)")
        return load_family(args.family, args.weights, dtype=dtype, device=device)
    if args.weights:
        from framecast.models.loading import load_dit

        config = preset(args.preset) if args.preset != "tiny" else None
        return load_dit(args.weights, config, dtype=dtype, device=device)
    torch.manual_seed(args.seed)
    with torch.device(device):
        dit = CausalWanDiT(preset(args.preset))
    log.warning("no --weights given: %s with random weights (the output shows the engine, not a trained model)", args.preset)
    return dit.to(dtype)


def build_decoder(args: argparse.Namespace, latent_channels: int, dtype: torch.dtype, device: torch.device):
    """The decoder the arguments ask for, in this process or (--decode-device) in a decode stage process; real
    decoders run in float32 at least on the CPU (bf16 convs are slow)."""
    from framecast.stream.decode_stage import PreviewDecoderRecipe, TAEHVDecoderRecipe, WanVAEDecoderRecipe

    if args.decoder == "preview":
        recipe = PreviewDecoderRecipe(latent_channels, VAE_SPATIAL, VAE_TEMPORAL)
    elif not args.decoder_weights:
        raise ConfigError(f"--decoder {args.decoder} needs --decoder-weights (Wan2.1_VAE.pth or taew2_1.pth)")
    else:
        decode_on = torch.device(getattr(args, "decode_device", None) or device)
        decoder_dtype = torch.float32 if decode_on.type == "cpu" else dtype
        recipe = (WanVAEDecoderRecipe if args.decoder == "wan-vae" else TAEHVDecoderRecipe)(
            str(args.decoder_weights), decoder_dtype)
    return staged_or_local(args, recipe, device)


def staged_or_local(args: argparse.Namespace, recipe, device: torch.device):
    """The recipe's decoder: in this process on `device`, or in a decode stage on --decode-device (this process
    decodes on `device` if that stage fails)."""
    if getattr(args, "decode_device", None) is None:
        return recipe(device)
    from framecast.stream.decode_stage import DecodeStageConfig, StagedDecoder

    decoder = StagedDecoder(recipe, DecodeStageConfig(device=args.decode_device, fallback_device=str(device)))
    log.info("decoding in %s", decoder.describe)
    return decoder


def world_decoder(args: argparse.Namespace, model):
    """The world model's decoder (model.decoder()), or the same in a decode stage with --decode-device."""
    if getattr(args, "decode_device", None) is None:
        return model.decoder()
    from framecast.stream.decode_stage import WorldDecoderRecipe
    from framecast.stream.worldmodel.recipe import AUTOENCODER_FILE, WEIGHTS_DIR

    recipe = WorldDecoderRecipe(str((args.world_weights or WEIGHTS_DIR) / AUTOENCODER_FILE), model.decoder().dtype)
    return staged_or_local(args, recipe, torch.device("cpu"))


def close_decoder(decoder) -> None:
    """End a decode stage's process (decoders in this process hold none)."""
    close = getattr(decoder, "close", None)
    if close is not None:
        close()


def video_source(args: argparse.Namespace, decoder: object, chunk_frames: int):
    """Latent chunks of the --input video (encoded by the Wan VAE whose weights --decoder-weights names), or None."""
    if not args.input:
        return None
    if args.decoder != "wan-vae":
        raise ConfigError("--input needs --decoder wan-vae: its encoder turns the input frames into latents")
    check_family_takes_video(args)
    from framecast.models.vae import WanVAEEncodeStream, load_wan_vae
    from framecast.stream.sources import LatentSource, video_file_frames

    vae = load_wan_vae(args.decoder_weights, encoder=True, dtype=torch.float32)
    frames = video_file_frames(args.input, args.width, args.height)
    return iter(LatentSource(WanVAEEncodeStream(vae), frames, chunk_frames))


def encode_prompt(args: argparse.Namespace, dit: CausalWanDiT, device: torch.device) -> torch.Tensor:
    """The prompt embedding: precomputed, from Wan's umT5 encoder, or hashed words (random-weight models only)."""
    config = dit.config
    if args.prompt_embeds:
        return load_prompt_embeds(args.prompt_embeds, config.text_dim, config.text_len)
    if args.text_encoder:
        from framecast.models.umt5 import Placement, PromptEncoder

        if not args.tokenizer:
            raise ConfigError("--text-encoder needs --tokenizer (the local google/umt5-xxl folder)")
        placement = getattr(args, "text_encoder_placement", None) or Placement.OFFLOAD
        encoder = PromptEncoder.from_files(args.text_encoder, args.tokenizer, device=device, placement=placement)
        return encoder.encode([args.prompt])[0].float()
    if args.weights:
        log.warning("--prompt text is hashed, not encoded: real checkpoints need --text-encoder or --prompt-embeds")
    return HashedTextEncoder(config.text_dim, config.text_len).encode(args.prompt)


def pipeline_engine(args: argparse.Namespace, dit: CausalWanDiT, config: EngineConfig, prompt: torch.Tensor,
                    dtype: torch.dtype):
    """The stream of `--stages N`: the same model recipe built in every stage process (a PipelineStream)."""
    from framecast.stream.model_source import CheckpointDiT, RandomDiT
    from framecast.stream.pipeline import PipelineConfig, PipelineEngine, PipelineStream

    model = CheckpointDiT(str(args.weights), dit.config, dtype) if args.weights else \
        RandomDiT(dit.config, dtype, seed=args.seed)
    devices, backend = stage_placement(args)
    placement = PipelineConfig(stages=args.stages, devices=devices, backend=backend)
    # lane 0 draws its noise from config.seed, as StreamEngine does
    return PipelineStream(PipelineEngine(model, config, [prompt.to("cpu", dtype)], placement))


def add_placement_flags(p: argparse.ArgumentParser, *, backend: bool = True) -> None:
    """Devices beyond this process: the decode stage's, and the stages' of `--stages N` (`backend`: add --backend;
    serve and vcam leave it out, their --backend is the virtual camera's, and the stages' is inferred)."""
    p.add_argument("--decode-device", help="decode in a separate process on this device (cpu, cuda:1, ...): the frames "
                   "are those decoded in this process; a decode process that fails falls back to this process")
    p.add_argument("--stage-devices", type=parse_devices, metavar="DEV,DEV,...",
                   help="with --stages N: one device per stage, e.g. cuda:0,cuda:1 (default: all cpu)")
    if backend:
        p.add_argument("--backend", dest="stage_backend", choices=["gloo", "nccl"],
                       help="with --stages N: the stages' transport (default: nccl when every stage is on CUDA, "
                       "gloo otherwise)")


def parse_devices(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(","))


def stage_placement(args: argparse.Namespace) -> tuple[tuple[str, ...] | None, str]:
    """(PipelineConfig.devices, PipelineConfig.backend) from --stage-devices and --backend, checked.

    Raises:
        ConfigError: a device count other than --stages, a device this machine does not have, nccl without CUDA,
            or a transport that does not carry the stages' tensors (gloo: CPU, nccl: CUDA).
    """
    from framecast.stream.decode_stage import check_device

    devices, backend = getattr(args, "stage_devices", None), getattr(args, "stage_backend", None)
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("--backend nccl needs CUDA, which this machine does not have; CPU stages use --backend gloo")
    kinds = {"cpu"}
    if devices is not None:
        if len(devices) != args.stages:
            raise ConfigError(f"--stage-devices names {len(devices)} device(s) ({','.join(devices)}); --stages "
                              f"{args.stages} needs one per stage")
        kinds = {check_device(device, "--stage-devices entry").type for device in devices}
    backend = backend or ("nccl" if kinds == {"cuda"} else "gloo")
    if backend == "nccl" and kinds != {"cuda"}:
        raise ConfigError("--backend nccl carries CUDA tensors: every --stage-devices entry must be a cuda device")
    if backend == "gloo" and "cuda" in kinds:
        raise ConfigError("--backend gloo carries CPU tensors between stages: CUDA --stage-devices need --backend nccl")
    return devices, backend


def check_stages(args: argparse.Namespace) -> None:
    """Refuse `--stages` settings (and the placement flags) before any model is built."""
    if args.stages < 1:
        raise ConfigError(f"--stages={args.stages} must be >= 1")
    if getattr(args, "decode_device", None) is not None:
        from framecast.stream.decode_stage import check_device

        check_device(args.decode_device, "--decode-device")
    if args.stages == 1:
        if getattr(args, "stage_devices", None) or getattr(args, "stage_backend", None):
            raise ConfigError("--stage-devices and --backend place the stage processes of --stages N (N > 1); "
                              "with one stage the DiT runs in this process")
        return
    if getattr(args, "family", None) or getattr(args, "input", None) or getattr(args, "simulator", False):
        raise ConfigError("--stages does not take --family, --input or --simulator: one process runs those")
    if args.device != "cpu":
        raise ConfigError("--stages runs stage processes on the CPU unless --stage-devices places them; this process "
                          f"(the orchestrator) stays on the CPU: --device {args.device} must be cpu")
    stage_placement(args)


PROFILE_FLAGS = {"family": None, "dtype": "auto", "decoder": None, "height": 128, "width": 128,
                 "window_frames": None, "sink_frames": None}  # generate's defaults of what a memory profile sets


def apply_memory_profile(args: argparse.Namespace) -> None:
    """Set what `--memory-profile` names; a flag it sets that was also given with another value is refused."""
    from framecast.stream.memory_profile import generate_settings, profile_by_name

    profile = profile_by_name(args.memory_profile)  # ConfigError naming the known profiles
    settings = generate_settings(profile)
    clashes = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name, default in PROFILE_FLAGS.items()
               if getattr(args, name) not in (default, getattr(settings, name))]
    if clashes:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in PROFILE_FLAGS)
        raise ConfigError(f"--memory-profile {profile.name} sets {flags}; drop {', '.join(clashes)}")
    if args.stream_batch or args.stages > 1:
        raise ConfigError(f"--memory-profile {profile.name} estimates one process with the chunk sampler; it does not "
                          "go with --stream-batch (one cache per step) or --stages")
    for name in PROFILE_FLAGS:
        setattr(args, name, getattr(settings, name))
    args.text_encoder_placement = settings.text_encoder_placement
    log.info("memory profile %s (estimated, not measured):\n%s", profile.name, profile.describe())


def run_generate(args: argparse.Namespace) -> None:
    if args.frames < 1:
        raise ConfigError(f"--frames={args.frames} must be >= 1")
    if args.memory_profile:
        apply_memory_profile(args)
    resolve_dtype(args.dtype, args.device)  # refuses float16 on the CPU before anything slow
    check_stages(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if uses_world_model(args):
        return run_generate_world(args)
    if args.switch or args.actions != "random" or args.world_weights or args.world_dit != "student":
        raise ConfigError("--actions, --switch, --world-dit and --world-weights are the world model's; they do not "
                          "go with --preset/--weights/--family")
    args.prompt = args.prompt or DEFAULT_PROMPT
    args.decoder = args.decoder or "preview"
    args.fps = args.fps or 16
    args.preset = args.preset or "tiny"
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.frames < 1:
        raise ConfigError(f"--frames={args.frames} must be >= 1")
    check_stages(args)
    if args.height % (2 * VAE_SPATIAL) or args.width % (2 * VAE_SPATIAL):
        raise ConfigError(f"--height/--width {args.height}x{args.width} must be multiples of {2 * VAE_SPATIAL}")
    if not args.output and not args.latents_out:
        raise ConfigError("nothing to write: give -o/--output and/or --latents-out")
    dit = build_model(args, dtype, device).eval()
    prompt = encode_prompt(args, dit, device)
    config = engine_config(args, args.height // VAE_SPATIAL, args.width // VAE_SPATIAL)
    latent_frames = 1 + math.ceil((args.frames - 1) / VAE_TEMPORAL)
    num_chunks = math.ceil(latent_frames / config.chunk_frames)
    engine = pipeline_engine(args, dit, config, prompt, dtype) if args.stages > 1 else \
        StreamEngine(dit, config, prompt.to(device, dtype))
    decoder = build_decoder(args, dit.config.out_dim, dtype, device)
    sources = video_source(args, decoder, config.chunk_frames)
    sink = None
    if args.output:
        from framecast.stream.sinks.file import VideoFileSink

        sink = VideoFileSink(args.output, args.fps)
    # a decode stage decodes chunk c while this process generates chunk c + 1 (one chunk in flight)
    lookahead = 1 if getattr(decoder, "in_flight", None) is not None else 0
    latents, written, start = [], 0, time.perf_counter()

    def write(frames: torch.Tensor) -> None:
        nonlocal written
        frames = frames[0].numpy()[: args.frames - written]
        sink.write(frames)
        written += len(frames)

    try:
        with tqdm(total=num_chunks, unit="chunk", desc="generating", disable=None) as progress:
            for _ in range(num_chunks):
                source = next(sources, None) if sources is not None else None
                if sources is not None and source is None:
                    log.warning("the input video ended; the stream ends with it")
                    break
                chunk = engine.next_chunk(source=source)
                if args.latents_out:
                    latents.append(chunk.latents.float().cpu())
                if sink and lookahead:
                    decoder.submit(chunk.latents)
                    if decoder.in_flight > lookahead:
                        write(decoder.result())
                elif sink:
                    write(decoder.decode(chunk.latents))
                progress.update(1)
            while sink and lookahead and decoder.in_flight:
                write(decoder.result())
    finally:
        if sink:
            sink.close()
        if args.stages > 1:
            engine.close()
        close_decoder(decoder)
    seconds = time.perf_counter() - start
    if args.latents_out:
        from safetensors.torch import save_file

        args.latents_out.parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": torch.cat(latents, dim=1).contiguous()}, str(args.latents_out))
        print(f"wrote latents {tuple(torch.cat(latents, dim=1).shape)} to {args.latents_out}")
    if sink:
        where = f", decoded in {decoder.describe}" if lookahead else ""
        print(f"wrote {written} frames ({args.width}x{args.height}, {args.fps} fps, {args.decoder} decoder{where}) to "
              f"{args.output}")
    print(f"{num_chunks * config.chunk_frames} latent frames in {seconds:.2f} s")


def add_bench(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("bench", help="stream in real time under the deadline scheduler and print its metrics")
    p.add_argument("--preset", help=f"model size: {', '.join(PRESETS)} (default: the embedded world model; other "
                   "presets run with random weights unless --weights is given)")
    add_world_model_flags(p)
    p.add_argument("--weights", type=Path, help="checkpoint to load instead of random weights")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to stream (default 10)")
    p.add_argument("--fps", type=int, default=30, help="target video frame rate (default 30)")
    p.add_argument("--latency-budget", type=float, default=0.5, help="seconds from a frame's media time to its deadline")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--fill", choices=["repeat", "interpolate"], default="repeat", help="fill used when no step list fits")
    p.add_argument("--load", type=int, default=0, help="busy background processes to inject (CPU load)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--stages", type=int, default=1, help="split the DiT's layers over this many stage processes")
    add_placement_flags(p)
    p.add_argument("--json", type=Path, help="write the metrics summary here")
    p.add_argument("--prometheus", action="store_true", help="print the /metrics text instead of the summary")
    p.add_argument("--seed", type=int, default=0)
    add_dtype_flag(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_stream_flags(p)
    p.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> None:
    from framecast.stream.bench import run_realtime_bench

    if args.seconds <= 0:
        raise ConfigError(f"--seconds={args.seconds} must be > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    check_stages(args)
    if uses_world_model(args):
        check_world_args(args)
        model = load_world_model(args)
        engine = model.engine(steps=world_steps(args), seed=args.seed, stream_batch=bool(args.stream_batch),
                              guidance=args.guidance, guided_steps=args.guided_steps)
        decoder = world_decoder(args, model)
    else:
        args.preset = args.preset or "tiny"
        dit = build_model(args, dtype, device).eval()
        prompt = HashedTextEncoder(dit.config.text_dim, dit.config.text_len).encode(DEFAULT_PROMPT)
        config = engine_config(args, args.height // VAE_SPATIAL, args.width // VAE_SPATIAL)
        engine = pipeline_engine(args, dit, config, prompt, dtype) if args.stages > 1 else \
            StreamEngine(dit, config, prompt.to(device, dtype))
        args.decoder = "preview"
        decoder = build_decoder(args, dit.config.out_dim, dtype, device)
    try:
        metrics = run_realtime_bench(
            engine, decoder, fps=args.fps,
            latency_budget_s=args.latency_budget, seconds=args.seconds, fill=args.fill, background_load=args.load,
        )
    finally:
        if args.stages > 1:
            engine.close()
        close_decoder(decoder)
    print(metrics.to_prometheus() if args.prometheus else metrics.to_text())
    if args.json:
        import json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(metrics.to_json(), indent=2))


def add_session_flags(p: argparse.ArgumentParser) -> None:
    """The model and live-session flags `serve` and `vcam` share."""
    p.add_argument("--preset", help=f"model size: {', '.join(PRESETS)} (default: the embedded world model; other "
                   "presets run with random weights unless --weights is given)")
    p.add_argument("--weights", type=Path, help="checkpoint (.pt/.pth of the causal-Wan families, or .safetensors)")
    p.add_argument("--family", help="a causal-Wan family preset; --weights is its file or folder")
    add_world_model_flags(p)
    p.add_argument("--prompt", help="the first prompt (clients switch it live; default: the world model's or the "
                   "simulator's own, a quiet lake at dawn for Wan-size models)")
    p.add_argument("--simulator", action="store_true",
                   help="stream the procedural world itself instead of a model (what the embedded model imitates: "
                   "prompts in its vocabulary, arrow keys steer the agent; exact, for demos and end-to-end checks)")
    p.add_argument("--decoder", choices=["preview", "wan-vae", "taehv"],
                   help="latent decoder of Wan-size models: the preview (default), the Wan VAE or TAEHV (needs "
                   "--decoder-weights); the world model has its own")
    p.add_argument("--decoder-weights", type=Path, help="Wan2.1_VAE.pth or taew2_1.pth")
    p.add_argument("--input", help="live input video for video-to-video (needs --decoder wan-vae: its weights hold "
                   "the encoder; start --steps below 1000, e.g. 700,500): ws (pictures pushed to /ingest, format in "
                   "stream/live_input.py), webcam[:DEVICE] (default /dev/video0 on Linux) or a video file (played "
                   "at its own rate, looping)")
    p.add_argument("--fps", type=int, help="video frame rate (default 30 for the world model, 16 otherwise)")
    p.add_argument("--latency-budget", type=float, default=1.0, help="seconds from a frame's media time to its send")
    p.add_argument("--height", type=int, default=128, help="frame height in pixels (multiple of 16)")
    p.add_argument("--width", type=int, default=128, help="frame width in pixels (multiple of 16)")
    p.add_argument("--output-scale", type=int, default=1,
                   help="enlarge frames this many times for every viewer (e.g. 4: 128 px -> 512 px)")
    p.add_argument("--stages", type=int, default=1, help="split the DiT's layers over this many stage processes")
    add_placement_flags(p, backend=False)
    add_stream_flags(p)
    p.add_argument("--seed", type=int, default=0)
    add_dtype_flag(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_camera_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--camera-device", help="virtual camera device (Linux: /dev/videoN of v4l2loopback; Windows/macOS: "
                   "OBS Virtual Camera); default: the first one free")
    p.add_argument("--backend", help="pyvirtualcam backend (v4l2loopback, obs, unitycapture); default: any that works")


def add_serve(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("serve", help="stream live to browsers and programs (websocket, WebRTC, /metrics)")
    add_session_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--ice-host", help="the address WebRTC peers are offered as ICE host candidate (default: --host; "
                   "give this machine's LAN address when binding 0.0.0.0)")
    p.add_argument("--ice-server", action="append", default=[],
                   help="STUN/TURN server URL for WebRTC (repeatable; default none: host candidates only)")
    p.add_argument("--max-peers", type=int, default=16, help="WebRTC viewers at once (default 16)")
    p.add_argument("--token", help="steering token (default: a random one, printed with the URL)")
    p.add_argument("--allow-origin", action="append", help="browser origin allowed on /ws (repeatable; default: "
                   "the server's own address)")
    p.add_argument("--max-message-bytes", type=int, default=4096, help="largest control message (default 4096)")
    p.add_argument("--max-ingest-bytes", type=int, default=8 << 20,
                   help="largest picture message on /ingest with --input ws (default 8 MiB)")
    p.add_argument("--vcam", action="store_true", help="also feed a virtual camera (see `framecast vcam`)")
    add_camera_flags(p)
    p.set_defaults(run=run_serve)


def add_vcam(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("vcam", help="stream live to a virtual camera (v4l2loopback, OBS Virtual Camera)")
    add_session_flags(p)
    add_camera_flags(p)
    p.add_argument("--seconds", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    p.set_defaults(run=run_vcam)


def check_session_args(args: argparse.Namespace) -> None:
    """Refuse bad session flags before anything slow (model loading, opening a camera) happens."""
    resolve_dtype(args.dtype, args.device)  # refuses float16 on the CPU before anything slow
    if args.height % (2 * VAE_SPATIAL) or args.width % (2 * VAE_SPATIAL):
        raise ConfigError(f"--height/--width {args.height}x{args.width} must be multiples of {2 * VAE_SPATIAL}")
    if args.output_scale < 1:
        raise ConfigError(f"--output-scale={args.output_scale} must be >= 1")
    check_stages(args)
    args.fps = args.fps or (30 if uses_world_model(args) else 16)
    if uses_world_model(args):
        check_world_args(args)
        if args.prompt is not None:
            from framecast.models.world.prompt import parse_prompt

            parse_prompt(args.prompt)  # a word outside the world's vocabulary fails here, naming it
    if args.simulator:
        from framecast.models.world.prompt import parse_prompt

        if args.weights or args.family or args.decode_device:
            raise ConfigError("--simulator streams the procedural world: it takes no --weights/--family/--decode-device")
        if args.prompt is not None:
            parse_prompt(args.prompt)  # a word outside the world's vocabulary fails here, naming it
    if args.input is not None:
        check_live_input_args(args)


def check_family_takes_video(args: argparse.Namespace) -> None:
    """Refuse `--input` with a family whose sampler cannot start from input latents (rolling-forcing)."""
    if getattr(args, "family", None):
        from framecast.stream.families import family

        if family(args.family).rolling_window:
            raise ConfigError(f"--input: the {args.family} family's rolling-window sampler takes no video input "
                              "(its chunks enter the window as pure noise)")


def check_live_input_args(args: argparse.Namespace) -> None:
    """Parse `--input` into an InputSpec and refuse what cannot take it; opens the webcam or file once to fail fast."""
    from framecast.stream.live_input import check_input, parse_input

    args.input = parse_input(args.input)
    if args.simulator:
        raise ConfigError("--input: the simulator takes no video input (video-to-video needs a Wan-size model)")
    if getattr(args, "stream_batch", None):
        raise ConfigError("--input: the stream-batch sampler takes no video input (its chunks enter as pure noise)")
    check_family_takes_video(args)
    if args.decoder != "wan-vae" or not args.decoder_weights:
        raise ConfigError("--input needs --decoder wan-vae --decoder-weights Wan2.1_VAE.pth: its encoder turns the "
                          "input frames into latents")
    check_input(args.input)


def live_video(args: argparse.Namespace, chunk_frames: int, dtype: torch.dtype, device: torch.device):
    """The session's video input for `--input`: live frames encoded by the Wan VAE of --decoder-weights."""
    from framecast.models.vae import WanVAEEncodeStream, load_wan_vae
    from framecast.stream.live_input import LiveFrames, LiveFramesConfig, LiveVideo
    from framecast.stream.sources import LatentSource

    encoder_dtype = torch.float32 if device.type == "cpu" else dtype  # bf16 convs are slow on the CPU
    vae = load_wan_vae(args.decoder_weights, encoder=True, device=device, dtype=encoder_dtype)
    frames = LiveFrames(LiveFramesConfig(width=args.width, height=args.height))
    return LiveVideo(args.input, frames, LatentSource(WanVAEEncodeStream(vae), frames, chunk_frames))


def build_session(args: argparse.Namespace, token: str | None = None):
    """The live session the flags describe (not started)."""
    from framecast.stream.session import Session, SessionConfig

    world = uses_world_model(args)
    config = SessionConfig(fps=args.fps, latency_budget_s=args.latency_budget, output_scale=args.output_scale)
    if world:
        from framecast.stream.worldmodel.bundle import DEFAULT_WORLD_PROMPT

        model = load_world_model(args)
        prompt_text = model.prompt_text(args.prompt or DEFAULT_WORLD_PROMPT)
        engine = model.engine(prompt_text.settings, steps=world_steps(args), seed=args.seed,
                              stream_batch=bool(args.stream_batch), guidance=args.guidance,
                              guided_steps=args.guided_steps)
        return Session(engine, world_decoder(args, model), prompt_text, config, token=token)
    args.preset, args.decoder = args.preset or "tiny", args.decoder or "preview"
    if args.simulator:
        from framecast.stream.simulator import PixelDecoder, SimulatorConfig, WorldSimulator

        options = {} if args.prompt is None else {"prompt": args.prompt}
        simulator = WorldSimulator(SimulatorConfig(height=args.height, width=args.width, seed=args.seed, **options))
        return Session(simulator, PixelDecoder(), simulator.encode_prompt, config, token=token)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    dit = build_model(args, dtype, device).eval()
    text = HashedTextEncoder(dit.config.text_dim, dit.config.text_len)
    if args.weights:
        log.warning("prompts are hashed, not encoded: live umT5 prompts for real checkpoints come in a later slice")
    stream_config = engine_config(args, args.height // VAE_SPATIAL, args.width // VAE_SPATIAL)
    first_prompt = text.encode(args.prompt or DEFAULT_PROMPT)
    engine = pipeline_engine(args, dit, stream_config, first_prompt, dtype) if args.stages > 1 else \
        StreamEngine(dit, stream_config, first_prompt.to(device, dtype))
    decoder = build_decoder(args, dit.config.out_dim, dtype, device)
    video = live_video(args, stream_config.chunk_frames, dtype, device) if args.input is not None else None
    return Session(engine, decoder, text.encode, config, token=token, video=video)


def close_engine(session) -> None:
    """End what the session's engine and decoder hold beyond this process (stage and decode processes)."""
    close = getattr(session.engine, "close", None)
    if close is not None:
        close()
    close_decoder(session.decoder)


def open_vcam(args: argparse.Namespace):
    """The virtual camera for the session's frames, opened before the model loads so a missing driver fails fast."""
    from framecast.stream.sinks.vcam import open_camera

    return open_camera(args.width * args.output_scale, args.height * args.output_scale, args.fps,
                       device=args.camera_device, backend=args.backend)


def start_vcam(args: argparse.Namespace, session, camera):
    """A started VirtualCameraSink on `camera` (it owns the camera from here on, and closes it when it ends)."""
    from framecast.stream.sinks.vcam import VirtualCameraSink

    sink = VirtualCameraSink(session, camera.width, camera.height, camera=camera)
    sink.start()
    print(f"framecast: virtual camera {sink.device} ({camera.backend}): {camera.width}x{camera.height} "
          f"at {args.fps} fps")
    return sink


def run_serve(args: argparse.Namespace) -> None:
    from framecast.stream.server import run_server

    check_session_args(args)
    if not args.vcam and (args.camera_device or args.backend):
        raise ConfigError("--camera-device and --backend choose the virtual camera: add --vcam")
    camera = open_vcam(args) if args.vcam else None
    sink = session = None
    try:
        session = build_session(args, token=args.token)
        if camera is not None:
            sink, camera = start_vcam(args, session, camera), None
        run_server(session, args.host, args.port, allowed_origins=args.allow_origin,
                   max_message_bytes=args.max_message_bytes, ice_host=args.ice_host or args.host,
                   ice_servers=args.ice_server, max_peers=args.max_peers, max_ingest_bytes=args.max_ingest_bytes)
    finally:
        if camera is not None:  # never handed to a sink
            camera.close()
        if sink is not None:
            sink.close()
        if session is not None:
            close_engine(session)


def run_vcam(args: argparse.Namespace) -> None:
    from framecast.models.errors import SessionClosed

    check_session_args(args)
    if args.seconds is not None and not args.seconds > 0:
        raise ConfigError(f"--seconds={args.seconds} must be > 0")
    if args.input is not None and args.input.kind.value == "ws":
        raise ConfigError("--input ws needs the server's /ingest endpoint: use `framecast serve --input ws` "
                          "(vcam takes webcam[:DEVICE] or a video file)")
    camera = open_vcam(args)
    try:
        session = build_session(args)
        sink, camera = start_vcam(args, session, camera), None
    finally:
        if camera is not None:
            camera.close()
    session.start()
    until = None if args.seconds is None else time.monotonic() + args.seconds
    try:
        while sink.is_running and (until is None or time.monotonic() < until):
            sink.join(0.2 if until is None else max(0.0, min(0.2, until - time.monotonic())))
    except KeyboardInterrupt:
        pass
    finally:
        session.close()
        sink.close()
        close_engine(session)
    print(f"framecast: {sink.frames_sent} frames sent to the virtual camera ({sink.dropped} dropped)")
    if session.failure is not None:
        raise SessionClosed(f"the stream failed: {session.failure}") from session.failure
    if sink.failure is not None:
        raise SessionClosed(f"the virtual camera failed: {sink.failure}") from sink.failure


def add_train(commands: argparse._SubParsersAction) -> None:
    from framecast.stream.worldmodel.train import TrainWorldSettings

    p = commands.add_parser("train", help="train the embedded world model (data, autoencoder, teacher, student, "
                                             "guidance distillation, eval)")
    p.add_argument("what", choices=["world"], help="the model to train")
    p.add_argument("--out", type=Path, default=Path("runs/world"), help="run folder (resumes what is there)")
    p.add_argument("--autoencoder-minutes", type=float, default=TrainWorldSettings.autoencoder_minutes,
                   help="time cap of the autoencoder (0: reuse the shipped one)")
    p.add_argument("--teacher-minutes", type=float, default=TrainWorldSettings.teacher_minutes)
    p.add_argument("--student-minutes", type=float, default=TrainWorldSettings.student_minutes)
    p.add_argument("--guidance-minutes", type=float, default=TrainWorldSettings.guidance_minutes,
                   help="time cap of the guidance distillation (the guided student into one that streams unguided)")
    p.add_argument("--clips", type=int, default=TrainWorldSettings.clips, help="latent clips of 24 frames to train on")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation")
    p.add_argument("--ship", action="store_true", help="copy the finished model into models/world/weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> None:
    from framecast.stream.worldmodel.train import TrainWorldSettings, main_train

    settings = TrainWorldSettings(autoencoder_minutes=args.autoencoder_minutes, teacher_minutes=args.teacher_minutes,
                                  student_minutes=args.student_minutes, guidance_minutes=args.guidance_minutes,
                                  clips=args.clips, evaluate=not args.no_eval)
    main_train(args.out, settings, args.device, args.ship, args.threads)


def add_eval(commands: argparse._SubParsersAction) -> None:
    from framecast.stream.worldmodel.evaluate import EvalSettings

    p = commands.add_parser("eval", help="measure the world model against the world's ground truth")
    p.add_argument("what", choices=["world"], help="the model to evaluate")
    p.add_argument("--weights", type=Path, help="folder with the model files (default: the shipped ones)")
    p.add_argument("--out", type=Path, help="write eval.json and the plots here")
    p.add_argument("--frames", type=int, default=EvalSettings.frames, help="frames per model row")
    p.add_argument("--switch-every", type=int, default=EvalSettings.switch_every, help="frames between prompt switches")
    p.add_argument("--long-frames", type=int, default=EvalSettings.long_frames,
                   help="frames of each drift stream (0: no drift measurement)")
    p.add_argument("--long-streams", type=int, default=EvalSettings.long_streams,
                   help="drift streams, pooled (their first and last windows graded together)")
    p.add_argument("--rows", help="comma-separated rows (default: all): " + ", ".join(EvalSettings.rows))
    p.add_argument("--guidance", type=float, default=EvalSettings.guidance,
                   help="classifier-free guidance of the guided teacher row (1: leave the row out)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    from framecast.stream.worldmodel.evaluate import EvalSettings, main_eval
    from framecast.stream.worldmodel.recipe import WEIGHTS_DIR

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = tuple(r.strip() for r in args.rows.split(",")) if args.rows else EvalSettings.rows
    unknown = [r for r in rows if r not in EvalSettings.rows]
    if unknown:
        raise ConfigError(f"unknown --rows {unknown}; rows: {', '.join(EvalSettings.rows)}")
    settings = EvalSettings(frames=args.frames, switch_every=args.switch_every, long_frames=args.long_frames,
                            long_streams=args.long_streams, rows=rows, guidance=args.guidance)
    main_eval(args.weights or WEIGHTS_DIR, args.out, settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="framecast", description="Real-time streaming video generation")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate(commands)
    add_bench(commands)
    add_serve(commands)
    add_vcam(commands)
    add_train(commands)
    add_eval(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.run(args)
    except FrameCastError as error:
        print(f"framecast: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
