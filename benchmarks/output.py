"""The live output stage under load: does serving viewers slow the producer, and does a slow viewer hurt the others?

    python benchmarks/output.py                       # ~3 minutes: three phases of 25 s, results/output-cpu.*
    python benchmarks/output.py --seconds 10 --ws-viewers 5 --out /tmp/quick   # smoke run

Setup. The server is `framecast serve` in a child process: the child parses the very arguments of `framecast serve
--port N --token T --fps 30 --output-scale 4 --latency-budget 0.5` with the CLI's own parser and builds the session
with the CLI's own code (default model: the `tiny` preset, random weights, 128x128 px, enlarged 4x to 512x512 before
every sink), and only swaps the final `run_server` for one that adds a read-only `/bench` route and records every
chunk the producer observes. The viewers run in this (parent) process, so the server's CPU time is its own: viewer
CPU is counted separately (psutil) and both are reported. Both processes share the machine's 2 cores, as a server
and its local viewers would; the child's torch pool gets `--threads` (default 1, see realtime-cpu.md: with 2 torch
threads and 2 busy processes on 2 cores OpenMP's threads wait on each other).

Phases (each measured for --seconds after --settle seconds):
  a. baseline: the session streaming with no viewer;
  b. 1 WebRTC viewer (stream.whep_client.WhepPlayer, when present) + --ws-viewers websocket viewers (JPEG);
  c. the same plus one deliberately slow websocket viewer that reads one message per second.

Measured:
  - producer cost per generated chunk: denoise + decode wall seconds of each chunk (the stage seconds the producer
    hands to the deadline scheduler), its CPU seconds (thread time of the generation thread), steps, deadline misses,
    frames per second delivered to the sink (StreamMetrics frames_at_sink over the window), degradations;
    slowdown = mean cost per full-step chunk in the phase / the same in the baseline (goal <= 1.05);
  - per-viewer received frames per second over the window (websocket viewers read the 22-byte header and keep the
    JPEG bytes undecoded; the WebRTC viewer decodes, as aiortc must);
  - latency. Every frame carries its index; its deadline on the session's media clock is
    start_s + index / fps + latency_budget_s (start_s comes from /bench). The session's pacing thread publishes
    each frame to every sink at that deadline (at once when late). Delivery latency = time.monotonic() at receipt in
    the viewer process - the frame's deadline: what the output stage (encode, fan-out, sockets, the client's own
    receive loop) adds after the frame is due on screen. Glass-to-glass from media time = receipt - (start_s +
    index / fps) = delivery latency + the latency budget (generation happens inside the budget). Both processes read
    CLOCK_MONOTONIC of the same machine (time.monotonic), so the difference needs no clock sync;
  - slow-viewer isolation: each fast viewer's fps in phase c / its fps in phase b (goal: unchanged, >= 0.95).

Results: results/output-cpu.json (everything, with latency samples), results/output-cpu.md and output-cpu.png (fps
per viewer per phase, latency CDFs). The machine is named in both (CPU model, cores, torch, commit).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = "bench-token"
FRAME_HEADER = struct.Struct("<BBHHIQI")  # stream/sinks/websocket.py: version, format, w, h, index, pts, dropped
SLOWDOWN_GOAL = 1.05
ISOLATION_GOAL = 0.95


# ---------------------------------------------------------------------------------------------------------------
# the server child: `framecast serve` with a /bench route
# ---------------------------------------------------------------------------------------------------------------
def server_child(serve_argv: list[str]) -> int:
    """Run `framecast serve <serve_argv>` with the CLI's own code; record chunks; serve /bench beside it."""
    import threading

    import psutil
    from aiohttp import web

    import framecast.stream.server as server_module
    from framecast.stream import cli

    def run_server(session, host="127.0.0.1", port=8000, **options) -> None:
        chunks: list[dict] = []
        lock = threading.Lock()
        scheduler = session.scheduler
        observe = scheduler.observe
        last_cpu = [None]

        def observed(decision, stages=None, *args, **kwargs):
            records = observe(decision, stages, *args, **kwargs)
            cpu = time.thread_time()  # the generation thread's CPU seconds: observe runs on it
            cpu_delta = None if last_cpu[0] is None else cpu - last_cpu[0]
            last_cpu[0] = cpu
            with lock:
                chunks.append({
                    "t": time.monotonic(), "action": decision.action.value, "steps": len(decision.steps),
                    "stages": dict(stages or {}), "frames": len(records),
                    "missed": sum(record.is_missed for record in records), "thread_cpu_s": cpu_delta,
                })
            return records

        scheduler.observe = observed
        process = psutil.Process()

        async def bench(request: web.Request) -> web.Response:
            since = int(request.query.get("since", "0"))
            with lock:
                rows = chunks[since:]
            cpu = process.cpu_times()
            body = {
                "now": time.monotonic(), "start_s": scheduler.clock.start_s, "fps": str(scheduler.config.fps),
                "latency_budget_s": scheduler.clock.latency_budget_s, "chunks": rows, "next": since + len(rows),
                "metrics": session.metrics.to_json(), "viewers": session.frames.viewers,
                "viewer_frames_dropped": session.frames.dropped_total, "cpu_s": cpu.user + cpu.system,
                "torch_threads": __import__("torch").get_num_threads(), "pid": os.getpid(),
            }
            return web.json_response(body)

        app = server_module.create_app(session, **options)
        app.router.add_get("/bench", bench)
        print(f"bench-server: listening on {host}:{port}", flush=True)
        web.run_app(app, host=host, port=port, print=None)

    server_module.run_server = run_server
    zero_rtp_timestamp_origin()
    return cli.main(serve_argv)


