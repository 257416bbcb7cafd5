"""Benchmark of the pipeline-parallel orchestrator on this CPU: 1 process with 1 thread vs 2 stage processes with
1 thread each.

    python benchmarks/pipeline.py            # full run: bfloat16 and float32 (about 6 minutes on a 2-core CPU)
    python benchmarks/pipeline.py --quick    # smoke run; writes *-quick.* result files

What it measures (random weights; timings do not depend on the weights' values):

- baseline: `StreamEngine` in this process with `torch.set_num_threads(1)`;
- ONE stream in stream-batch mode (`EngineConfig.stream_batch`): in one process, and through 2 stage processes;
  and what the mode costs the shipped world model in quality (`stream_batch_quality`);
- `PipelineEngine` with 2 stage processes (gloo over loopback, 1 torch thread each, layers balanced from measured
  per-layer times and re-balanced while running) and 1, 2 and 3 lanes. Lanes are independent streams; each lane's
  chunks equal a single-process engine's bit for bit (checked here in the benchmark dtype for lane 0 against the
  baseline's chunks).

Throughput is latent chunks per second over the measured window (after warm-up), all lanes together. Single-stream
speedup = pipeline with 1 lane / baseline; lanes speedup = pipeline with L lanes / baseline; efficiency = speedup / 2
(goal >= 85 % of 2x with 2 lanes). Conditions are interleaved in --rounds rounds so that the load other processes put
on this shared machine spreads over all of them; the median round is reported, and the CPU time other processes used
during each window ("foreign CPU", % of all cores) is recorded.

Results: results/pipeline-cpu.json, results/pipeline-cpu.md and results/pipeline-cpu.png, with the machine named.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import multiprocessing
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from machine_load import ForeignLoad  # benchmarks/ is on sys.path when run as a script
from framecast.models.config import preset
from framecast.models.dit import parameter_count
from framecast.stream.engine import EngineConfig, StreamEngine
from framecast.stream.model_source import RandomDiT
from framecast.stream.pipeline import PipelineConfig, PipelineEngine

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
EFFICIENCY_GOAL = 0.85
STAGES = 2


@dataclass(frozen=True)
class Settings:
    preset: str = "small"
    height_px: int = 128
    width_px: int = 128
    chunk_frames: int = 3
    steps: tuple[int, ...] = (1000, 750, 500, 250)
    window_frames: int = 12
    sink_frames: int = 3
    dtype: str = "bfloat16"  # one run's dtype; main() runs each of --dtypes
    lanes: tuple[int, ...] = (1, 2, 3)
    warmup_chunks: int = 3  # per lane
    measured_chunks: int = 12  # per lane
    rounds: int = 3
    seed: int = 0
    pinned_run: bool = True  # also 2 lanes with stage i pinned to CPU i
    stream_batch: bool = True  # also ONE stream in stream-batch mode: 1 process vs 2 stages
    quick: bool = False

    def quick_version(self) -> Settings:
        return dataclasses.replace(self, lanes=(1, 2), warmup_chunks=2, measured_chunks=4, rounds=1, quick=True)


def machine_info() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    return {
        "cpu_model": found.group(1).strip() if found else platform.processor(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def set_priority(nice: int) -> str:
    """Run this process and its stages at `nice`: the process's own niceness, and (Linux with autogroup scheduling)
    its session's autogroup, since niceness alone only ranks processes inside one session. Background work of
    other sessions that runs at a low priority on purpose then yields to the benchmark, as it means to. The
    autogroup outlives this process, so main() puts it back (restore_autogroup)."""
    global _AUTOGROUP_BEFORE
    done = []
    autogroup = Path("/proc/self/autogroup")
    if autogroup.exists():
        found = re.search(r"nice (-?\d+)", autogroup.read_text())
        _AUTOGROUP_BEFORE = int(found.group(1)) if found else None
    try:
        os.nice(nice)
        done.append(f"process nice {nice}")
    except OSError as error:
        done.append(f"process nice unchanged ({error.strerror})")
    if autogroup.exists():
        try:
            autogroup.write_text(str(nice))
            done.append(f"autogroup nice {nice}")
        except OSError as error:
            done.append(f"autogroup nice unchanged ({error.strerror})")
    return ", ".join(done)


_AUTOGROUP_BEFORE: int | None = None


def restore_autogroup() -> None:
    if _AUTOGROUP_BEFORE is not None:
        try:
            Path("/proc/self/autogroup").write_text(str(_AUTOGROUP_BEFORE))
        except OSError:
            pass


def engine_config(settings: Settings, stream_batch: bool = False) -> EngineConfig:
    return EngineConfig(
        latent_height=settings.height_px // 8, latent_width=settings.width_px // 8, chunk_frames=settings.chunk_frames,
        denoising_steps=settings.steps, window_frames=settings.window_frames, sink_frames=settings.sink_frames,
        seed=settings.seed, stream_batch=stream_batch,
    )


def prompts(model: RandomDiT, lanes: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(1, model.config.text_len, model.config.text_dim, generator=generator) for _ in range(lanes)]


def run_single(model: RandomDiT, settings: Settings, threads: int = 1, stream_batch: bool = False) -> dict:
    """The baseline: one process, one torch thread (threads=2: the other way to use both cores, for reference;
    stream_batch: the stream-batch sampler in one process, the baseline of its pipeline)."""
    torch.set_num_threads(threads)
    engine = StreamEngine(model(), engine_config(settings, stream_batch), prompts(model, 1)[0])
    stream = engine.chunks()
    chunks = [next(stream).latents for _ in range(settings.warmup_chunks)]  # kept for the bit-exactness check
    seconds = []
    with ForeignLoad(live_children=True) as load:
        start = time.perf_counter()
        for _ in tqdm(range(settings.measured_chunks), desc="single process", leave=False):
            chunk = next(stream)
            chunks.append(chunk.latents)
            seconds.append(chunk.seconds)
        wall = time.perf_counter() - start
    torch.set_num_threads(1)
    return {
        "condition": ("single" if threads == 1 else f"single, {threads} threads") + (", stream batch" if stream_batch else ""),
        "lanes": 1,
        "chunks": settings.measured_chunks, "wall_s": wall,
        "chunks_per_s": settings.measured_chunks / wall, "chunk_median_ms": 1000 * statistics.median(seconds),
        "foreign_cpu_percent": round(load.percent, 1), "_latents": chunks,
    }


def _independent(model: RandomDiT, settings: Settings, barrier, results) -> None:
    """One of two independent single-process streams run at the same time (see run_ceiling)."""
    torch.set_num_threads(1)
    engine = StreamEngine(model(), engine_config(settings), prompts(model, 1)[0])
    stream = engine.chunks()
    for _ in range(settings.warmup_chunks):
        next(stream)
    barrier.wait()
    start = time.perf_counter()
    for _ in range(settings.measured_chunks):
        next(stream)
    results.put(settings.measured_chunks / (time.perf_counter() - start))


def run_ceiling(model: RandomDiT, settings: Settings) -> dict:
    """The most 2 processes get out of this machine: two independent streams (1 thread each) at once, no
    communication at all. Two busy cores share caches, memory bandwidth and clock (and other people's load), so this
    is the ceiling any 2-process scheme can reach here, below 2x."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_independent, args=(model, settings, barrier, results)) for _ in range(2)]
    with ForeignLoad(live_children=True) as load:
        for process in processes:
            process.start()
        rates = [results.get(timeout=600) for _ in processes]
        for process in processes:
            process.join()
    return {
        "condition": "2 independent processes", "lanes": 2, "chunks": 2 * settings.measured_chunks,
        "chunks_per_s": sum(rates), "per_process_chunks_per_s": rates, "foreign_cpu_percent": round(load.percent, 1),
    }


def run_pipeline(model: RandomDiT, settings: Settings, lanes: int, pin: bool = False, stream_batch: bool = False) -> dict:
    pipeline = PipelineConfig(stages=STAGES, threads_per_stage=1, balance=True, stage_timeout_s=120, pin_stages=pin)
    started = time.perf_counter()
    with PipelineEngine(model, engine_config(settings, stream_batch), prompts(model, lanes), pipeline) as engine:
        startup = time.perf_counter() - started
        stream = engine.chunks()
        lane0 = [item.chunk.latents for item in itertools.islice(stream, settings.warmup_chunks * lanes) if item.lane == 0]
        processes = [psutil.Process()] + [psutil.Process(p.pid) for p in engine.executor.processes]
        with ForeignLoad(live_children=True) as load:
            busy_start = engine.stage_busy_seconds
            cpu_start = [sum(process.cpu_times()[:2]) for process in processes]
            start = time.perf_counter()
            for item in tqdm(itertools.islice(stream, settings.measured_chunks * lanes), total=settings.measured_chunks * lanes,
                             desc=f"pipeline, {lanes} lane(s)", leave=False):
                if item.lane == 0:
                    lane0.append(item.chunk.latents)
            wall = time.perf_counter() - start
            busy = [end - begin for begin, end in zip(busy_start, engine.stage_busy_seconds)]
            cpu = [sum(process.cpu_times()[:2]) - begin for process, begin in zip(processes, cpu_start)]
        costs = engine.layer_costs
        split = [(r.start, r.stop) for r in engine.split]
        migrations = list(engine.migrations)
        stage_ms = [1000 * s for s in costs.stage_seconds(engine.split)] if costs else None
        assert not engine.rebuilds, engine.rebuilds
    count = settings.measured_chunks * lanes
    return {
        "condition": f"pipeline x{lanes}" + (" pinned" if pin else "") + (", stream batch" if stream_batch else ""), "lanes": lanes, "chunks": count, "wall_s": wall, "chunks_per_s": count / wall,
        "startup_s": startup, "split": split, "layer_moves_while_running": migrations, "stage_call_ms_measured": stage_ms,
        "stage_utilisation": [round(b / wall, 3) for b in busy],
        "stage_cpu_share": [round(c / wall, 3) for c in cpu[1:]], "orchestrator_cpu_share": round(cpu[0] / wall, 3),
        "layer_costs_ms": {"embed": 1000 * costs.embed, "blocks": [1000 * b for b in costs.blocks], "head": 1000 * costs.head} if costs else None,
        "foreign_cpu_percent": round(load.percent, 1), "_latents": lane0,
    }


def run_fault(model: RandomDiT, settings: Settings, on_fault: str, spares: int = 0) -> dict:
    """Kill stage 1 (SIGKILL) in the middle of a 2-lane stream; how long until the stream goes on, and are the
    chunk numbers of each lane still 0, 1, 2, ... without a gap or a repeat?"""
    pipeline = PipelineConfig(stages=STAGES, threads_per_stage=1, stage_timeout_s=120, on_fault=on_fault, spares=spares)
    with PipelineEngine(model, engine_config(settings), prompts(model, 2), pipeline) as engine:
        stream = engine.chunks()
        seen = [(item.lane, item.chunk.index, time.monotonic()) for item in itertools.islice(stream, 2 * settings.warmup_chunks)]
        victim = engine.executor.processes[1]
        killed: list[float] = []
        timer = threading.Timer(0.05, lambda: (killed.append(time.monotonic()), os.kill(victim.pid, signal.SIGKILL)))
        timer.start()  # 50 ms into the next chunk
        seen += [(item.lane, item.chunk.index, time.monotonic()) for item in itertools.islice(stream, 8)]
        rebuild = engine.rebuilds[0]
        after = [t for _, _, t in seen if t > rebuild.resumed_at]
        gaps = [b - a for a, b in zip([killed[0]] + after, after)]
        in_order = all([i for lane, i, _ in seen if lane == l] == list(range(sum(1 for s in seen if s[0] == l))) for l in (0, 1))
        return {
            "on_fault": on_fault + (f", {spares} warm spare(s)" if spares else ""), "detected_after_s": round(rebuild.detected_at - killed[0], 3),
            "rebuild_s": round(rebuild.resumed_at - rebuild.detected_at, 3),
            "first_chunk_after_kill_s": round(after[0] - killed[0], 3), "largest_gap_after_s": round(max(gaps), 3),
            "chunk_numbers_in_order": in_order, "rebuilt_as": rebuild.executor,
        }


def summarise(runs: list[dict], settings: Settings) -> list[dict]:
    conditions = ["single", "single, 2 threads", "2 independent processes"] + [f"pipeline x{lanes}" for lanes in settings.lanes]
    conditions += ["pipeline x2 pinned"] if settings.pinned_run else []
    conditions += ["single, stream batch", "pipeline x1, stream batch"] if settings.stream_batch else []
    rows = []
    base = statistics.median(r["chunks_per_s"] for r in runs if r["condition"] == "single")
    bases = {"": base}
    if settings.stream_batch:
        bases[", stream batch"] = statistics.median(r["chunks_per_s"] for r in runs if r["condition"] == "single, stream batch")
    ceiling = statistics.median(r["chunks_per_s"] for r in runs if r["condition"] == "2 independent processes") / base
    for condition in conditions:
        mine = [r for r in runs if r["condition"] == condition]
        throughput = statistics.median(r["chunks_per_s"] for r in mine)
        speedup = throughput / base
        same = throughput / bases[", stream batch" if condition.endswith("stream batch") else ""]  # vs its own sampler
        rows.append({
            "condition": condition, "lanes": mine[0]["lanes"], "chunks_per_s": round(throughput, 3),
            "latent_fps": round(throughput * settings.chunk_frames, 2), "speedup": round(speedup, 3),
            "speedup_same_sampler": round(same, 3),
            "efficiency_vs_2x": round(same / STAGES, 3) if condition not in ("single", "single, stream batch") else None,
            "of_ceiling": round(same / ceiling, 3) if condition.startswith("pipeline") else None,
            "per_round_chunks_per_s": [round(r["chunks_per_s"], 3) for r in mine],
            "stage_utilisation": [r.get("stage_utilisation") for r in mine] if condition.startswith("pipeline") else None,
            "stage_cpu_share": [r.get("stage_cpu_share") for r in mine] if condition.startswith("pipeline") else None,
            "orchestrator_cpu_share": [r.get("orchestrator_cpu_share") for r in mine] if condition.startswith("pipeline") else None,
            "foreign_cpu_percent": [r["foreign_cpu_percent"] for r in mine],
        })
    return rows


def write_plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4.6))
    names = [row["condition"] for row in next(iter(results.values()))]
    width = 0.8 / len(results)
    colors = ["#3a7", "#37a", "#a73"]
    for index, (dtype, rows) in enumerate(results.items()):
        xs = [position + (index - (len(results) - 1) / 2) * width for position in range(len(names))]
        axis.bar(xs, [row["speedup_same_sampler"] for row in rows], width, color=colors[index % len(colors)], label=dtype)
        for x, row in zip(xs, rows):
            axis.text(x, row["speedup_same_sampler"] + 0.03, f"{row['speedup_same_sampler']:.2f}", ha="center", fontsize=8)
    axis.set_xticks(range(len(names)), [name.replace(", ", "\n").replace("independent ", "independent\n")
                                         .replace("pipeline ", "pipeline\n") for name in names], fontsize=8)
    axis.axhline(STAGES, color="#c33", linestyle="--", label=f"{STAGES}x (2 stages, ideal)")
    axis.axhline(STAGES * EFFICIENCY_GOAL, color="#e90", linestyle=":", label=f"goal: {EFFICIENCY_GOAL:.0%} of {STAGES}x")
    axis.set_ylabel("throughput / 1 process, same sampler, 1 thread")
    axis.set_title("Pipeline-parallel DiT on 2 CPU cores (2 stages, 1 thread each)")
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def header(settings: Settings, info: dict, command: str) -> list[str]:
    return [
        "# FrameCast pipeline-parallel benchmark (CPU)", "",
        f"- date: {info['date']}",
        f"- command: `{command}`",
        f"- machine: {info['cpu_model']}, {info['cpu_count']} cores, {info['memory_gib']} GiB, {info['platform']}, "
        f"python {info['python']}, torch {info['torch']}, commit {info['commit']}",
        f"- load average at start / end: {info['load_avg_start']} / {info.get('load_avg_end')}; priority: {info['niceness']}",
        f"- model: preset `{settings.preset}` ({parameter_count(preset(settings.preset)) / 1e6:.1f}M params, random "
        f"weights); stream {settings.height_px}x{settings.width_px} px (latent {settings.height_px // 8}x"
        f"{settings.width_px // 8}), chunks of {settings.chunk_frames} latent frames, steps {list(settings.steps)}, rolling "
        f"KV cache {settings.window_frames} frames with {settings.sink_frames} sinks",
        f"- baseline: `StreamEngine`, 1 process, 1 torch thread; pipeline: {STAGES} stage processes (gloo over "
        "loopback), 1 torch thread each, orchestrator (sampler, noise, controls) in this process",
        f"- {settings.warmup_chunks} warm-up + {settings.measured_chunks} measured chunks per lane; {settings.rounds} "
        "interleaved round(s), median round reported", "",
    ]


