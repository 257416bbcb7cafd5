"""Memory profiles measured: a Wan-size stream's device memory next to its estimate (stream/memory_profile.py).

On a CUDA machine, one command (random weights: memory and speed do not depend on their values; ~1-2 min a profile,
most of it initialising umT5's 5.7B random weights on the CPU once, ~12 GB of host memory):

    python benchmarks/memory.py                          # profiles 24gb, 24gb-vae, 12gb, full
    python benchmarks/memory.py --profile 24gb --chunks 30

Each profile is built as `framecast generate` builds it: the DiT (`RandomDiT`, the family's 1.3B preset) on the
device, the prompt encoded by umT5 (`PromptEncoder` with the profile's placement: an offloaded encoder visits the
device while it encodes), then the engine and the decoder (random Wan VAE or TAEHV, through the same decoder
interface as generate, uint8 frames to the CPU). It streams `--warmup` + `--chunks` chunks at the profile's
resolution, then switches the prompt mid-stream. Recorded per phase, with `torch.cuda.max_memory_allocated` /
`max_memory_reserved` reset at each phase's start:

- load: the weights on the device;
- first prompt: the encode before the stream starts (an offloaded umT5 next to the DiT and decoder weights);
- stream: every chunk (DiT calls + decode), and the memory held after it (allocated);
- prompt switch: a new prompt encoded mid-stream, next to the stream's caches, and the chunk after it;

each beside what the estimate's terms give for that phase (`phase_estimates`); and time to first frame (engine
construction + first chunk + its decode, synchronised) and video FPS over the measured chunks. The warm-up (8 chunks
of 3 latent frames) fills the 21-frame window first. Results: `results/memory-<gpu name>.{json,md}`.

On a machine without CUDA it checks the estimator instead: every term of `StreamSetup.estimate()` against real models
with random weights streamed on the CPU (`measure_stream`: weights and caches byte for byte, activations through
`TensorAccounting`), at small DiT presets with the tiny and the real decoder presets at a small resolution, and writes
the named profiles' estimate tables. Results: `results/memory-cpu.{json,md}`.

    python benchmarks/memory.py            # without CUDA: ~5 minutes on a busy 2-core CPU
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from framecast.models.config import preset
from framecast.models.taehv import TAEHV, TAEHVDecoder
from framecast.models.taehv import preset as taehv_preset
from framecast.models.umt5 import UMT5_PRESETS, Placement, PromptEncoder, UMT5Encoder, umt5_preset
from framecast.models.vae import VAE_PRESETS, WanVAE, WanVAEDecoder, vae_preset
from framecast.stream.engine import EngineConfig, StreamEngine
from framecast.stream.memory_profile import (
    GiB,
    PROFILE_DTYPES,
    MemoryEstimate,
    PROFILES,
    DecoderKind,
    MemoryProfile,
    StreamSetup,
    measure_stream,
    profile_by_name,
)
from framecast.stream.model_source import RandomDiT

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    cpu_model = platform.processor() or "unknown"
    try:
        cpu_model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).strip()
    except (OSError, AttributeError):
        pass
    info = {"cpu_model": cpu_model, "cpu_count": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / GiB, 1),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "code": code_version()}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info |= {"gpu": properties.name, "gpu_memory_gib": round(properties.total_memory / GiB, 2), "cuda": torch.version.cuda}
    return info


def code_version() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit.stdout.strip()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- GPU


def random_umt5() -> UMT5Encoder:
    """umT5-XXL with random bf16 weights on the CPU, allocated once in bf16 (no float32 copy of 23 GB)."""
    with torch.device("meta"):
        encoder = UMT5Encoder(UMT5_PRESETS["umt5-xxl"]).to(torch.bfloat16)
    encoder = encoder.to_empty(device="cpu")
    for parameter in tqdm(list(encoder.parameters()), desc="random umT5 weights", leave=False):
        torch.nn.init.normal_(parameter, std=0.02)
    return encoder.eval().requires_grad_(False)


def random_decoder(profile: MemoryProfile, dtype: torch.dtype, device: torch.device):
    torch.manual_seed(0)
    if profile.decoder is DecoderKind.WAN_VAE:
        return WanVAEDecoder(WanVAE(VAE_PRESETS["wan2.1"]).to(device, dtype).eval().requires_grad_(False))
    return TAEHVDecoder(TAEHV(taehv_preset("taew2_1")).to(device, dtype).eval().requires_grad_(False))


class Phase:
    """Peak allocated / reserved bytes over a block, counted from the block's start."""

    def __init__(self, name: str, results: dict) -> None:
        self.name, self.results = name, results

    def __enter__(self) -> Phase:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize()
        self.results[self.name] = {"max_allocated": torch.cuda.max_memory_allocated(),
                                   "max_reserved": torch.cuda.max_memory_reserved(),
                                   "allocated_after": torch.cuda.memory_allocated()}