def zero_rtp_timestamp_origin() -> None:
    """Benchmark instrumentation (server child only): aiortc starts each sender's RTP timestamps at a random origin;
    zeroing that origin makes a received frame's RTP timestamp its media pts (mod 2**32), so the viewer can tell
    which media frame it decoded and measure its latency. SSRCs stay random."""
    import aiortc.rtcrtpsender as sender

    random32 = sender.random32

    def origin_or_random(*args, **kwargs):
        return 0 if sys._getframe(1).f_code.co_name == "_run_rtp" else random32(*args, **kwargs)

    sender.random32 = origin_or_random


# ---------------------------------------------------------------------------------------------------------------
# the viewers (this process)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Viewer:
    name: str
    kind: str  # "websocket", "webrtc", "slow websocket"
    received: list[tuple[float, int]] = field(default_factory=list)  # (monotonic receipt, frame index)
    dropped: int = 0  # frames the server skipped for it (from the header)
    error: str | None = None


async def websocket_viewer(http, url: str, viewer: Viewer, stop: asyncio.Event, read_every_s: float = 0.0) -> None:
    import aiohttp

    try:
        async with http.ws_connect(url, max_msg_size=0, heartbeat=None) as ws:
            while not stop.is_set():
                if read_every_s:
                    await asyncio.sleep(read_every_s)
                message = await ws.receive()
                now = time.monotonic()
                if message.type is aiohttp.WSMsgType.BINARY:
                    _, _, _, _, index, _, dropped = FRAME_HEADER.unpack_from(message.data)
                    viewer.received.append((now, index))
                    viewer.dropped = dropped
                elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    viewer.error = f"connection ended: {message.type.name}"
                    return
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # recorded, reported: one viewer's failure must not end the benchmark
        viewer.error = f"{type(exc).__name__}: {exc}"


def webrtc_available() -> bool:
    try:
        from framecast.stream.whep_client import WhepPlayer  # noqa: F401
    except ImportError:
        return False
    return True


async def webrtc_viewer(base_url: str, viewer: Viewer, stop: asyncio.Event, ticks_per_frame: int) -> None:
    """One WHEP viewer. Its frames' RTP timestamps are the media pts (the server child zeroes aiortc's random RTP
    timestamp origin, see zero_rtp_timestamp_origin, and this process keeps the receiver from rebasing them), so each
    decoded frame's media index is pts / ticks_per_frame."""
    import aiortc.rtcrtpreceiver

    from framecast.stream.whep_client import WhepPlayer

    # benchmark instrumentation (this process only): aiortc's receiver rebases RTP timestamps to the first one it
    # sees; keep them as sent, so that (with the server child's zero origin) a frame's pts is its media pts
    aiortc.rtcrtpreceiver.TimestampMapper.map = lambda self, timestamp: timestamp
    try:
        async with WhepPlayer(base_url) as player:
            seen = 0
            while not stop.is_set():
                await asyncio.sleep(0.05)
                count = min(len(player.receive_times), len(player.pts))
                for at_s, pts in zip(player.receive_times[seen:count], player.pts[seen:count]):
                    index = pts // ticks_per_frame if pts % ticks_per_frame == 0 else -1  # -1: no latency sample
                    viewer.received.append((at_s, index))
                seen = count
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        viewer.error = f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def machine(threads: int) -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "server_torch_threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, all processes)."""
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def quantiles(values: list[float], qs=(0.5, 0.95, 0.99)) -> dict[str, float | None]:
    if not values:
        return {f"p{round(100 * q)}": None for q in qs}
    ordered = sorted(values)
    out = {}
    for q in qs:
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        out[f"p{round(100 * q)}"] = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
    return out


