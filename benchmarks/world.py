"""Benchmark of the embedded world model end to end: frames per second, time to first frame, memory over time.

    python benchmarks/world.py            # full run (about 8 minutes on a 2-core CPU)
    python benchmarks/world.py --quick    # smoke run; writes world-cpu-quick.* result files

What it measures (the shipped weights, or --weights DIR; 2 threads unless --threads; the compute dtype every command
uses by default, `default_dtype`: bfloat16 where the CPU multiplies it natively, float32 elsewhere):

1. Throughput per step list (the default 3 steps, then 4, 2, 1, as every command streams them: unguided, the student
   being guidance-distilled; then the default 3 steps under the classifier-free guidance the student was distilled
   from, on every step and on the first step only: what streaming the guided student costs, the baseline of the
   guidance distillation's speed-up): `StreamEngine.next_chunk` (denoising steps + the clean context pass, controls, history)
   plus `WorldDecoder.decode` (streaming decoder and the conversion to uint8 RGB), chunk by chunk
   with a changing action each chunk, as a live stream runs. Video frames per second from the median chunk time
   (robust to other load on a shared machine) and the mean. Goal: >= 30 frames/s at 128x128.
   Baseline in the same run: the bare DiT called `steps + 1` times per chunk on same-shaped inputs against its own
   rolling cache (no sampler, noise, history, decoder, guidance), interleaved with the end-to-end chunks. The ratio
   end-to-end / bare says what guidance, the engine and the decoder add on top of the model's own compute.
2. Time to first frame: from a new stream (engine and decoder built on the loaded model) to the first decoded
   uint8 frame. Cold: the first stream after loading the model in a fresh process (oneDNN picks kernels then),
   model loading reported apart; warm: a second stream. Goal: <= 0.5 s.
3. Memory: one default stream (3 steps) of 10,000 frames; process RSS every 50 chunks; growth from frame 1,000 to 10,000.

Results: a table on stdout, `results/world-cpu.json` (with a markdown table the model card embeds),
`results/world-cpu.md` and `results/world-cpu-rss.png`. Every section records the CPU time other processes took
meanwhile (`foreign CPU`): this machine is shared.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from machine_load import ForeignLoad

from framecast.kernels.compute_dtype import cpu_name, default_dtype
from framecast.models.memory import KVCache
from framecast.stream.worldmodel.bundle import WorldModel
from framecast.stream.worldmodel.recipe import (
    CHUNK_FRAMES, GUIDED_STUDENT_GUIDANCE, STREAM_STEPS, STUDENT_STEPS, WEIGHTS_DIR, WINDOW_FRAMES,
)

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_FPS, TARGET_TTFF_S = 30.0, 0.5


class BareDiT:
    """The model's own compute for one chunk: steps + 1 DiT calls, nothing else."""

    def __init__(self, model: WorldModel, steps: int) -> None:
        self.dit, self.calls = model.dit, steps + 1
        self.memory = KVCache(self.dit.config, batch=1, tokens_per_frame=64, window_frames=WINDOW_FRAMES, sink_frames=0,
                              dtype=self.dit.dtype)
        self.text = self.dit.encode_text(model.encode("a red circle on grass"))
        self.x = torch.randn(1, CHUNK_FRAMES, 16, 16, 16, dtype=self.dit.dtype)
        self.t = torch.full((1, CHUNK_FRAMES), 500.0)
        self.actions = torch.zeros(1, CHUNK_FRAMES, dtype=torch.long)

    @torch.inference_mode()
    def chunk(self) -> None:
        self.memory.begin_chunk(CHUNK_FRAMES)
        for _ in range(self.calls):
            self.dit(self.x, self.t, self.text, self.memory, self.actions)
        self.memory.commit()


def end_to_end_chunk(engine, decoder, index: int) -> None:
    engine.set_action(index % 5)
    decoder.decode(engine.next_chunk().latents)


def throughput(model: WorldModel, steps: tuple[int, ...], chunks: int, guidance: float | None = None,
               guided_steps: int | None = None) -> dict:
    engine, decoder = model.engine(steps=steps, guidance=guidance, guided_steps=guided_steps), model.decoder()
    bare = BareDiT(model, len(steps))
    for i in range(8):  # warm-up
        end_to_end_chunk(engine, decoder, i)
        bare.chunk()
    e2e, base = [], []
    with ForeignLoad() as load:
        for i in range(chunks):  # ABBA interleaving
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for which in order:
                start = time.perf_counter()
                end_to_end_chunk(engine, decoder, i) if which == 0 else bare.chunk()
                (e2e if which == 0 else base).append(time.perf_counter() - start)
    median, bare_median = statistics.median(e2e), statistics.median(base)
    return {
        "steps": len(steps), "guidance": engine.config.guidance, "guided_steps": engine.config.guided_steps,
        "chunks": chunks, "chunk_ms_median": median * 1e3,
        "chunk_ms_p90": statistics.quantiles(e2e, n=10)[-1] * 1e3, "chunk_ms_mean": statistics.mean(e2e) * 1e3,
        "fps_median": CHUNK_FRAMES / median, "fps_mean": CHUNK_FRAMES / statistics.mean(e2e),
        "bare_dit_ms_median": bare_median * 1e3, "ratio_vs_bare_dit": median / bare_median,
        "foreign_cpu_percent": load.percent,
    }