def prompt_ids(encoder: PromptEncoder, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, encoder.config.vocab_size, (1, encoder.config.text_len), generator=generator)
    return ids, torch.ones_like(ids)


def run_profile(profile: MemoryProfile, umt5: UMT5Encoder | None, warmup: int, chunks: int, device: str = "cuda") -> dict:
    device, dtype = torch.device(device), PROFILE_DTYPES[profile.dtype]
    setup = profile.setup()
    phases: dict[str, dict] = {}
    with Phase("load", phases):
        dit = RandomDiT(setup.dit, dtype)(device)
        decoder = random_decoder(profile, dtype, device)
        encoder = None
        if profile.text_encoder is not None:
            encoder = PromptEncoder(umt5, device=device, placement=profile.text_encoder, cache_size=0)
    with Phase("first prompt", phases):
        if encoder is None:  # precomputed embeddings
            prompt = torch.randn(setup.dit.text_len, setup.dit.text_dim, device=device, dtype=dtype)
        else:
            prompt = encoder.encode_ids(*prompt_ids(encoder, seed=1))[0]
    video_frames, chunk_seconds = 0, []
    with Phase("stream", phases):
        start = time.perf_counter()
        engine = StreamEngine(dit, setup.engine, prompt)
        for index in tqdm(range(warmup + chunks), desc=f"{profile.name} stream", leave=False):
            chunk_start = time.perf_counter()
            frames = decoder.decode(engine.next_chunk().latents)  # uint8 on the CPU: synchronises
            if index == 0:
                ttff = time.perf_counter() - start
            if index >= warmup:
                chunk_seconds.append(time.perf_counter() - chunk_start)
                video_frames += frames.shape[1]
    with Phase("prompt switch", phases):
        if encoder is None:
            engine.set_prompt(torch.randn_like(prompt))
        else:
            engine.set_prompt(encoder.encode_ids(*prompt_ids(encoder, seed=2))[0])
        decoder.decode(engine.next_chunk().latents)
    estimate = profile.estimate()
    result = {
        "profile": profile.name, "settings": {"family": profile.family, "dtype": profile.dtype,
                                              "text_encoder": profile.text_encoder and profile.text_encoder.value,
                                              "decoder": profile.decoder.value, "height": profile.height,
                                              "width": profile.width, "window_frames": setup.engine.window_frames,
                                              "sink_frames": setup.engine.sink_frames,
                                              "steps": list(setup.engine.denoising_steps)},
        "phases": phases, "ttff_s": ttff, "video_fps": video_frames / sum(chunk_seconds),
        "chunk_ms_median": sorted(chunk_seconds)[len(chunk_seconds) // 2] * 1000, "chunks": chunks, "warmup": warmup,
        "estimate": {t.name: {"bytes": t.bytes, "held": t.held} for t in estimate.terms},
        "estimate_held": estimate.held_bytes, "estimate_peak": estimate.peak_bytes,
        "estimate_phases": phase_estimates(estimate),
        "measured_peak": max(p["max_allocated"] for p in phases.values()),
        "estimate_table": estimate.describe(None if profile.budget_gib is None else int(profile.budget_gib * GiB)),
    }
    del engine, dit, decoder, encoder, prompt
    if umt5 is not None:
        umt5.to("cpu")  # a resident profile left it on the device; the next profile starts without it
    gc.collect()
    torch.cuda.empty_cache()
    return result


def phase_estimates(estimate: MemoryEstimate) -> dict[str, int]:
    """What each measured phase should peak at by the estimate's terms (each phase starts with the memory held)."""
    terms = {t.name: t for t in estimate.terms}
    weights = sum(t.bytes for name, t in terms.items() if name.endswith("weights") and t.held)
    encode = max([t.bytes for name, t in terms.items() if name.startswith("prompt encode")], default=0)
    stream_calls = max(terms["DiT call activations"].bytes, terms["decode call activations"].bytes)
    return {"load": weights, "first prompt": weights + encode,
            "stream": estimate.held_bytes + stream_calls, "prompt switch": estimate.peak_bytes}


def gpu_markdown(results: list[dict], machine: dict, command: str, date: str) -> str:
    out = [f"# Memory profiles on {machine['gpu']} (measured)", "", f"- date: {date}", f"- command: `{command}`",
           "- random weights; every phase's peak counted from its start (`torch.cuda.reset_peak_memory_stats`)", "",
           "## Machine", "", *(f"- {k}: {v}" for k, v in machine.items()), "", "## Summary", ""]
    rows = [["profile", "peak allocated (GiB)", "estimated peak (GiB)", "measured / estimate", "peak reserved (GiB)",
             "held after stream (GiB)", "estimated held (GiB)", "TTFF (s)", "video FPS"]]
    for r in results:
        reserved = max(p["max_reserved"] for p in r["phases"].values())
        rows.append([r["profile"], f"{r['measured_peak'] / GiB:.2f}", f"{r['estimate_peak'] / GiB:.2f}",
                     f"{r['measured_peak'] / r['estimate_peak']:.3f}", f"{reserved / GiB:.2f}",
                     f"{r['phases']['stream']['allocated_after'] / GiB:.2f}", f"{r['estimate_held'] / GiB:.2f}",
                     f"{r['ttff_s']:.2f}", f"{r['video_fps']:.1f}"])
    out += [table(rows), ""]
    for r in results:
        phase_rows = [["phase", "max allocated (GiB)", "estimated (GiB)", "measured / estimate", "max reserved (GiB)",
                       "allocated after (GiB)"]]
        for name, p in r["phases"].items():
            estimated = r["estimate_phases"][name]
            phase_rows.append([name, f"{p['max_allocated'] / GiB:.3f}", f"{estimated / GiB:.3f}",
                               f"{p['max_allocated'] / estimated:.3f}", f"{p['max_reserved'] / GiB:.3f}",
                               f"{p['allocated_after'] / GiB:.3f}"])
        out += [f"## {r['profile']}", "", f"Settings: {r['settings']}; {r['warmup']} warm-up + {r['chunks']} measured "
                f"chunks, median chunk {r['chunk_ms_median']:.1f} ms.", "", table(phase_rows), "", "Estimate:", "",
                r["estimate_table"], ""]
    return "\n".join(out)


def run_gpu(names: list[str], warmup: int, chunks: int, out: Path, command: str, date: str) -> None:
    profiles = [profile_by_name(name) for name in names]
    umt5 = random_umt5() if any(p.text_encoder is not None for p in profiles) else None
    results = [run_profile(p, umt5, warmup, chunks) for p in tqdm(profiles, desc="profiles")]
    machine = machine_info()
    name = f"memory-{slug(machine['gpu'])}"
    report = gpu_markdown(results, machine, command, date)
    print(report)
    (out / f"{name}.json").write_text(json.dumps({"date": date, "command": command, "machine": machine,
                                                   "profiles": results}, indent=1))
    (out / f"{name}.md").write_text(report + "\n")
    print(f"wrote {out / name}.json and .md")


# ---------------------------------------------------------------------------------------------------- CPU


def cpu_setups() -> list[tuple[str, StreamSetup]]:
    """Small streams the CPU runs in seconds: presets tiny and small, both decoders (tiny and real sizes)."""
    latent_16x24 = EngineConfig(latent_height=16, latent_width=24, window_frames=9, sink_frames=3)
    latent_8x12 = EngineConfig(latent_height=8, latent_width=12, window_frames=6, sink_frames=1, batch=2)
    tiny_umt5 = umt5_preset("tiny")
    return [
        ("tiny DiT f32, tiny Wan VAE, umT5 resident, 128x192 px",
         StreamSetup(preset("tiny"), latent_16x24, torch.float32, vae_preset("tiny"), tiny_umt5, Placement.RESIDENT)),
        ("small DiT bf16, tiny TAEHV, umT5 offload, 128x192 px",
         StreamSetup(preset("small"), latent_16x24, torch.bfloat16, taehv_preset("tiny"), tiny_umt5, Placement.OFFLOAD)),
        ("small DiT bf16, wan2.1 VAE, batch 2, 64x96 px",
         StreamSetup(preset("small"), latent_8x12, torch.bfloat16, vae_preset("wan2.1"))),
        ("small DiT f32, taew2_1, batch 2, 64x96 px",
         StreamSetup(preset("small"), latent_8x12, torch.float32, taehv_preset("taew2_1"))),
    ]


def run_cpu(out: Path, command: str, date: str) -> None:
    checks = []
    for label, setup in tqdm(cpu_setups(), desc="estimate vs real"):
        started = time.perf_counter()
        estimate, measured = setup.estimate(), measure_stream(setup, chunks=3)
        checks.append({"setup": label, "seconds": round(time.perf_counter() - started, 1),
                       "terms": [{"name": t.name, "held": t.held, "estimate": t.bytes, "measured": measured[t.name]}
                                 for t in estimate.terms]})
    machine = machine_info()
    lines = ["# Memory estimate against real models (CPU)", "", f"- date: {date}", f"- command: `{command}`",
             f"- machine: {machine['cpu_model']}, {machine['cpu_count']} cores, {machine['memory_gib']} GiB, "
             f"torch {machine['torch']}, no GPU", "",
             "Every term of `StreamSetup.estimate()` against the same setup built from real modules with random weights "
             "after streaming 3 chunks (`measure_stream`): weights and caches are the real tensors' bytes; activations "
             "are the peak bytes of the tensors one more DiT call, decode and prompt encode allocate "
             "(`TensorAccounting`, a dispatch-level count: kernel workspaces are not in it). The GPU measurement of "
             "the named profiles is `python benchmarks/memory.py` on a CUDA machine.", ""]
    worst = 0.0
    for check in checks:
        rows = [["term", "when", "estimate (bytes)", "measured (bytes)", "difference"]]
        for term in check["terms"]:
            difference = term["estimate"] / term["measured"] - 1
            worst = max(worst, abs(difference))
            rows.append([term["name"], "held" if term["held"] else "per call", f"{term['estimate']:,}",
                         f"{term['measured']:,}", f"{difference:+.2%}"])
        lines += [f"## {check['setup']}", "", table(rows), ""]
    lines += [f"Largest difference over every term: {worst:.2%}.", "", "## Named profiles (estimated, not measured)", ""]
    for profile in PROFILES.values():
        lines += [f"{profile.note}.", "", profile.describe(), ""]
    report = "\n".join(lines)
    print(report)
    (out / "memory-cpu.json").write_text(json.dumps({"date": date, "command": command, "machine": machine,
                                                     "checks": checks, "largest_difference": worst}, indent=1))
    (out / "memory-cpu.md").write_text(report + "\n")
    print(f"wrote {out / 'memory-cpu'}.json and .md")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", action="append", choices=list(PROFILES),
                        help="a profile to measure on the GPU (repeatable; default: all)")
    parser.add_argument("--chunks", type=int, default=20, help="measured chunks per profile (default 20)")
    parser.add_argument("--warmup", type=int, default=8, help="chunks before measuring: the window fills (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU path (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if torch.cuda.is_available():
        run_gpu(args.profile or list(PROFILES), args.warmup, args.chunks, args.out, command, date)
    else:
        torch.set_num_threads(args.threads)
        run_cpu(args.out, command, date)


if __name__ == "__main__":
    main()