def cost_stats(chunks: list[dict], full_steps: int) -> dict:
    """Producer cost of the full-step generated chunks among `chunks`."""
    full = [c for c in chunks if c["action"] == "generate" and c["steps"] == full_steps]
    cost = [c["stages"].get("denoise", 0.0) + c["stages"].get("decode", 0.0) for c in full]
    cpu = [c["thread_cpu_s"] for c in full if c["thread_cpu_s"] is not None]
    return {
        "generated_chunks": sum(c["action"] == "generate" for c in chunks), "full_step_chunks": len(full),
        "cost_s": {"mean": statistics.fmean(cost) if cost else None, **quantiles(cost)},
        "denoise_s_mean": statistics.fmean(c["stages"]["denoise"] for c in full) if full else None,
        "decode_s_mean": statistics.fmean(c["stages"]["decode"] for c in full) if full else None,
        "thread_cpu_s_mean": statistics.fmean(cpu) if cpu else None,
    }


def producer_summary(chunks: list[dict], before: dict, after: dict, seconds: float, full_steps: int) -> dict:
    frames = after["metrics"]["frames_at_sink"] - before["metrics"]["frames_at_sink"]
    deadline_frames = sum(c["frames"] for c in chunks)
    missed = sum(c["missed"] for c in chunks)
    degradations = {kind: after["metrics"]["degradations"][kind] - before["metrics"]["degradations"][kind]
                    for kind in after["metrics"]["degradations"]}
    return {
        "chunks": len(chunks), **cost_stats(chunks, full_steps),
        "sink_fps": frames / seconds, "deadline_frames": deadline_frames, "deadline_missed": missed,
        "miss_rate": missed / deadline_frames if deadline_frames else 0.0, "degradations": degradations,
        "server_cpu_s": after["cpu_s"] - before["cpu_s"],
        "server_cpu_cores": (after["cpu_s"] - before["cpu_s"]) / seconds,
        "viewer_frames_dropped": after["viewer_frames_dropped"] - before["viewer_frames_dropped"],
        "viewers": after["viewers"],
    }


