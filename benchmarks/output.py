"""The live output stage under load: does serving viewers slow the producer, and does a slow viewer hurt the others?

    python benchmarks/output.py                       # ~2.5 minutes; writes results/output-cpu.{json,md,png}
    python benchmarks/output.py --cycles 1 --seconds 3 --ws-viewers 3 --out /tmp/quick   # smoke run (~30 s)

Setup. The server is `framecast serve` in a child process: the child parses the very arguments of `framecast serve
--port N --token T --fps 30 --output-scale 4 --latency-budget 0.5` with the CLI's own parser and builds the session
with the CLI's own code (default model: the `tiny` preset, random weights, 128x128 px, enlarged 4x to 512x512 before
every sink), and only swaps the final `run_server` for one that adds a read-only `/bench` route and records every
chunk the producer observes. The viewers run in this (parent) process, so the server's CPU time is its own: viewer
CPU is counted separately (psutil) and both are reported. Both processes share the machine's 2 cores, as a server
and its local viewers would; the child's torch pool gets `--threads` (default 1, see realtime-cpu.md: with 2 torch
threads and 2 busy processes on 2 cores OpenMP's threads wait on each other). Both processes run at --nice (default
-10 where allowed) so other processes on a shared machine disturb them less; what those used anyway is measured per
window ("foreign CPU") and reported.

Phases, interleaved in --cycles cycles of a -> b -> c, each window --settle s then --seconds s measured
(default 6 cycles of 2 + 4 s, so each condition is measured 24 s in all; interleaving spreads the load that other processes put
on this shared machine over all three conditions instead of letting it land on one):
  a. baseline: the session streaming with no viewer;
  b. 1 WebRTC viewer (stream.whep_client.WhepPlayer) + --ws-viewers websocket viewers (JPEG);
  c. the same plus one deliberately slow websocket viewer that reads one message per second; then all viewers leave.

Measured:
  - producer cost per generated chunk: denoise + decode wall seconds of each chunk (the stage seconds the producer
    hands to the deadline scheduler), its CPU seconds (thread time of the generation thread), steps, deadline misses,
    frames per second delivered to the sink (StreamMetrics frames_at_sink over the window), degradations;
    slowdown = mean cost per full-step chunk in the condition / the same in the baseline (goal <= 1.05), with a 95 %
    bootstrap interval over chunks; the same ratio of generation-thread CPU per chunk says whether the extra wall
    time is work or waiting (for a core or the GIL);
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
PIN = os.environ.get("FRAMECAST_BENCH_PIN") == "1"  # set in the server child by --pin
QUIET_FOREIGN_CORES = 0.25  # a window is "quiet" when other processes used less CPU than this meanwhile


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
        plan, observe = scheduler.plan, scheduler.observe
        started: list[tuple[float, float, float]] = []  # the generation thread at plan(): wall, CPU, run-queue wait

        pinned = []

        def planned(*args, **kwargs):  # the producer plans each chunk right before making it (no pipelining)
            if PIN and not pinned:  # the --pin experiment: the generation thread alone on core 0
                os.sched_setaffinity(0, {0})
                pinned.append(True)
            started[:] = [(time.monotonic(), *thread_schedstat())]
            return plan(*args, **kwargs)

        def observed(decision, stages=None, *args, **kwargs):
            records = observe(decision, stages, *args, **kwargs)
            wall, cpu, runq = time.monotonic(), *thread_schedstat()
            span = {}
            if started:  # plan -> observe of this chunk, on the generation thread: where its time went
                wall0, cpu0, runq0 = started[0]
                span = {"span_s": wall - wall0, "thread_cpu_s": cpu - cpu0, "runq_s": runq - runq0}
            with lock:
                chunks.append({
                    "t": wall, "action": decision.action.value, "steps": len(decision.steps),
                    "stages": dict(stages or {}), "frames": len(records),
                    "missed": sum(record.is_missed for record in records), **span,
                })
            return records

        scheduler.plan = planned
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
    if PIN:  # the --pin experiment: every thread of this process but the generation thread on core 1
        os.sched_setaffinity(0, {1})  # threads started from here on inherit it
    if os.environ.get("FRAMECAST_BENCH_SWITCH_INTERVAL"):  # the --switch-interval experiment
        sys.setswitchinterval(float(os.environ["FRAMECAST_BENCH_SWITCH_INTERVAL"]))
    return cli.main(serve_argv)


def thread_schedstat() -> tuple[float, float]:
    """The calling thread's CPU seconds and seconds spent runnable but waiting for a core (Linux schedstat)."""
    try:
        with open("/proc/thread-self/schedstat") as file:
            run_ns, wait_ns, _ = (int(x) for x in file.read().split())
        return run_ns / 1e9, wait_ns / 1e9
    except OSError:  # no schedstat: CPU time only
        return time.thread_time(), 0.0


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
    # (monotonic receipt, media frame index or -1, frames the server skipped for it so far: the frame header's count)
    received: list[tuple[float, int, int]] = field(default_factory=list)
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
                    viewer.received.append((now, index, dropped))
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
                    viewer.received.append((at_s, index, 0))
                seen = count
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        viewer.error = f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------------------------
def set_nice(niceness: int) -> int:
    """Run this process (and the threads it starts from now on) at `niceness` if allowed; returns the niceness in
    effect. A negative value shields the benchmark from other processes on a shared machine (needs root)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except (PermissionError, OSError):
        pass
    return os.getpriority(os.PRIO_PROCESS, 0)


def shield(niceness: int) -> int:
    """This benchmark's own scheduling group at `niceness`: a new session gets its own autogroup (with
    sched_autogroup, niceness only counts against processes of the same group), the group and this process are set to
    `niceness` where allowed; the server child, started later, inherits the group. Returns the niceness in effect."""
    if niceness < 0 and Path("/proc/self/autogroup").exists():
        try:
            os.setsid()
        except OSError:  # already a session leader
            pass
        try:
            Path("/proc/self/autogroup").write_text(str(niceness))
        except OSError:
            pass
    return set_nice(niceness)


def autogroup() -> str:
    try:
        return Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        return "n/a"


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
    cpu = [c["thread_cpu_s"] for c in full if "thread_cpu_s" in c]
    runq = [c["runq_s"] for c in full if "runq_s" in c]
    blocked = [c["span_s"] - c["thread_cpu_s"] - c["runq_s"] for c in full if "span_s" in c]
    return {
        "_costs": cost,
        "generated_chunks": sum(c["action"] == "generate" for c in chunks), "full_step_chunks": len(full),
        "cost_s": {"mean": statistics.fmean(cost) if cost else None, **quantiles(cost)},
        "denoise_s_mean": statistics.fmean(c["stages"]["denoise"] for c in full) if full else None,
        "decode_s_mean": statistics.fmean(c["stages"]["decode"] for c in full) if full else None,
        "thread_cpu_s_mean": statistics.fmean(cpu) if cpu else None,
        "runq_s_mean": statistics.fmean(runq) if runq else None,  # runnable, waiting for a core
        "blocked_s_mean": statistics.fmean(blocked) if blocked else None,  # neither running nor runnable: the GIL
    }


def window_summary(chunks: list[dict], before: dict, after: dict, seconds: float, full_steps: int) -> dict:
    """The producer over one measured window (server state `before` and `after` it, the chunks observed in it)."""
    return {
        "seconds": seconds, **cost_stats(chunks, full_steps),
        "sink_frames": after["metrics"]["frames_at_sink"] - before["metrics"]["frames_at_sink"],
        "deadline_frames": sum(c["frames"] for c in chunks), "deadline_missed": sum(c["missed"] for c in chunks),
        "degradations": {kind: after["metrics"]["degradations"][kind] - before["metrics"]["degradations"][kind]
                         for kind in after["metrics"]["degradations"]},
        "server_cpu_s": after["cpu_s"] - before["cpu_s"], "viewers": after["viewers"],
    }


def condition_summary(windows: list[dict], full_steps: int) -> dict:
    """One condition (a, b or c) over all its windows: chunks pooled, rates over the total measured time."""
    seconds = sum(w["seconds"] for w in windows)
    deadline_frames = sum(w["deadline_frames"] for w in windows)
    missed = sum(w["deadline_missed"] for w in windows)
    return {
        "windows": len(windows), "seconds": seconds,
        **cost_stats([c for w in windows for c in w["_chunks"]], full_steps),
        "sink_fps": sum(w["sink_frames"] for w in windows) / seconds,
        "deadline_frames": deadline_frames, "deadline_missed": missed,
        "miss_rate": missed / deadline_frames if deadline_frames else 0.0,
        "degradations": {kind: sum(w["degradations"][kind] for w in windows) for kind in windows[0]["degradations"]},
        "server_cpu_cores": sum(w["server_cpu_s"] for w in windows) / seconds,
        "viewer_process_cpu_cores": sum(w["viewer_cpu_s"] for w in windows) / seconds,
        "foreign_cpu_cores": sum(w["foreign_cpu_s"] for w in windows) / seconds,
        "per_window": [{"cycle": w["cycle"], "cost_s_mean": w["cost_s"]["mean"], "full_step_chunks": w["full_step_chunks"],
                        "thread_cpu_s_mean": w["thread_cpu_s_mean"],
                        "foreign_cpu_cores": w["foreign_cpu_s"] / w["seconds"],
                        "server_cpu_cores": w["server_cpu_s"] / w["seconds"]} for w in windows],
    }


def viewer_summary(name: str, kind: str, runs: list[tuple[Viewer, tuple[float, float]]], start_s: float, fps: float,
                   budget: float) -> dict:
    """One viewer (by name) over its windows in one condition: runs are (that cycle's Viewer, the window)."""
    frames, seconds, skipped, delivery, errors = 0, 0.0, 0, [], set()
    for viewer, (t0, t1) in runs:
        inside = [(t, i, d) for t, i, d in viewer.received if t0 <= t < t1]
        frames += len(inside)
        seconds += t1 - t0
        if inside:
            skipped += inside[-1][2] - inside[0][2]
        delivery += [t - (start_s + i / fps + budget) for t, i, _ in inside if i >= 0]
        if viewer.error:
            errors.add(viewer.error)
    return {
        "name": name, "kind": kind, "frames": frames, "fps": frames / seconds if seconds else 0.0,
        "delivery_latency_s": quantiles(delivery), "glass_to_glass_s": quantiles([d + budget for d in delivery]),
        "skipped_by_server": skipped, "error": "; ".join(sorted(errors)) or None, "latency_samples": len(delivery),
        "_delivery": delivery,
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.chunks: list[dict] = []
        self.next_chunk = 0
        self.windows: list[dict] = []
        self.viewer_runs: dict[str, list[tuple[Viewer, tuple[float, float]]]] = {"b": [], "c": []}

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
                raise SystemExit(f"the server exited with {server.returncode}: {server.stdout.read()[-2000:]}")
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

    async def measure(self, http, cycle: int, phase: str, progress) -> dict:
        """One window of --seconds (after --settle): server state before/after and the chunks in between, and the
        CPU time of the server, of this (viewer) process and of everything else on the machine ("foreign")."""
        import psutil

        await self.tick(progress, self.args.settle, f"cycle {cycle} {phase}: settle")
        before = await self.poll(http)
        me = psutil.Process()
        cpu0, machine0 = sum(me.cpu_times()[:2]), busy_seconds()
        first_chunk = len(self.chunks)
        t0 = time.monotonic()
        await self.tick(progress, self.args.seconds, f"cycle {cycle} {phase}: measure")
        t1 = time.monotonic()
        after = await self.poll(http)
        cpu1, machine1 = sum(me.cpu_times()[:2]), busy_seconds()
        chunks = [c for c in self.chunks[first_chunk:] if t0 <= c["t"] < t1]
        window = window_summary(chunks, before, after, t1 - t0, self.full_steps)
        window.update(cycle=cycle, phase=phase, window=(t0, t1), _chunks=chunks, viewer_cpu_s=cpu1 - cpu0,
                      machine_cpu_s=machine1 - machine0)
        window["foreign_cpu_s"] = max(0.0, window["machine_cpu_s"] - window["server_cpu_s"] - window["viewer_cpu_s"])
        self.windows.append(window)
        return window

    async def tick(self, progress, seconds: float, label: str) -> None:
        progress.set_description(label)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            step = min(1.0, left)
            await asyncio.sleep(step)
            progress.update(step)

    async def cycle(self, http, cycle: int, use_webrtc: bool, progress) -> None:
        """a (no viewers), b (the fast viewers), c (b + the slow viewer), then every viewer leaves."""
        args = self.args
        stop = asyncio.Event()
        tasks: list[asyncio.Task] = []
        await self.measure(http, cycle, "a", progress)
        fast: list[Viewer] = []
        if use_webrtc:
            viewer = Viewer("webrtc", "webrtc")
            fast.append(viewer)
            tasks.append(asyncio.create_task(webrtc_viewer(self.base, viewer, stop, round(90_000 / self.fps))))
        url = f"ws://127.0.0.1:{self.port}/ws?format=jpeg"
        for n in range(args.ws_viewers):
            viewer = Viewer(f"ws{n + 1}", "websocket")
            fast.append(viewer)
            tasks.append(asyncio.create_task(websocket_viewer(http, url, viewer, stop)))
        b = await self.measure(http, cycle, "b", progress)
        slow = Viewer("slow", "slow websocket")
        tasks.append(asyncio.create_task(websocket_viewer(http, url, slow, stop, read_every_s=1.0)))
        c = await self.measure(http, cycle, "c", progress)
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.viewer_runs["b"] += [(v, b["window"]) for v in fast]
        self.viewer_runs["c"] += [(v, c["window"]) for v in fast + [slow]]

    async def run(self) -> dict:
        import aiohttp
        from tqdm import tqdm

        args = self.args
        serve_argv = ["serve", "--port", str(self.port), "--token", TOKEN, "--fps", str(args.fps),
                      "--output-scale", str(args.output_scale), "--latency-budget", str(args.budget),
                      *args.serve_arg]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        if args.pin:
            env["FRAMECAST_BENCH_PIN"] = "1"
            os.sched_setaffinity(0, {1})  # the viewers too: core 0 is the generation thread's
        if args.switch_interval is not None:
            env["FRAMECAST_BENCH_SWITCH_INTERVAL"] = str(args.switch_interval)
        server = subprocess.Popen([sys.executable, __file__, "--server-child", *serve_argv], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  preexec_fn=lambda: set_nice(args.nice))
        self.serve_command = "framecast " + " ".join(serve_argv)
        self.use_webrtc = args.webrtc and webrtc_available()
        try:
            async with aiohttp.ClientSession() as http:
                state = await self.wait_ready(http, server)
                from fractions import Fraction

                from framecast.stream.cli import STREAM_DEFAULTS

                self.start_s, self.budget = state["start_s"], state["latency_budget_s"]
                self.fps = float(Fraction(state["fps"]))
                steps = [c["steps"] for c in self.chunks if c["action"] == "generate"]
                self.full_steps = max(steps + [len(STREAM_DEFAULTS["denoising_steps"])])
                self.torch_threads = state["torch_threads"]
                total = args.cycles * 3 * (args.settle + args.seconds)
                with tqdm(total=total, unit="s", bar_format="{desc:28} {bar} {n:.0f}/{total:.0f} s") as progress:
                    for cycle in range(1, args.cycles + 1):
                        await self.cycle(http, cycle, self.use_webrtc, progress)
                final = await self.poll(http)
                if abs(final["start_s"] - self.start_s) > 1e-9:
                    raise SystemExit("the session's clock was shifted (a pause?): latencies would be wrong")
        finally:
            server.terminate()
            try:
                self.server_output = server.communicate(timeout=20)[0]
            except subprocess.TimeoutExpired:
                server.kill()
                self.server_output = server.communicate()[0]
        return self.summarize()

    def summarize(self) -> dict:
        phases = {key: condition_summary([w for w in self.windows if w["phase"] == key], self.full_steps)
                  for key in ("a", "b", "c")}
        for key in ("b", "c"):
            names: dict[str, str] = {}
            for viewer, _ in self.viewer_runs[key]:
                names.setdefault(viewer.name, viewer.kind)
            phases[key]["viewers"] = [
                viewer_summary(name, kind, [(v, w) for v, w in self.viewer_runs[key] if v.name == name],
                               self.start_s, self.fps, self.budget)
                for name, kind in names.items()]
        return phases


def bootstrap_ratio(costs: list[float], base: list[float], rounds: int = 2000) -> list[float] | None:
    """95 % bootstrap interval of mean(costs) / mean(base), chunks resampled with replacement (seeded)."""
    import random

    if len(costs) < 2 or len(base) < 2:
        return None
    rng = random.Random(0)
    ratios = sorted(statistics.fmean(rng.choices(costs, k=len(costs))) / statistics.fmean(rng.choices(base, k=len(base)))
                    for _ in range(rounds))
    return [ratios[int(0.025 * rounds)], ratios[int(0.975 * rounds) - 1]]


def results(phases: dict, args: argparse.Namespace, bench: Bench) -> dict:
    def ratio(x, y):
        return None if x is None or not y else x / y

    base = phases["a"]
    for key in ("b", "c"):
        phases[key]["slowdown_ci95"] = bootstrap_ratio(phases[key]["_costs"], base["_costs"])
        phases[key]["slowdown"] = ratio(phases[key]["cost_s"]["mean"], base["cost_s"]["mean"])
        phases[key]["slowdown_p50"] = ratio(phases[key]["cost_s"]["p50"], base["cost_s"]["p50"])
        phases[key]["cpu_per_chunk_ratio"] = ratio(phases[key]["thread_cpu_s_mean"], base["thread_cpu_s_mean"])
    quiet = {"foreign_max_cores": QUIET_FOREIGN_CORES}
    for key in ("a", "b", "c"):
        windows = [w for w in bench.windows if w["phase"] == key and w["foreign_cpu_s"] / w["seconds"] < QUIET_FOREIGN_CORES]
        quiet[key] = {"windows": len(windows), **cost_stats([c for w in windows for c in w["_chunks"]], bench.full_steps)}
    for key in ("b", "c"):
        quiet[key]["slowdown"] = ratio(quiet[key]["cost_s"]["mean"], quiet["a"]["cost_s"]["mean"])
        quiet[key]["slowdown_ci95"] = bootstrap_ratio(quiet[key]["_costs"], quiet["a"]["_costs"])
    for key in ("a", "b", "c"):
        quiet[key].pop("_costs")
    fps_b = {v["name"]: v["fps"] for v in phases["b"]["viewers"]}
    phases["c"]["isolation"] = {v["name"]: ratio(v["fps"], fps_b[v["name"]])
                                for v in phases["c"]["viewers"] if v["name"] in fps_b}
    for key in ("b", "c"):
        phases[key]["latency_by_kind"] = {}
        for kind in ("websocket", "webrtc", "slow websocket"):
            samples = [d for v in phases[key]["viewers"] if v["kind"] == kind for d in v["_delivery"]]
            phases[key]["latency_by_kind"][kind] = {
                "delivery_latency_s": quantiles(samples),
                "glass_to_glass_s": quantiles([x + bench.budget for x in samples]), "samples": len(samples)}
    return {
        "machine": machine(bench.torch_threads),
        "settings": {"serve": bench.serve_command, "fps": bench.fps, "output_px": 128 * args.output_scale,
                     "latency_budget_s": bench.budget, "cycles": args.cycles, "seconds": args.seconds,
                     "settle_s": args.settle, "ws_viewers": args.ws_viewers, "webrtc_viewer": bench.use_webrtc,
                     "full_steps": bench.full_steps, "switch_interval_s": args.switch_interval, "nice": args.nice,
                     "pin": args.pin,
                     "autogroup": autogroup()},
        "goals": {"slowdown_max": SLOWDOWN_GOAL, "isolation_min": ISOLATION_GOAL},
        "phases": phases,
        "quiet": quiet,  # the slowdown over the windows in which other processes used little CPU
    }


def fmt(x, scale=1.0, digits=1, suffix=""):
    return "n/a" if x is None else f"{scale * x:.{digits}f}{suffix}"


def verdict(phase: dict) -> str:
    """met only when the whole 95 % interval is within the goal; MISSED when the estimate itself is past it."""
    value, interval = phase.get("slowdown"), phase.get("slowdown_ci95")
    if value is None:
        return "not measured"
    if value > SLOWDOWN_GOAL:
        return "MISSED"
    if interval is None or interval[1] > SLOWDOWN_GOAL:
        return "NOT SHOWN: the estimate is within the goal but the interval reaches past it"
    return "met"


def ci(phase: dict) -> str:
    interval = phase.get("slowdown_ci95")
    return "n/a" if interval is None else f"{interval[0]:.3f}-{interval[1]:.3f}"


def report(data: dict) -> str:
    m, s, p = data["machine"], data["settings"], data["phases"]
    lines = [
        "# Live output under load (CPU)", "",
        f"- machine: {m['cpu']}, {m['cores']} cores, server torch threads {m['server_torch_threads']}, "
        f"torch {m['torch']}, Python {m['python']}, commit {m['commit']}, {m['date']}",
        f"- server: `{s['serve']}` in a child process (the CLI's own parser and session builder; a /bench route "
        "added" + (f"; sys.setswitchinterval({s['switch_interval_s']}) in the server: an experiment"
                   if s.get("switch_interval_s") is not None else "")
        + ("; experiment --pin: generation thread alone on core 0, all other threads on core 1" if s.get("pin") else "")
        + "); viewers in the parent process",
        f"- both processes run at niceness {s['nice']} in their own scheduling autogroup ({s['autogroup']}); what "
        "other processes on this shared machine used anyway is measured per window as 'foreign CPU'",
        f"- stream: tiny preset (random weights) at 128x128 px, enlarged to {s['output_px']}x{s['output_px']}, "
        f"{s['fps']:g} fps, latency budget {s['latency_budget_s']} s",
        f"- phases, interleaved: {s['cycles']} cycles of a -> b -> c, each window {s['settle_s']:g} s settle + "
        f"{s['seconds']:g} s measured, so each condition is measured {s['cycles'] * s['seconds']:g} s in all "
        "(interleaving spreads the load of other processes on this shared machine over all three)",
        f"- viewers: b: {'1 WebRTC (WhepPlayer, VP8 decoded) + ' if s['webrtc_viewer'] else ''}{s['ws_viewers']} "
        "websocket (JPEG, header read, picture not decoded); c: the same + 1 slow websocket viewer reading one "
        "message per second; all viewers leave after c" + ("" if s["webrtc_viewer"] else
                                                            "; no WebRTC viewer (stream.whep_client not available)"),
        "",
        "## Producer", "",
        "| condition | full-step / generated chunks | cost / chunk mean (ms) | p50 | p95 | denoise | decode | "
        "gen-thread: running | waiting for a core | blocked (GIL) | slowdown (mean) | slowdown (p50) | sink fps | "
        "misses | degradations | server CPU (cores) | viewer process CPU (cores) | foreign CPU (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"a": "a: no viewers", "b": "b: viewers", "c": "c: + slow viewer"}
    for key in ("a", "b", "c"):
        ph = p[key]
        degradations = ", ".join(f"{k} {v}" for k, v in ph["degradations"].items() if v) or "none"
        lines.append(
            f"| {names[key]} | {ph['full_step_chunks']}/{ph['generated_chunks']} | {fmt(ph['cost_s']['mean'], 1000)} | "
            f"{fmt(ph['cost_s']['p50'], 1000)} | {fmt(ph['cost_s']['p95'], 1000)} | {fmt(ph['denoise_s_mean'], 1000)} | "
            f"{fmt(ph['decode_s_mean'], 1000)} | {fmt(ph['thread_cpu_s_mean'], 1000)} | "
            f"{fmt(ph['runq_s_mean'], 1000)} | {fmt(ph['blocked_s_mean'], 1000)} | "
            f"{fmt(ph.get('slowdown', 1.0), 1, 3)} | {fmt(ph.get('slowdown_p50', 1.0), 1, 3)} | {ph['sink_fps']:.1f} | "
            f"{ph['deadline_missed']}/{ph['deadline_frames']} | {degradations} | {ph['server_cpu_cores']:.2f} | "
            f"{ph['viewer_process_cpu_cores']:.2f} | {ph['foreign_cpu_cores']:.2f} |")
    lines += ["", "Per window: cost / chunk mean (ms), gen-thread CPU / chunk (ms), foreign CPU (cores):", "",
              "| cycle | " + " | ".join(f"{k}: cost | {k}: CPU | {k}: foreign" for k in ("a", "b", "c")) + " |",
              "|---|" + "---|---|---|" * 3]
    for cycle in range(1, s["cycles"] + 1):
        cells = []
        for key in ("a", "b", "c"):
            w = next((w for w in p[key]["per_window"] if w["cycle"] == cycle), None)
            cells += ["n/a"] * 3 if w is None else [fmt(w["cost_s_mean"], 1000), fmt(w["thread_cpu_s_mean"], 1000),
                                                    f"{w['foreign_cpu_cores']:.2f}"]
        lines.append(f"| {cycle} | " + " | ".join(cells) + " |")
    quiet = data["quiet"]
    if any(quiet[k]["windows"] for k in ("a", "b", "c")):
        lines += ["", f"Quiet windows only (foreign CPU < {quiet['foreign_max_cores']} cores): "
                  + ", ".join(f"{k}: {quiet[k]['windows']} windows, {quiet[k]['full_step_chunks']} chunks, cost "
                              f"{fmt(quiet[k]['cost_s']['mean'], 1000)} ms" for k in ("a", "b", "c"))
                  + f"; slowdown b {fmt(quiet['b'].get('slowdown'), 1, 3)} ({ci(quiet['b'])}), c "
                  f"{fmt(quiet['c'].get('slowdown'), 1, 3)} ({ci(quiet['c'])})."]
    else:
        lines += ["", f"No window was quiet (foreign CPU < {quiet['foreign_max_cores']} cores throughout)."]
    lines += ["", "Cost is taken over full-step chunks only (a degraded chunk cannot make a phase look cheaper). "
              "Foreign CPU: what other processes on the machine used meanwhile (the machine is shared).", "",
              "## Viewers", "",
              "| phase | viewers | count | fps min | fps mean | fps max | fps c / b min | fps c / b max | "
              "skipped by server (most for one viewer) | errors |",
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
    lines += [
        "", "## Goals", "",
        f"- producer slowdown with viewers (mean cost per chunk vs. baseline) <= {SLOWDOWN_GOAL}: "
        + ", ".join(f"{key} {fmt(p[key].get('slowdown'), 1, 3)} (95 % interval {ci(p[key])}: {verdict(p[key])})"
                    for key in ("b", "c")),
        f"- a slow viewer does not change the others' fps (fps c / b >= {ISOLATION_GOAL} for every fast viewer): worst "
        f"{fmt(worst_iso, 1, 3)} ({'met' if worst_iso is not None and worst_iso >= ISOLATION_GOAL else 'MISSED'})",
        "", "Definitions: cost / chunk = denoise + decode wall seconds the producer reports to the deadline scheduler "
        "for a full-step chunk (times in ms per chunk). From the plan to the observation of each chunk, the "
        "generation thread's time splits (Linux /proc/thread-self/schedstat) into running (its CPU time), waiting "
        "for a core (runnable, on the run queue: other threads or processes had both cores) and blocked (neither: "
        "in this thread that is waiting for the GIL, which the server's event loop and encoder threads hold). "
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
    figure, (cost_axes, fps_axes, cdf_axes) = plt.subplots(1, 3, figsize=(18, 4.8),
                                                           gridspec_kw={"width_ratios": [0.6, 1.2, 1]})
    bottom = [0.0, 0.0, 0.0]
    labels = {"a": "a: none", "b": "b: viewers", "c": "c: + slow"}
    for part, name in (("thread_cpu_s_mean", "running"), ("runq_s_mean", "waiting for a core"),
                       ("blocked_s_mean", "blocked (GIL)")):
        heights = [1000 * (p[k][part] or 0.0) for k in ("a", "b", "c")]
        cost_axes.bar([labels[k] for k in ("a", "b", "c")], heights, bottom=bottom, label=name)
        bottom = [b + h for b, h in zip(bottom, heights)]
    cost_axes.set_ylabel("generation thread, ms per chunk")
    cost_axes.set_title("producer cost per chunk")
    cost_axes.legend(fontsize=8)
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
    parser.add_argument("--cycles", type=int, default=6, help="a -> b -> c cycles (default 6)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per window (default 4: 24 s "
                        "per condition over 6 cycles)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before each window (default 2)")
    parser.add_argument("--nice", type=int, default=-10, help="niceness of the server and the viewers (default -10 "
                        "where allowed: other processes on a shared machine then disturb the measurement less)")
    parser.add_argument("--pin", action="store_true", help="experiment: the server's generation thread alone on "
                        "core 0, every other thread of the server and the viewers on core 1")
    parser.add_argument("--switch-interval", type=float, help="experiment: sys.setswitchinterval in the server "
                        "(Python's default is 0.005 s), to see how much of a slowdown is GIL hand-over")
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
    args.nice = shield(args.nice)  # before any thread starts: threads inherit it
    bench = Bench(args)
    phases = asyncio.run(bench.run())
    data = results(phases, args, bench)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(data, args.out / f"{args.name}.png")
    for key in ("b", "c"):
        for v in data["phases"][key]["viewers"]:
            samples = v.pop("_delivery")
            step = max(1, len(samples) // 200)
            v["delivery_latency_samples_s"] = [round(x, 5) for x in samples[::step]]  # every step-th, for a CDF
    for phase in data["phases"].values():
        phase.pop("_costs", None)
    data["server_output_tail"] = bench.server_output[-2000:]
    (args.out / f"{args.name}.json").write_text(json.dumps(data, indent=2))
    text = report(data)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
