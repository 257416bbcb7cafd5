"""Benchmark of the streaming engine: chunk latency, FPS, engine overhead over the bare DiT, and memory over time.

    python benchmarks/engine.py            # full run (a few minutes on a 2-core CPU)
    python benchmarks/engine.py --quick    # smoke run (about a minute); writes *-quick.* result files
    python benchmarks/engine.py --gpu-only # on a CUDA machine: only the GPU section

What it measures (random weights; timings do not depend on the weights' values):

1. CPU latency: `StreamEngine` chunks for presets `tiny` and `small` at 128x128 px (latent 16x16), chunk of 3
   latent frames, 4 steps (1000, 750, 500, 250), rolling KV cache of 12 frames with 3 sinks, in bfloat16 and
   float32. Median and p90 chunk latency after warm-up, FPS in latent frames/s and video frames/s (4 video frames
   per latent frame, Wan's VAE), and time to first chunk (engine construction + first chunk): "cold" on a model
   that has never run, "warm" for a second engine on the same model.
2. Engine overhead: engine chunk time / bare DiT time. The bare baseline is a copy of the same model called
   directly, `steps + 1` times per chunk (denoising steps + the clean context pass) on inputs of the same shapes,
   against its own rolling KV cache that is kept full (begin_chunk -> DiT calls -> commit), with no sampler, noise,
   history or controls. Engine and baseline chunks are interleaved (ABBA) in the same run. Goal: <= 1.05. Where the
   ratio is above that (or with --profile), the engine is profiled: a bare / bare + sampler / engine ladder (which
   layer adds the time), time inside DiT forwards (module hooks) against the whole chunk, the engine-side functions
   timed in situ, and a cProfile split.
3. Memory: preset `tiny` with the rolling cache and with linear attention (LinearState), 2,000 chunks each in a
   fresh process; process RSS (psutil) every 10 chunks, growth from chunk 200 to 2,000 (goal < 2 %), and
   `engine.memory.nbytes` at chunks 10 and 2,000.
4. GPU (only when `torch.cuda.is_available()`): preset `wan2.1-t2v-1.3b` in bfloat16 at 832x480 (latent 60x104),
   same stream settings; latency, FPS, time to first chunk and overhead, with `torch.cuda.synchronize()` around every
   timed region. Writes `results/engine-<gpu-name>.json/.md`.

Results: a table on stdout, `results/engine-cpu.json`, `results/engine-cpu.md` and `results/engine-cpu-rss.png`.
FPS is computed from the median chunk latency (robust to other load on a shared machine); means are in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import datetime
import json
import os
import platform
import pstats
import random
import re
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

import framecast.stream
from machine_load import ForeignLoad  # benchmarks/ is on sys.path when run as a script
from framecast.models.config import AttentionKind, preset
from framecast.models.dit import CausalWanDiT, parameter_count
from framecast.models.memory import KVCache, LinearState, Memory
from framecast.stream import sampler
from framecast.stream.engine import CacheKind, EngineConfig, LatentChunk, StreamEngine
from framecast.stream.noise import GaussianNoise
from framecast.stream.sampler import FlowMatchSchedule, denoise

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
VIDEO_FRAMES_PER_LATENT = 4  # Wan VAE: 4 video frames per latent frame (in a running stream)
OVERHEAD_GOAL = 1.05
RSS_GROWTH_GOAL_PERCENT = 2.0
STREAM_DIR = str(Path(framecast.stream.__file__).resolve().parent)


@dataclass(frozen=True)
class Settings:
    """Everything the benchmark varies; `quick_version()` shrinks the chunk counts for a smoke run."""

    height_px: int = 128
    width_px: int = 128
    chunk_frames: int = 3
    steps: tuple[int, ...] = (1000, 750, 500, 250)
    window_frames: int = 12
    sink_frames: int = 3
    threads: int = 2
    seed: int = 0
    presets: tuple[str, ...] = ("tiny", "small")
    dtypes: tuple[str, ...] = ("bfloat16", "float32")
    warmup_chunks: int = 8  # > window / chunk, so the cache is full and evicting when timing starts
    measured_chunks: tuple[tuple[str, int], ...] = (("tiny", 500), ("small", 100))  # engine chunks (as many bare)
    profile_chunks: int = 30
    memory_preset: str = "tiny"
    memory_dtype: str = "float32"
    memory_chunks: int = 2000
    rss_from_chunk: int = 200  # RSS growth is measured from here to the last chunk
    nbytes_at: tuple[int, ...] = (10, 2000)
    rss_every: int = 10
    gpu_preset: str = "wan2.1-t2v-1.3b"
    gpu_height_px: int = 480
    gpu_width_px: int = 832
    gpu_dtype: str = "bfloat16"
    gpu_warmup_chunks: int = 5
    gpu_chunks: int = 30
    quick: bool = False

    def chunks_for(self, name: str) -> int:
        return dict(self.measured_chunks).get(name, 20)

    def quick_version(self) -> Settings:
        return replace(
            self, warmup_chunks=5, measured_chunks=(("tiny", 30), ("small", 6)), profile_chunks=5,
            memory_chunks=400, rss_from_chunk=100, nbytes_at=(10, 400), gpu_warmup_chunks=2, gpu_chunks=5, quick=True,
        )


# ---------------------------------------------------------------------------------------------------- setup


def machine_info(settings: Settings) -> dict:
    cpu_model, flags = platform.processor() or "unknown", []
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu_model = re.search(r"^model name\s*:\s*(.+)$", text, re.M).group(1).strip()
        flag_line = re.search(r"^flags\s*:\s*(.+)$", text, re.M).group(1).split()
        flags = sorted(f for f in flag_line if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))
    except (OSError, AttributeError):
        pass
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_flags": flags,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "threads_requested": settings.threads,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "code": code_version(),
    }


def code_version() -> str:
    """The commit measured, and the tracked files that differ from it (outside benchmarks/)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                                text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    dirty = [line[3:] for line in status.stdout.splitlines() if not line[3:].startswith("benchmarks/")]
    return commit.stdout.strip() + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")