def section(dtype: str, rows: list[dict], runs: list[dict], exact: dict) -> list[str]:
    pipeline_runs = [r for r in runs if r["condition"].startswith("pipeline")]
    first = pipeline_runs[0]
    lines = [
        f"## {dtype}", "",
        f"- split {first['split']} (layers [start, stop) per stage), balanced from measured per-layer times (stage call "
        f"{['%.1f ms' % t for t in first['stage_call_ms_measured']]}); layers moved while running, per run: "
        f"{[r['layer_moves_while_running'] for r in pipeline_runs]}",
        f"- bit-exact (`torch.equal`) lane 0 of the pipeline vs the single-process engine: {exact}", "",
        "| condition | lanes | chunks/s | latent FPS | speedup vs single | speedup vs 1 process, same sampler "
        "| efficiency vs 2x | of the 2-process ceiling "
        "| per round (chunks/s) | stage utilisation per round | stage CPU share per round | foreign CPU (%) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        efficiency = "" if row["efficiency_vs_2x"] is None else f"{100 * row['efficiency_vs_2x']:.1f}%"
        of_ceiling = "" if row["of_ceiling"] is None else f"{100 * row['of_ceiling']:.1f}%"
        lines.append(
            f"| {row['condition']} | {row['lanes']} | {row['chunks_per_s']:.3f} | {row['latent_fps']:.2f} | "
            f"{row['speedup']:.3f} | {row['speedup_same_sampler']:.3f} | {efficiency} | {of_ceiling} | "
            f"{row['per_round_chunks_per_s']} | "
            f"{row['stage_utilisation'] or ''} | {row['stage_cpu_share'] or ''} | {row['foreign_cpu_percent']} |"
        )
    return lines + [""]


def fault_section(faults: list[dict]) -> list[str]:
    lines = [
        "Stage 1 killed (SIGKILL) 50 ms into a chunk of a 2-lane stream:", "",
        "| rebuild | detected after (s) | rebuild (s) | first new chunk after the kill (s) | largest gap after (s) "
        "| chunk numbers in order | rebuilt as |",
        "|---|---|---|---|---|---|---|",
    ]
    for fault in faults:
        lines.append(
            f"| {fault['on_fault']} | {fault['detected_after_s']} | {fault['rebuild_s']} | {fault['first_chunk_after_kill_s']} | "
            f"{fault['largest_gap_after_s']} | {fault['chunk_numbers_in_order']} | {fault['rebuilt_as']} |"
        )
    return lines + [""]


def quality_of_stream_batch(frames: int) -> dict:
    """The shipped world model's student at 4 steps, chunk sampler vs stream batch, on the evaluation's script."""
    from framecast.stream.worldmodel.evaluate import stream_batch_quality

    started = time.perf_counter()
    rows = stream_batch_quality(frames=frames)
    return {"frames": frames, "seconds": round(time.perf_counter() - started, 1),
            "rows": {name: dataclasses.asdict(metrics) for name, metrics in rows.items()}}


def quality_section(quality: dict) -> list[str]:
    lines = [
        "## What stream batch costs in quality (the shipped world model)", "",
        f"The student at 4 steps streams the evaluation's script ({quality['frames']} frames, prompt switches every 60 "
        "frames, random held keys) with each sampler, read back with the world's pixel readers (`framecast eval world`'s "
        "metrics). Stream batch gets each chunk's controls as far ahead as its control lag, so both are scored on the "
        "same frames.", "",
        "| sampler | prompt adherence (%) | action following (%) | agent found (%) | agent shape right (%) "
        "| switch visible after (frames, mean) | agent jump at a switch (px, mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in quality["rows"].items():
        lines.append(f"| {name.removeprefix('student 4 steps, ')} | {row['prompt_adherence']:.1f} | "
                     f"{row['action_following']:.1f} | {row['agent_found']:.1f} | "
                     f"{row['slot_adherence'].get('agent_shape', float('nan')):.1f} | {row['switch_frames_to_visible_mean']:.1f} | "
                     f"{row['switch_agent_jump_px_mean']:.1f} |")
    return lines + [""]


FOOTER = [
    f"Goal: >= {EFFICIENCY_GOAL:.0%} of {STAGES}x with 2 lanes, and with ONE stream in stream-batch mode (its steps "
    "of successive chunks in flight at once; compared with the same sampler in one process, whose chunks it equals "
    "bit for bit). Speedup = throughput (chunks/s, all lanes) / the single process's (1 thread). 'single, 2 threads' is the other way to use both cores for one stream (intra-op "
    "threads), for reference. The 2-process ceiling is two independent single-process streams run at once (no "
    "communication): what two busy cores of this machine deliver together. Stage utilisation = a stage's compute seconds (reported in every packet) / the window's wall "
    "time: what is missing from 100 % is waiting for the other stage, the orchestrator (sampler, noise) and the "
    "transport. Stage CPU share = CPU seconds the stage process got / wall time: below its utilisation, the stage "
    "was inside its compute but off the CPU (another process had the core). Foreign CPU = CPU time other processes on this shared machine used during the window, in % of all "
    "cores.", "",
]


def run_dtype(settings: Settings) -> tuple[list[dict], list[dict], dict]:
    model = RandomDiT(preset(settings.preset), DTYPES[settings.dtype], seed=settings.seed)
    runs, exact = [], {}
    for round_index in range(settings.rounds):
        single = run_single(model, settings)
        runs += [single, run_single(model, settings, threads=2), run_ceiling(model, settings)]
        conditions = [(lanes, False, False) for lanes in settings.lanes] + ([(2, True, False)] if settings.pinned_run else [])
        if settings.stream_batch:
            single_batch = run_single(model, settings, stream_batch=True)
            runs.append(single_batch)
            conditions.append((1, False, True))
        for lanes, pin, batch in conditions:
            run = run_pipeline(model, settings, lanes, pin, stream_batch=batch)
            reference = single_batch if batch else single
            same = all(torch.equal(a, b) for a, b in zip(run["_latents"], reference["_latents"]))
            key = run["condition"].removeprefix("pipeline ")
            exact[key] = exact.get(key, True) and same
            runs.append(run)
            print(f"{settings.dtype} round {round_index}: {run['condition']} {run['chunks_per_s']:.3f} chunks/s vs single "
                  f"{reference['chunks_per_s']:.3f} (foreign CPU {run['foreign_cpu_percent']}%)", flush=True)
    clean = [{k: v for k, v in run.items() if not k.startswith("_")} for run in runs]
    faults = [run_fault(model, settings, policy, spares) for policy, spares in
              (("local", 0), ("fewer-stages", 0), ("fewer-stages", 1))]
    return summarise(runs, settings), clean, exact, faults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run; writes *-quick.* files")
    parser.add_argument("--preset", default=Settings.preset)
    parser.add_argument("--size", type=int, default=Settings.height_px, help="frame height and width in px")
    parser.add_argument("--dtypes", default="bfloat16,float32", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--lanes", default=",".join(map(str, Settings.lanes)), help="comma-separated lane counts")
    parser.add_argument("--rounds", type=int, default=Settings.rounds)
    parser.add_argument("--chunks", type=int, default=Settings.measured_chunks, help="measured chunks per lane")
    parser.add_argument("--nice", type=int, default=-10, help="niceness for this process and its stages (where allowed)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    if unknown := [d for d in dtypes if d not in DTYPES]:
        parser.error(f"unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}")
    settings = Settings(preset=args.preset, height_px=args.size, width_px=args.size, rounds=args.rounds,
                        measured_chunks=args.chunks, lanes=tuple(int(n) for n in args.lanes.split(",")))
    if args.quick:
        settings = settings.quick_version()
    info = {"niceness": set_priority(args.nice)}
    torch.set_num_threads(1)
    info |= machine_info()
    results, lines = {}, []
    command = "python benchmarks/pipeline.py " + " ".join(sys.argv[1:])
    for dtype in dtypes:
        rows, runs, exact, faults = run_dtype(dataclasses.replace(settings, dtype=dtype))
        results[dtype] = {"summary": rows, "runs": runs, "bit_exact": exact, "faults": faults}
        lines += section(dtype, rows, runs, exact) + fault_section(faults)
    quality = None
    if settings.stream_batch:
        quality = quality_of_stream_batch(300 if settings.quick else 900)
        lines += quality_section(quality)
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    suffix = "-quick" if settings.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    settings_json = dataclasses.asdict(settings) | {"dtypes": dtypes}
    settings_json.pop("dtype")
    (args.out / f"pipeline-cpu{suffix}.json").write_text(json.dumps(
        {"machine": info, "settings": settings_json, "results": results, "stream_batch_quality_world_model": quality},
        indent=2))
    text = "\n".join(header(settings, info, command.strip()) + lines + FOOTER)
    (args.out / f"pipeline-cpu{suffix}.md").write_text(text)
    write_plot({dtype: result["summary"] for dtype, result in results.items()}, args.out / f"pipeline-cpu{suffix}.png")
    print(text)


if __name__ == "__main__":
    try:
        main()
    finally:
        restore_autogroup()