def viewer_summary(viewer: Viewer, window: tuple[float, float], start_s: float, fps: float, budget: float) -> dict:
    t0, t1 = window
    inside = [(t, i) for t, i in viewer.received if t0 <= t < t1]
    delivery = [t - (start_s + i / fps + budget) for t, i in inside if i >= 0]
    return {
        "name": viewer.name, "kind": viewer.kind, "frames": len(inside), "fps": len(inside) / (t1 - t0),
        "delivery_latency_s": quantiles(delivery), "glass_to_glass_s": quantiles([d + budget for d in delivery]),
        "skipped_by_server": viewer.dropped, "error": viewer.error, "latency_samples": len(delivery),
        "_delivery": delivery,
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.chunks: list[dict] = []
        self.next_chunk = 0

    async def poll(self, http) -> dict:
        async with http.get(f"{self.base}/bench", params={"since": str(self.next_chunk)}) as response:
            state = await response.json()
        self.chunks += state["chunks"]
        self.next_chunk = state["next"]
        return state

    async def wait_ready(self, http, server: subprocess.Popen) -> dict:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with {server.returncode}")
            try:
                state = await self.poll(http)
                if state["metrics"]["frames_at_sink"] > 0:
                    return state
            except OSError:
                pass
            except Exception as exc:  # aiohttp.ClientError: not up yet
                if "Connect" not in type(exc).__name__:
                    raise
            if time.monotonic() > deadline:
                raise SystemExit("the server did not stream within 120 s")
            await asyncio.sleep(0.5)

    async def measure(self, http, name: str, progress) -> dict:
        """One window of --seconds (after --settle): server state before/after and the chunks in between, and the
        CPU time of the server, of this (viewer) process and of everything else on the machine ("foreign")."""
        import psutil

        await self.tick(progress, self.args.settle, f"{name}: settle")
        before = await self.poll(http)
        me = psutil.Process()
        cpu0, machine0 = sum(me.cpu_times()[:2]), busy_seconds()
        first_chunk = len(self.chunks)
        t0 = time.monotonic()
        await self.tick(progress, self.args.seconds, f"{name}: measure")
        t1 = time.monotonic()
        after = await self.poll(http)
        cpu1, machine1 = sum(me.cpu_times()[:2]), busy_seconds()
        chunks = [c for c in self.chunks[first_chunk:] if t0 <= c["t"] < t1]
        summary = producer_summary(chunks, before, after, t1 - t0, self.full_steps)
        summary["viewer_process_cpu_cores"] = (cpu1 - cpu0) / (t1 - t0)
        summary["machine_cpu_cores"] = (machine1 - machine0) / (t1 - t0)
        summary["foreign_cpu_cores"] = max(0.0, summary["machine_cpu_cores"] - summary["server_cpu_cores"]
                                           - summary["viewer_process_cpu_cores"])
        summary["window"] = (t0, t1)
        summary["_chunks"] = chunks
        return summary

    async def tick(self, progress, seconds: float, label: str) -> None:
        progress.set_description(label)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(1.0, left))
            progress.update(min(1.0, left) if left < 1.0 else 1.0)

    async def run(self) -> dict:
        import aiohttp
        from tqdm import tqdm

        args = self.args
        serve_argv = ["serve", "--port", str(self.port), "--token", TOKEN, "--fps", str(args.fps),
                      "--output-scale", str(args.output_scale), "--latency-budget", str(args.budget),
                      *args.serve_arg]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        server = subprocess.Popen([sys.executable, __file__, "--server-child", *serve_argv], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.serve_command = "framecast " + " ".join(serve_argv)
        stop = asyncio.Event()
        tasks: list[asyncio.Task] = []
        phases: dict[str, dict] = {}
        viewers: dict[str, list[Viewer]] = {}
        use_webrtc = args.webrtc and webrtc_available()
        total = 4 * (args.settle + args.seconds)
        try:
            async with aiohttp.ClientSession() as http:
                state = await self.wait_ready(http, server)
                self.start_s, self.budget = state["start_s"], state["latency_budget_s"]
                from fractions import Fraction

                self.fps = float(Fraction(state["fps"]))
                from framecast.stream.cli import STREAM_DEFAULTS

                steps = [c["steps"] for c in self.chunks if c["action"] == "generate"]
                self.full_steps = max(steps + [len(STREAM_DEFAULTS["denoising_steps"])])
                self.torch_threads = state["torch_threads"]
                with tqdm(total=total, unit="s", bar_format="{desc:28} {bar} {n:.0f}/{total:.0f} s") as progress:
                    phases["a1"] = await self.measure(http, "a1: no viewers", progress)
                    fast: list[Viewer] = []
                    if use_webrtc:
                        viewer = Viewer("webrtc", "webrtc")
                        fast.append(viewer)
                        tasks.append(asyncio.create_task(webrtc_viewer(self.base, viewer, stop,
                                                                       round(90_000 / self.fps))))
                    url = f"ws://127.0.0.1:{self.port}/ws?format=jpeg"
                    for n in range(args.ws_viewers):
                        viewer = Viewer(f"ws{n + 1}", "websocket")
                        fast.append(viewer)
                        tasks.append(asyncio.create_task(websocket_viewer(http, url, viewer, stop)))
                    phases["b"] = await self.measure(http, "b: viewers", progress)
                    slow = Viewer("slow", "slow websocket")
                    tasks.append(asyncio.create_task(websocket_viewer(http, url, slow, stop, read_every_s=1.0)))
                    phases["c"] = await self.measure(http, "c: + slow viewer", progress)
                    viewers = {"b": fast, "c": fast + [slow]}
                    stop.set()
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    phases["a2"] = await self.measure(http, "a2: no viewers again", progress)
        finally:
            server.terminate()
            try:
                server_output = server.communicate(timeout=20)[0]
            except subprocess.TimeoutExpired:
                server.kill()
                server_output = server.communicate()[0]
        for key in ("b", "c"):
            phases[key]["viewers"] = [viewer_summary(v, phases[key]["window"], self.start_s, self.fps, self.budget)
                                      for v in viewers[key]]
        return {"phases": phases, "webrtc": use_webrtc, "server_output_tail": server_output[-2000:]}


def results(run: dict, args: argparse.Namespace, bench: Bench) -> dict:
    phases = run["phases"]
    baseline = cost_stats(phases["a1"]["_chunks"] + phases["a2"]["_chunks"], bench.full_steps)
    base_cost = baseline["cost_s"]["mean"]

    def ratio(x, y):
        return None if x is None or not y else x / y

    for key in ("b", "c"):
        phases[key]["slowdown"] = ratio(phases[key]["cost_s"]["mean"], base_cost)
        phases[key]["slowdown_p50"] = ratio(phases[key]["cost_s"]["p50"], baseline["cost_s"]["p50"])
        phases[key]["cpu_per_chunk_ratio"] = ratio(phases[key]["thread_cpu_s_mean"], baseline["thread_cpu_s_mean"])
    fps_b = {v["name"]: v["fps"] for v in phases["b"]["viewers"]}
    isolation = {v["name"]: ratio(v["fps"], fps_b[v["name"]]) for v in phases["c"]["viewers"] if v["name"] in fps_b}
    phases["c"]["isolation"] = isolation
    for key in ("b", "c"):
        for kind in ("websocket", "webrtc", "slow websocket"):
            samples = [d for v in phases[key]["viewers"] if v["kind"] == kind for d in v["_delivery"]]
            phases[key].setdefault("latency_by_kind", {})[kind] = {
                "delivery_latency_s": quantiles(samples), "glass_to_glass_s": quantiles([s + bench.budget for s in samples]),
                "samples": len(samples)}
    return {
        "machine": machine(bench.torch_threads),
        "settings": {"serve": bench.serve_command, "fps": bench.fps, "output_px": 128 * args.output_scale,
                     "latency_budget_s": bench.budget, "seconds": args.seconds, "settle_s": args.settle,
                     "ws_viewers": args.ws_viewers, "webrtc_viewer": run["webrtc"], "full_steps": bench.full_steps},
        "goals": {"slowdown_max": SLOWDOWN_GOAL, "isolation_min": ISOLATION_GOAL},
        "baseline": baseline,  # a1 and a2 pooled: the reference of every slowdown ratio
        "phases": phases,
    }


def fmt(x, scale=1.0, digits=1, suffix=""):
    return "n/a" if x is None else f"{scale * x:.{digits}f}{suffix}"


def report(data: dict) -> str:
    m, s, p = data["machine"], data["settings"], data["phases"]
    lines = [
        "# Live output under load (CPU)", "",
        f"- machine: {m['cpu']}, {m['cores']} cores, server torch threads {m['server_torch_threads']}, "
        f"torch {m['torch']}, Python {m['python']}, commit {m['commit']}, {m['date']}",
        f"- server: `{s['serve']}` in a child process (the CLI's own parser and session builder; a /bench route "
        "added); viewers in the parent process",
        f"- stream: tiny preset (random weights) at 128x128 px, enlarged to {s['output_px']}x{s['output_px']}, "
        f"{s['fps']:g} fps, latency budget {s['latency_budget_s']} s; each phase {s['settle_s']:g} s settle + "
        f"{s['seconds']:g} s measured",
        f"- viewers: phase b: {'1 WebRTC (WhepPlayer) + ' if s['webrtc_viewer'] else ''}{s['ws_viewers']} "
        "websocket (JPEG); phase c: the same + 1 slow websocket viewer reading one message per second"
        + ("" if s["webrtc_viewer"] else "; no WebRTC viewer (stream.whep_client was not available)"), "",
        "## Producer", "",
        "| phase | full-step / generated chunks | cost / chunk mean (ms) | p50 | p95 | denoise | decode | gen-thread "
        "CPU / chunk (ms) | slowdown (mean) | slowdown (p50) | sink fps | misses | degradations | server CPU "
        "(cores) | viewer process CPU (cores) | foreign CPU (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"a1": "a1: no viewers", "b": "b: viewers", "c": "c: + slow viewer", "a2": "a2: no viewers again"}

    def cost_cells(ph: dict) -> str:
        return (f"{ph['full_step_chunks']}/{ph['generated_chunks']} | {fmt(ph['cost_s']['mean'], 1000)} | "
                f"{fmt(ph['cost_s']['p50'], 1000)} | {fmt(ph['cost_s']['p95'], 1000)} | "
                f"{fmt(ph['denoise_s_mean'], 1000)} | {fmt(ph['decode_s_mean'], 1000)} | "
                f"{fmt(ph['thread_cpu_s_mean'], 1000)}")

    for key in ("a1", "b", "c", "a2"):
        ph = p[key]
        degradations = ", ".join(f"{k} {v}" for k, v in ph["degradations"].items() if v) or "none"
        lines.append(
            f"| {names[key]} | {cost_cells(ph)} | {fmt(ph.get('slowdown'), 1, 3)} | {fmt(ph.get('slowdown_p50'), 1, 3)} | "
            f"{ph['sink_fps']:.1f} | {ph['deadline_missed']}/{ph['deadline_frames']} | {degradations} | "
            f"{ph['server_cpu_cores']:.2f} | {ph['viewer_process_cpu_cores']:.2f} | {ph['foreign_cpu_cores']:.2f} |")
    lines.append(f"| baseline: a1 + a2 pooled | {cost_cells(data['baseline'])} | 1 | 1 | | | | | | |")
    lines += ["", "Cost is taken over full-step chunks only (a degraded chunk cannot make a phase look cheaper). "
              "Foreign CPU: what other processes on the machine used meanwhile (the machine is shared).", "",
              "## Viewers", "",
              "| phase | viewers | count | fps min | fps mean | fps max | fps c / b min | fps c / b max | "
              "skipped by server (max) | errors |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key in ("b", "c"):
        for kind in ("webrtc", "websocket", "slow websocket"):
            group = [v for v in p[key]["viewers"] if v["kind"] == kind]
            if not group:
                continue
            fps = [v["fps"] for v in group]
            iso = [p["c"]["isolation"].get(v["name"]) for v in group] if key == "c" else []
            iso = [r for r in iso if r is not None]
            errors = "; ".join(sorted({v["error"] for v in group if v["error"]})) or "none"
            lines.append(
                f"| {key} | {kind} | {len(group)} | {min(fps):.1f} | {statistics.fmean(fps):.1f} | {max(fps):.1f} | "
                f"{fmt(min(iso) if iso else None, 1, 3)} | {fmt(max(iso) if iso else None, 1, 3)} | "
                f"{max(v['skipped_by_server'] for v in group)} | {errors} |")
    lines += ["", "| phase | viewers | delivery p50 (ms) | p95 | p99 | glass-to-glass p50 (ms) | p95 | samples |",
              "|---|---|---|---|---|---|---|---|"]
    for key in ("b", "c"):
        for kind, lat in p[key]["latency_by_kind"].items():
            if lat["samples"]:
                d, g = lat["delivery_latency_s"], lat["glass_to_glass_s"]
                lines.append(f"| {key} | {kind} | {fmt(d['p50'], 1000)} | {fmt(d['p95'], 1000)} | {fmt(d['p99'], 1000)} | "
                             f"{fmt(g['p50'], 1000)} | {fmt(g['p95'], 1000)} | {lat['samples']} |")
    fast_iso = [r for name, r in p["c"]["isolation"].items() if r is not None]
    worst_iso = min(fast_iso) if fast_iso else None
    slow_b, slow_c = p["b"].get("slowdown"), p["c"].get("slowdown")
    lines += [
        "", "## Goals", "",
        f"- producer slowdown with viewers (mean cost per chunk vs. baseline) <= {SLOWDOWN_GOAL}: phase b "
        f"{fmt(slow_b, 1, 3)} ({'met' if slow_b is not None and slow_b <= SLOWDOWN_GOAL else 'MISSED'}), phase c "
        f"{fmt(slow_c, 1, 3)} ({'met' if slow_c is not None and slow_c <= SLOWDOWN_GOAL else 'MISSED'})",
        f"- a slow viewer does not change the others' fps (fps c / b >= {ISOLATION_GOAL} for every fast viewer): worst "
        f"{fmt(worst_iso, 1, 3)} ({'met' if worst_iso is not None and worst_iso >= ISOLATION_GOAL else 'MISSED'})",
        "", "Definitions: cost / chunk = denoise + decode wall seconds the producer reports to the deadline scheduler "
        "for a full-step chunk; gen-thread CPU = CPU seconds of the generation thread between two chunk observations. "
        "Delivery latency = receipt (time.monotonic in the viewer process) - the frame's deadline on the session clock "
        "(start_s + index / fps + budget), which is when the pacing thread publishes it to every sink; glass-to-glass "
        "= receipt - the frame's media time (start_s + index / fps) = delivery + budget. Websocket viewers do not "
        "decode the JPEG; the WebRTC viewer decodes (aiortc).",
    ]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = data["phases"]
    figure, (fps_axes, cdf_axes) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = [v["name"] for v in p["c"]["viewers"]]
    fps_b = {v["name"]: v["fps"] for v in p["b"]["viewers"]}
    fps_c = {v["name"]: v["fps"] for v in p["c"]["viewers"]}
    xs = range(len(names))
    fps_axes.bar([x - 0.2 for x in xs], [fps_b.get(n, 0) for n in names], 0.4, label="b: viewers")
    fps_axes.bar([x + 0.2 for x in xs], [fps_c.get(n, 0) for n in names], 0.4, label="c: + slow viewer")
    fps_axes.axhline(data["settings"]["fps"], color="k", lw=0.8, ls="--", label="stream fps")
    fps_axes.set_xticks(list(xs), names, rotation=90, fontsize=7)
    fps_axes.set_ylabel("received frames / s")
    fps_axes.set_title("per-viewer received fps")
    fps_axes.legend(fontsize=8)
    for key, style in (("b", "-"), ("c", "--")):
        for kind in ("websocket", "webrtc", "slow websocket"):
            samples = sorted(1000 * d for v in p[key]["viewers"] if v["kind"] == kind for d in v["_delivery"])
            if samples:
                ys = [(i + 1) / len(samples) for i in range(len(samples))]
                cdf_axes.plot(samples, ys, style, label=f"{key}: {kind}")
    cdf_axes.set_xscale("symlog", linthresh=10)
    cdf_axes.set_xlabel("delivery latency: receipt - frame deadline (ms); glass-to-glass = this + "
                        f"{1000 * data['settings']['latency_budget_s']:.0f} ms budget")
    cdf_axes.set_ylabel("fraction of frames")
    cdf_axes.set_title("latency CDF")
    cdf_axes.legend(fontsize=8)
    figure.suptitle(f"FrameCast live output, {data['machine']['cpu']}, {data['machine']['cores']} cores")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--server-child":
        sys.exit(server_child(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=25.0, help="measured seconds per phase (default 25)")
    parser.add_argument("--settle", type=float, default=4.0, help="seconds before measuring each phase (default 4)")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--output-scale", type=int, default=4, help="128 px x this (default 4: 512x512)")
    parser.add_argument("--budget", type=float, default=0.5, help="latency budget in seconds (default 0.5)")
    parser.add_argument("--ws-viewers", type=int, default=20, help="websocket viewers in phases b and c (default 20)")
    parser.add_argument("--no-webrtc", dest="webrtc", action="store_false", help="leave out the WebRTC viewer")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `framecast serve` argument "
                        "(repeatable, e.g. --serve-arg=--dtype --serve-arg=float32)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--name", default="output-cpu", help="result file stem (default output-cpu)")
    args = parser.parse_args()
    bench = Bench(args)
    run = asyncio.run(bench.run())
    data = results(run, args, bench)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(data, args.out / f"{args.name}.png")
    for key in ("b", "c"):
        for v in data["phases"][key]["viewers"]:
            samples = v.pop("_delivery")
            step = max(1, len(samples) // 200)
            v["delivery_latency_samples_s"] = [round(x, 5) for x in samples[::step]]
        data["phases"][key]["window"] = None
    for phase in data["phases"].values():
        phase["window"] = None
        phase.pop("_chunks", None)
    data["server_output_tail"] = run["server_output_tail"]
    (args.out / f"{args.name}.json").write_text(json.dumps(data, indent=2))
    text = report(data)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