def build_model(name: str, dtype: torch.dtype, device: str, seed: int, **overrides: object) -> tuple[CausalWanDiT, torch.Tensor]:
    """A randomly initialised DiT of the preset in `dtype` on `device`, and a random prompt embedding."""
    config = preset(name, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        dit = CausalWanDiT(config).to(dtype).eval().requires_grad_(False)
    prompt = torch.randn(1, config.text_len, config.text_dim, device=device)
    return dit, prompt


def engine_config(settings: Settings, height_px: int, width_px: int) -> EngineConfig:
    return EngineConfig(
        latent_height=height_px // 8, latent_width=width_px // 8, chunk_frames=settings.chunk_frames,
        denoising_steps=settings.steps, cache=CacheKind.ROLLING, window_frames=settings.window_frames,
        sink_frames=settings.sink_frames, seed=settings.seed,
    )


def no_sync() -> None:
    pass


# ---------------------------------------------------------------------------------------------------- bare baseline


def bare_memory(dit: CausalWanDiT, config: EngineConfig) -> Memory:
    """The memory the engine would use for this model, built directly from framecast.models.memory."""
    if dit.config.attention is AttentionKind.LINEAR:
        return LinearState(
            dit.config, batch=config.batch, chunk_frames=config.chunk_frames, recache_frames=config.window_frames,
            dtype=dit.dtype, device=dit.device,
        )
    return KVCache(
        dit.config, batch=config.batch, tokens_per_frame=dit.config.tokens_per_frame(config.latent_height, config.latent_width),
        window_frames=config.window_frames, sink_frames=config.sink_frames, evicts=True, dtype=dit.dtype, device=dit.device,
    )


class BareDiT:
    """The DiT calls of one engine chunk made directly on a copy of the model: same shapes, same memory policy."""

    def __init__(self, dit: CausalWanDiT, config: EngineConfig, prompt: torch.Tensor) -> None:
        self.dit = copy.deepcopy(dit)  # its own RoPE memo, so neither side reuses the other's angle tables
        self.memory = bare_memory(self.dit, config)
        self.frames = config.chunk_frames
        device, batch = self.dit.device, config.batch
        shape = (batch, config.chunk_frames, dit.config.in_dim, config.latent_height, config.latent_width)
        generator = torch.Generator().manual_seed(config.seed + 1)
        self.latents = torch.randn(shape, generator=generator).to(device, self.dit.dtype)
        step_timesteps = [step.timestep for step in FlowMatchSchedule(config.shift).steps(config.denoising_steps)]
        self.timesteps = [
            torch.full((batch, config.chunk_frames), float(t), dtype=torch.float32, device=device)
            for t in [*step_timesteps, float(config.context_noise)]  # the denoising steps, then the context pass
        ]
        with torch.inference_mode():
            self.text = self.dit.encode_text(prompt)

    @torch.inference_mode()
    def chunk(self) -> None:
        self.memory.begin_chunk(self.frames)
        for timesteps in self.timesteps:
            self.dit(self.latents, timesteps, self.text, self.memory)
        self.memory.commit()


class SampledDiT(BareDiT):
    """The bare calls plus the sampler (noise draws, `denoise`, clean context pass): the engine without its wrapper
    (controls, history, chunk iterator). Used to split the overhead between the sampler and the engine loop."""

    def __init__(self, dit: CausalWanDiT, config: EngineConfig, prompt: torch.Tensor) -> None:
        super().__init__(dit, config, prompt)
        self.steps = FlowMatchSchedule(config.shift).steps(config.denoising_steps)
        self.noise = GaussianNoise(config.seed + 3, self.dit.device)
        self.shape = tuple(self.latents.shape)

    @torch.inference_mode()
    def chunk(self) -> None:
        self.memory.begin_chunk(self.frames)
        noise = self.noise.draw(self.shape, self.dit.dtype, self.dit.device)
        latents = denoise(self.dit, noise, self.text, self.memory, self.steps, self.noise)
        self.dit(latents, self.timesteps[-1], self.text, self.memory)
        self.memory.commit()


# ---------------------------------------------------------------------------------------------------- latency


def timed(call: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - start


def first_chunk(dit: CausalWanDiT, config: EngineConfig, prompt: torch.Tensor,
                sync: Callable[[], None]) -> tuple[float, StreamEngine, Iterator[LatentChunk]]:
    """Seconds from engine construction to the first chunk, the engine and its running chunk iterator."""
    sync()
    start = time.perf_counter()
    engine = StreamEngine(dit, config, prompt)
    chunks = engine.chunks()
    next(chunks)
    sync()
    return time.perf_counter() - start, engine, chunks


def interleaved(chunks: Iterator[LatentChunk], bare: BareDiT, count: int, sync: Callable[[], None], label: str) -> tuple[list[float], list[float]]:
    """`count` engine chunks and `count` bare chunks in ABBA order; seconds of each."""
    engine_s, bare_s = [], []
    for index in tqdm(range(count), desc=label, leave=False):
        first_engine = index % 2 == 0
        for is_engine in (first_engine, not first_engine):
            if is_engine:
                engine_s.append(timed(lambda: next(chunks), sync))
            else:
                bare_s.append(timed(bare.chunk, sync))
    return engine_s, bare_s


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(name: str, dtype: str, params: int, chunk_frames: int, cold: float, warm: float,
              engine_s: list[float], bare_s: list[float]) -> dict:
    median, bare_median = statistics.median(engine_s), statistics.median(bare_s)
    latent_fps = chunk_frames / median
    return {
        "preset": name,
        "params_m": round(params / 1e6, 2),
        "dtype": dtype,
        "chunks": len(engine_s),
        "ttfc_cold_ms": cold * 1e3,
        "ttfc_warm_ms": warm * 1e3,
        "median_ms": median * 1e3,
        "p90_ms": percentile(engine_s, 0.9) * 1e3,
        "mean_ms": statistics.fmean(engine_s) * 1e3,
        "latent_fps": latent_fps,
        "video_fps": latent_fps * VIDEO_FRAMES_PER_LATENT,
        "bare_median_ms": bare_median * 1e3,
        "bare_p90_ms": percentile(bare_s, 0.9) * 1e3,
        "bare_mean_ms": statistics.fmean(bare_s) * 1e3,
        "overhead": median / bare_median,
        "overhead_mean": statistics.fmean(engine_s) / statistics.fmean(bare_s),
        "engine_ms": [round(s * 1e3, 3) for s in engine_s],
        "bare_ms": [round(s * 1e3, 3) for s in bare_s],
    }


def benchmark_stream(name: str, dtype: str, device: str, config: EngineConfig, settings: Settings,
                     warmup: int, count: int, sync: Callable[[], None], profile: bool) -> dict:
    """Time to first chunk, then interleaved engine/bare latency; a profile when the overhead is over the goal."""
    dit, prompt = build_model(name, DTYPES[dtype], device, settings.seed)
    cold, _, _ = first_chunk(dit, config, prompt, sync)
    warm, engine, chunks = first_chunk(dit, config, prompt, sync)
    bare = BareDiT(dit, config, prompt)
    for _ in range(warmup):
        next(chunks)
        bare.chunk()
    sync()
    with ForeignLoad() as load:
        engine_s, bare_s = interleaved(chunks, bare, count, sync, f"{name} {dtype}")
    row = summarize(name, dtype, parameter_count(dit.config), config.chunk_frames, cold, warm, engine_s, bare_s)
    row["foreign_cpu_percent"] = load.percent
    if profile or row["overhead"] > OVERHEAD_GOAL:
        row["profile"] = profile_engine(engine, chunks, bare, prompt, settings.profile_chunks, sync)
    del bare, chunks, engine, dit
    return row


# ---------------------------------------------------------------------------------------------------- profiling


def dit_time_hooks(dit: CausalWanDiT, sync: Callable[[], None]) -> tuple[dict, Callable[[], None]]:
    """Accumulates seconds and calls inside dit.forward; returns the totals and a function removing the hooks."""
    totals = {"seconds": 0.0, "calls": 0, "start": 0.0}

    def before(module: torch.nn.Module, args: object) -> None:
        sync()
        totals["start"] = time.perf_counter()

    def after(module: torch.nn.Module, args: object, output: object) -> None:
        sync()
        totals["seconds"] += time.perf_counter() - totals["start"]
        totals["calls"] += 1

    handles = [dit.register_forward_pre_hook(before), dit.register_forward_hook(after)]
    return totals, lambda: [h.remove() for h in handles]


def engine_side_functions(stats: pstats.Stats, chunks: int, top: int = 12) -> list[dict]:
    """cProfile split of engine-side time: functions of framecast.stream that make no DiT call, and the functions
    framecast.stream calls directly (torch ops included), DiT calls excluded. Cumulative ms per chunk."""
    enclosing = {"chunks", "step", "denoise", "_recache", "_apply_controls"}  # contain DiT calls or the rest
    wrappers = {"_wrapped_call_impl", "_call_impl", "decorate_context"}  # the DiT call; inference_mode around step()
    rows: dict[str, list[float]] = {}
    for (file, line, func), (_, calls, _, cumulative, callers) in stats.stats.items():
        name = f"{Path(file).name}:{line}({func})" if file != "~" else func
        if file.startswith(STREAM_DIR):
            if func not in enclosing:
                rows[name] = [calls, cumulative]
            continue
        if func in wrappers:
            continue
        from_stream = [v for (cfile, _, _), v in callers.items() if cfile.startswith(STREAM_DIR)]
        if from_stream:
            rows[f"{name} [called from framecast.stream]"] = [sum(v[1] for v in from_stream), sum(v[3] for v in from_stream)]
    ordered = sorted(rows.items(), key=lambda item: -item[1][1])[:top]
    return [{"function": k, "calls_per_chunk": v[0] / chunks, "ms_per_chunk": v[1] / chunks * 1e3} for k, v in ordered]


@contextlib.contextmanager
def in_situ_timers(engine: StreamEngine) -> Iterator[tuple[dict[str, float], Counter]]:
    """Seconds and calls of the engine-side functions while the engine runs: the engine's own controls, noise and
    history (wrapped on the instances) and the sampler's to_clean / renoise (wrapped in framecast.stream.sampler,
    where `denoise` looks them up). Everything is restored on exit. Without device syncs: launch time on a GPU."""
    seconds: dict[str, float] = defaultdict(float)
    calls: Counter = Counter()

    def wrap(name: str, function: Callable) -> Callable:
        def timed_call(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start
                calls[name] += 1
        return timed_call

    instances = [(engine, "_apply_controls", "StreamEngine._apply_controls"), (engine.noise, "draw", "noise.draw"),
                 (engine.history, "push", "LatentHistory.push")]
    functions = [(sampler, "to_clean", "sampler.to_clean"), (sampler, "renoise", "sampler.renoise")]
    originals = [getattr(module, attr) for module, attr, _ in functions]
    for owner, attr, name in instances + functions:
        setattr(owner, attr, wrap(name, getattr(owner, attr)))
    try:
        yield seconds, calls
    finally:
        for owner, attr, _ in instances:
            delattr(owner, attr)  # the instance attribute shadowed the class's method
        for (module, attr, _), original in zip(functions, originals):
            setattr(module, attr, original)


def ladder(chunks: Iterator[LatentChunk], bare: BareDiT, sampled: SampledDiT, count: int, sync: Callable[[], None]) -> dict:
    """Median ms of engine, bare + sampler and bare chunks, run in a shuffled order each round."""
    calls = {"engine": lambda: next(chunks), "bare_plus_sampler": sampled.chunk, "bare": bare.chunk}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    order = random.Random(0)
    for _ in tqdm(range(count), desc="overhead ladder", leave=False):
        for name in order.sample(list(calls), len(calls)):
            seconds[name].append(timed(calls[name], sync))
    return {f"{name}_ms": statistics.median(values) * 1e3 for name, values in seconds.items()}


def profile_engine(engine: StreamEngine, chunks: Iterator[LatentChunk], bare: BareDiT, prompt: torch.Tensor,
                   count: int, sync: Callable[[], None]) -> dict:
    """Where engine time outside the DiT goes: the engine / bare + sampler / bare ladder; then, over the same chunks,
    the DiT forwards (module hooks) and the engine-side functions (in situ); then a cProfile split."""
    sampled = SampledDiT(engine.dit, engine.config, prompt)
    for _ in range(3):
        sampled.chunk()
    steps = ladder(chunks, bare, sampled, 4 * count, sync)
    totals, remove = dit_time_hooks(engine.dit, sync)
    with in_situ_timers(engine) as (seconds, calls):
        chunk_s = sum(timed(lambda: next(chunks), sync) for _ in range(count))
    remove()
    in_situ = [{"function": name, "calls_per_chunk": calls[name] / count, "ms_per_chunk": seconds[name] / count * 1e3}
               for name in sorted(seconds, key=lambda n: -seconds[n])]
    outside = chunk_s - totals["seconds"]
    in_situ.append({"function": "rest: torch.full, memory begin/commit (the bare pays these too), loop, hook dispatch",
                    "calls_per_chunk": float("nan"), "ms_per_chunk": (outside - sum(seconds.values())) / count * 1e3})
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(count):
        next(chunks)
    profiler.disable()
    stats = pstats.Stats(profiler)
    return {
        "chunks": count,
        "ladder": steps,
        "chunk_ms": chunk_s / count * 1e3,
        "dit_ms": totals["seconds"] / count * 1e3,
        "dit_calls_per_chunk": totals["calls"] / count,
        "outside_dit_ms": outside / count * 1e3,
        "in_situ_engine_side": in_situ,
        "cprofile_engine_side": engine_side_functions(stats, count),
    }


# ---------------------------------------------------------------------------------------------------- memory


def memory_run(settings: Settings, attention: str) -> dict:
    """Stream `memory_chunks` chunks of the memory preset; RSS every `rss_every` chunks. Run in a fresh process."""
    torch.set_num_threads(settings.threads)
    dit, prompt = build_model(settings.memory_preset, DTYPES[settings.memory_dtype], "cpu", settings.seed,
                              attention=AttentionKind(attention))
    engine = StreamEngine(dit, engine_config(settings, settings.height_px, settings.width_px), prompt)
    process = psutil.Process()
    rss: list[tuple[int, int]] = [(0, process.memory_info().rss)]
    nbytes: dict[int, int] = {}
    chunks = engine.chunks()
    start = time.perf_counter()
    for index in tqdm(range(1, settings.memory_chunks + 1), desc=f"memory {attention}", leave=False):
        next(chunks)
        if index % settings.rss_every == 0 or index == settings.rss_from_chunk:
            rss.append((index, process.memory_info().rss))
        if index in settings.nbytes_at:
            nbytes[index] = engine.memory.nbytes
    seconds = time.perf_counter() - start
    at = dict(rss)
    first, last = at[settings.rss_from_chunk], at[settings.memory_chunks]
    return {
        "attention": attention,
        "memory": type(engine.memory).__name__,
        "preset": settings.memory_preset,
        "dtype": settings.memory_dtype,
        "chunks": settings.memory_chunks,
        "seconds": seconds,
        "rss_from_chunk": settings.rss_from_chunk,
        "rss_first_mib": first / 2**20,
        "rss_last_mib": last / 2**20,
        "rss_growth_mib": (last - first) / 2**20,
        "rss_growth_percent": (last - first) / first * 100,
        "nbytes": {str(k): v for k, v in nbytes.items()},
        "rss": rss,
    }


def memory_runs(settings: Settings) -> list[dict]:
    """Each memory run in its own fresh process, so no earlier allocation hides (or causes) growth."""
    results = []
    for attention in (AttentionKind.SOFTMAX.value, AttentionKind.LINEAR.value):
        with ForeignLoad() as load:
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                result = pool.submit(memory_run, settings, attention).result()
        results.append(result | {"foreign_cpu_percent": load.percent})
    return results


def plot_rss(memory: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for run in memory:
        chunks, rss = zip(*run["rss"])
        label = f"{run['preset']} {run['attention']} ({run['memory']}): {run['rss_growth_percent']:+.2f}% from chunk {run['rss_from_chunk']}"
        axis.plot(chunks, [r / 2**20 for r in rss], label=label)
    axis.axvline(memory[0]["rss_from_chunk"], color="gray", linestyle=":", linewidth=1)
    axis.set_xlabel("chunk")
    axis.set_ylabel("process RSS (MiB)")
    axis.set_title("FrameCast StreamEngine: process RSS over an endless stream (CPU, 128x128 px)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------- runs


def run_cpu(settings: Settings, profile: bool) -> list[dict]:
    config = engine_config(settings, settings.height_px, settings.width_px)
    rows = []
    for name in settings.presets:
        for dtype in settings.dtypes:
            rows.append(benchmark_stream(name, dtype, "cpu", config, settings, settings.warmup_chunks,
                                         settings.chunks_for(name), no_sync, profile))
    return rows


def run_gpu(settings: Settings, profile: bool) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "torch.cuda.is_available() is False (no GPU in this run)"}
    config = engine_config(settings, settings.gpu_height_px, settings.gpu_width_px)
    row = benchmark_stream(settings.gpu_preset, settings.gpu_dtype, "cuda", config, settings, settings.gpu_warmup_chunks,
                           settings.gpu_chunks, torch.cuda.synchronize, profile)
    return {"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "rows": [row],
            "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}


# ---------------------------------------------------------------------------------------------------- reporting


LATENCY_COLUMNS = [
    ("preset", "preset", "{}"), ("params (M)", "params_m", "{:.2f}"), ("dtype", "dtype", "{}"),
    ("TTFC cold (ms)", "ttfc_cold_ms", "{:.1f}"), ("TTFC warm (ms)", "ttfc_warm_ms", "{:.1f}"),
    ("chunk median (ms)", "median_ms", "{:.2f}"), ("chunk p90 (ms)", "p90_ms", "{:.2f}"),
    ("latent FPS", "latent_fps", "{:.1f}"), ("video FPS", "video_fps", "{:.1f}"),
    ("bare DiT median (ms)", "bare_median_ms", "{:.2f}"), ("overhead (median)", "overhead", "{:.3f}"),
    ("overhead (mean)", "overhead_mean", "{:.3f}"), ("chunks", "chunks", "{}"),
    ("foreign CPU (%)", "foreign_cpu_percent", "{:.1f}"),
]
MEMORY_COLUMNS = [
    ("preset", "preset", "{}"), ("attention", "attention", "{}"), ("memory", "memory", "{}"), ("dtype", "dtype", "{}"),
    ("chunks", "chunks", "{}"), ("RSS @from (MiB)", "rss_first_mib", "{:.1f}"), ("RSS @last (MiB)", "rss_last_mib", "{:.1f}"),
    ("growth (MiB)", "rss_growth_mib", "{:+.2f}"), ("growth (%)", "rss_growth_percent", "{:+.3f}"),
    ("nbytes (early)", "nbytes_first", "{:,}"), ("nbytes (last)", "nbytes_last", "{:,}"), ("seconds", "seconds", "{:.1f}"),
    ("foreign CPU (%)", "foreign_cpu_percent", "{:.1f}"),
]


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown pipe table, padded so it also reads well on a terminal."""
    cells = [[title for title, _, _ in columns]] + [[fmt.format(row[key]) for _, key, fmt in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def memory_rows(memory: list[dict]) -> list[dict]:
    rows = []
    for run in memory:
        first, last = sorted(run["nbytes"], key=int)[0], sorted(run["nbytes"], key=int)[-1]
        rows.append(run | {"nbytes_first": run["nbytes"][first], "nbytes_last": run["nbytes"][last],
                           "rss_first_mib": run["rss_first_mib"], "rss_last_mib": run["rss_last_mib"]})
    return rows


def profile_text(rows: list[dict]) -> str:
    parts = []
    for row in rows:
        if "profile" not in row:
            continue
        p = row["profile"]
        lad = p["ladder"]
        parts.append(
            f"**{row['preset']} {row['dtype']}** (overhead {row['overhead']:.3f}). Ladder over {4 * p['chunks']} shuffled "
            f"rounds, median ms: bare DiT {lad['bare_ms']:.3f} -> + sampler (noise, denoise math, timesteps) "
            f"{lad['bare_plus_sampler_ms']:.3f} -> engine {lad['engine_ms']:.3f}; i.e. sampler "
            f"{lad['bare_plus_sampler_ms'] - lad['bare_ms']:+.3f} ms, engine loop (controls, history, iterator) "
            f"{lad['engine_ms'] - lad['bare_plus_sampler_ms']:+.3f} ms per chunk.\n\n"
            f"Hook-timed: chunk {p['chunk_ms']:.2f} ms, "
            f"inside {p['dit_calls_per_chunk']:.0f} DiT forwards {p['dit_ms']:.2f} ms, outside the DiT "
            f"{p['outside_dit_ms']:.2f} ms/chunk (over {p['chunks']} chunks), split in situ:\n"
        )
        parts.append(table(p["in_situ_engine_side"], [("function", "function", "{}"),
                                                      ("calls/chunk", "calls_per_chunk", "{:.0f}"),
                                                      ("ms/chunk", "ms_per_chunk", "{:.3f}")]))
        parts.append("\ncProfile, engine side (cumulative ms per chunk; the profiler inflates Python-heavy calls):\n")
        parts.append(table(p["cprofile_engine_side"], [("function", "function", "{}"),
                                                       ("calls/chunk", "calls_per_chunk", "{:.1f}"),
                                                       ("ms/chunk", "ms_per_chunk", "{:.3f}")]))
        parts.append("")
    return "\n".join(parts)


def verdicts(rows: list[dict], memory: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        ok = "meets" if row["overhead"] <= OVERHEAD_GOAL else "MISSES"
        lines.append(f"- overhead {row['preset']} {row['dtype']}: {row['overhead']:.3f} ({ok} the <= {OVERHEAD_GOAL} goal)")
    for run in memory:
        ok = "meets" if abs(run["rss_growth_percent"]) < RSS_GROWTH_GOAL_PERCENT else "MISSES"
        lines.append(f"- RSS growth {run['preset']} {run['attention']}: {run['rss_growth_percent']:+.3f}% "
                     f"from chunk {run['rss_from_chunk']} to {run['chunks']} ({ok} the < {RSS_GROWTH_GOAL_PERCENT}% goal)")
    return lines


def markdown(title: str, machine: dict, settings: Settings, command: str, date: str, rows: list[dict],
             memory: list[dict] | None, gpu_note: str | None, plot: str | None) -> str:
    machine_lines = "\n".join(f"- {k}: {v}" for k, v in machine.items())
    stream = (f"{settings.width_px}x{settings.height_px} px (latent {settings.height_px // 8}x{settings.width_px // 8}), "
              f"{settings.chunk_frames} latent frames per chunk, steps {list(settings.steps)}, rolling KV cache "
              f"window {settings.window_frames} with {settings.sink_frames} sinks, random weights, batch 1")
    out = [f"# {title}", "", f"- date: {date}", f"- command: `{command}`", f"- stream: {stream}", "", "## Machine", "",
           machine_lines, "", "## Latency, FPS, overhead", "",
           "Median/p90 over the measured chunks after warm-up; FPS from the median; video FPS = 4 x latent FPS. "
           "TTFC = engine construction + first chunk (cold: the model's first run; warm: a second engine). "
           "Overhead = engine chunk time / bare DiT time (same model copy, steps + 1 forwards per chunk, same shapes, "
           "own full rolling cache), interleaved ABBA.", "", table(rows, LATENCY_COLUMNS), ""]
    if memory:
        out += ["## Memory over an endless stream", "",
                f"Each run in a fresh process; RSS growth from chunk {memory[0]['rss_from_chunk']} to the last chunk.", "",
                table(memory_rows(memory), MEMORY_COLUMNS), ""]
        if plot:
            out += [f"![RSS over chunks]({plot})", ""]
    out += ["## Verdicts", "", *verdicts(rows, memory or []), ""]
    profiles = profile_text(rows)
    if profiles:
        out += ["## Engine overhead profile", "", profiles]
    if gpu_note:
        out += ["## GPU", "", gpu_note, ""]
    return "\n".join(out)


def write(path: Path, text: str) -> None:
    path.write_text(text)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (~1 minute); writes *-quick.* files")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--profile", action="store_true", help="profile the engine even when the overhead meets the goal")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the 2,000-chunk memory runs")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU section (CUDA machines)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings(threads=args.threads)
    settings = settings.quick_version() if args.quick else settings
    torch.set_num_threads(settings.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if settings.quick else ""
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine = machine_info(settings)
    started = time.perf_counter()

    cpu_sections = not args.gpu_only
    memory = memory_runs(settings) if cpu_sections and not args.skip_memory else []
    rows = run_cpu(settings, args.profile) if cpu_sections else []
    gpu = run_gpu(settings, args.profile)
    machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    machine["benchmark_seconds"] = round(time.perf_counter() - started, 1)
    if "rows" in gpu:
        write_gpu(args.out, suffix, gpu, machine, settings, command, date)
    if cpu_sections:
        write_cpu(args.out, suffix, rows, memory, gpu, machine, settings, command, date)
    elif "skipped" in gpu:
        print(gpu["skipped"])


def write_cpu(out: Path, suffix: str, rows: list[dict], memory: list[dict], gpu: dict, machine: dict,
              settings: Settings, command: str, date: str) -> None:
    plot = None
    if memory:
        plot = f"engine-cpu-rss{suffix}.png"
        plot_rss(memory, out / plot)
        print(f"wrote {out / plot}")
    gpu_note = gpu.get("skipped") or f"see engine-{slug(gpu['device'])}{suffix}.md"
    report = markdown("FrameCast engine benchmark (CPU)", machine, settings, command, date, rows, memory, gpu_note, plot)
    print("\n" + report)
    payload = {"date": date, "command": command, "machine": machine, "settings": asdict(settings),
               "latency": rows, "memory": memory, "gpu": gpu if "skipped" in gpu else {"see": gpu_note}}
    write(out / f"engine-cpu{suffix}.json", json.dumps(payload, indent=1))
    write(out / f"engine-cpu{suffix}.md", report)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_gpu(out: Path, suffix: str, gpu: dict, machine: dict, settings: Settings, command: str, date: str) -> None:
    name = f"engine-{slug(gpu['device'])}{suffix}"
    gpu_settings = replace(settings, height_px=settings.gpu_height_px, width_px=settings.gpu_width_px)
    note = (f"{gpu['device']}, CUDA {gpu['cuda']}, peak allocated {gpu['max_memory_allocated_gib']:.1f} GiB, "
            f"preset {settings.gpu_preset} in {settings.gpu_dtype}")
    report = markdown(f"FrameCast engine benchmark ({gpu['device']})", machine, gpu_settings, command, date,
                      gpu["rows"], None, note, None)
    print("\n" + report)
    payload = {"date": date, "command": command, "machine": machine, "settings": asdict(settings), "gpu": gpu}
    write(out / f"{name}.json", json.dumps(payload, indent=1))
    write(out / f"{name}.md", report)


if __name__ == "__main__":
    main()