def first_frame(model: WorldModel) -> float:
    start = time.perf_counter()
    engine, decoder = model.engine(), model.decoder()
    end_to_end_chunk(engine, decoder, 0)
    return time.perf_counter() - start


def cold_start(weights: Path, threads: int) -> dict:
    """Load and first frame in a fresh process (nothing warmed up)."""
    code = (
        "import json, time, torch; torch.set_num_threads(%d); t0 = time.perf_counter();"
        "from framecast.stream.worldmodel.bundle import WorldModel; m = WorldModel.load(%r); t1 = time.perf_counter();"
        "e, d = m.engine(), m.decoder(); d.decode(e.next_chunk().latents); t2 = time.perf_counter();"
        "print(json.dumps({'load_s': t1 - t0, 'first_frame_s': t2 - t1}))" % (threads, str(weights))
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_over_time(model: WorldModel, frames: int) -> dict:
    engine, decoder = model.engine(), model.decoder()
    process = psutil.Process()
    samples = []
    chunks = -(-frames // CHUNK_FRAMES)  # whole chunks: 10,000 frames are 3,334 chunks
    with ForeignLoad() as load:
        for i in tqdm(range(chunks), desc="memory", unit="chunk"):
            end_to_end_chunk(engine, decoder, i)
            if i % 50 == 0 or i == chunks - 1:
                samples.append(((i + 1) * CHUNK_FRAMES, process.memory_info().rss))
    start_frame, start = next((frame, rss) for frame, rss in samples if frame >= min(1000, frames // 10))
    return {"frames": chunks * CHUNK_FRAMES, "rss_samples": samples, "rss_start_mb": start / 2**20,
            "rss_start_frame": start_frame,
            "rss_end_mb": samples[-1][1] / 2**20, "growth_percent": (samples[-1][1] - start) / start * 100,
            "cache_nbytes": engine.memory.nbytes, "foreign_cpu_percent": load.percent}


def plot_rss(samples: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3))
    axes.plot([f for f, _ in samples], [r / 2**20 for _, r in samples])
    axes.set_xlabel("video frame")
    axes.set_ylabel("process RSS (MiB)")
    axes.set_title("world model, default stream: memory over one stream")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def markdown(results: dict) -> str:
    rows = ["| steps | guidance | chunk ms (median / p90) | frames/s (median / mean) | bare DiT ms | end-to-end / bare | "
            "foreign CPU |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["throughput"]:
        guided = r.get("guidance", 1.0)
        guidance = f"{guided:g}" + (f" (first {r['guided_steps']})" if guided != 1 and r.get("guided_steps") else "")
        rows.append(f"| {r['steps']} | {guidance} | {r['chunk_ms_median']:.1f} / {r['chunk_ms_p90']:.1f} | "
                    f"**{r['fps_median']:.1f}** / {r['fps_mean']:.1f} | {r['bare_dit_ms_median']:.1f} | "
                    f"{r['ratio_vs_bare_dit']:.2f} | {r['foreign_cpu_percent']:.0f}% |")
    cold, warm = results["cold"], results["warm_first_frame_s"]
    rows += ["", f"Time to first frame: cold {cold['first_frame_s']:.3f} s (model load {cold['load_s']:.2f} s before "
             f"it, fresh process), warm {warm:.3f} s (goal <= {TARGET_TTFF_S} s).", ""]
    m = results.get("memory")
    if m:
        rows.append(f"Memory: one {m['frames']:,}-frame default stream: RSS {m['rss_start_mb']:.1f} MiB at frame "
                    f"{m['rss_start_frame']:,} -> {m['rss_end_mb']:.1f} MiB at the end ({m['growth_percent']:+.2f}%); KV cache "
                    f"{m['cache_nbytes'] / 2**20:.2f} MiB, fixed (foreign CPU {m['foreign_cpu_percent']:.0f}%).")
    rows += ["", f"Machine: {results['machine']}; {results['date']}."]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    chunks = 20 if args.quick else 120
    memory_frames = 600 if args.quick else 10_000
    results: dict = {"machine": f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} threads, "
                                f"torch {torch.__version__}, {str(default_dtype('cpu')).removeprefix('torch.')}",
                     "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    results["cold"] = cold_start(args.weights, args.threads)
    model = WorldModel.load(args.weights)
    results["warm_first_frame_s"] = min(first_frame(model) for _ in range(3))
    # the default stream (STREAM_STEPS, as every command streams it) first: the model card's speed row reads the first
    # entry; then the other step lists, and the default steps under the guidance the student was distilled from (what
    # streaming a guided student costs: the baseline of the guidance distillation), all of them, or the first only
    results["throughput"] = [throughput(model, steps, chunks) for steps in (STREAM_STEPS, *map(STUDENT_STEPS.get, (4, 2, 1)))]
    results["throughput"] += [throughput(model, STREAM_STEPS, chunks, guidance=GUIDED_STUDENT_GUIDANCE, guided_steps=n)
                              for n in (None, 1)]
    results["memory"] = memory_over_time(model, memory_frames)
    results["markdown"] = markdown(results)
    print(results["markdown"])
    RESULTS.mkdir(exist_ok=True)
    name = "world-cpu-quick" if args.quick else "world-cpu"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1))
    (RESULTS / f"{name}.md").write_text("# World model end to end (benchmarks/world.py)\n\n" + results["markdown"] + "\n")
    plot_rss(results["memory"]["rss_samples"], RESULTS / f"{name}-rss.png")


if __name__ == "__main__":
    main()
