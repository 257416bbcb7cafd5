"""Stream a live session into a virtual camera, so video-call and recording apps can pick it up as a webcam.

    sudo modprobe v4l2loopback devices=1 exclusive_caps=1     # Linux: the camera device (once per boot)
    pip install pyvirtualcam                                    # or: pip install -e ".[vcam]"
    python examples/virtual_camera.py                           # tiny preset, 512x512 at 30 fps, until Ctrl-C
    python examples/virtual_camera.py --port 8000 --token s3cret   # also serve the page and /ws to steer it
    python examples/virtual_camera.py --seconds 10 --device /dev/video2 --prompt "snowfall at night"

It starts a session in this process (the `tiny` preset with random weights at 128x128 px, enlarged --output-scale
times: the stream `framecast serve --preset tiny` makes; `framecast vcam` streams the embedded world model) and feeds every frame to `pyvirtualcam` through FrameCast's
virtual-camera sink (stream/sinks/vcam.py: `open_camera`, `VirtualCameraSink`). pyvirtualcam needs a camera driver:
v4l2loopback on Linux, OBS Virtual Camera on Windows and macOS. Without one (or without pyvirtualcam) the example
says which driver and how to install it, and exits with status 3. `framecast vcam` is the same as a command.
With --port the session is also served over HTTP (the page, /ws, /metrics) so prompts can steer what the camera
shows: `python examples/prompt_schedule.py --port 8000 --token s3cret --schedule "0:snowfall at night"`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

NO_DRIVER = 3  # exit status when no virtual camera driver is installed


def build_session(args: argparse.Namespace):
    """A live session of the `tiny` preset with random weights (`framecast serve --preset tiny` builds the same): the
    lightest stream there is, for trying a camera driver; `framecast vcam` streams the embedded world model."""
    import torch

    from framecast.models.config import preset
    from framecast.models.dit import CausalWanDiT
    from framecast.kernels.compute_dtype import default_dtype
    from framecast.models.preview import PreviewDecoder
    from framecast.models.text import HashedTextEncoder
    from framecast.stream.engine import EngineConfig, StreamEngine
    from framecast.stream.session import Session, SessionConfig

    torch.manual_seed(args.seed)
    dit = CausalWanDiT(preset("tiny")).to(default_dtype("cpu")).eval()
    text = HashedTextEncoder(dit.config.text_dim, dit.config.text_len)
    engine = StreamEngine(dit, EngineConfig(latent_height=args.size // 8, latent_width=args.size // 8, seed=args.seed),
                          text.encode(args.prompt).to(dit.dtype))
    config = SessionConfig(fps=args.fps, latency_budget_s=args.latency_budget, output_scale=args.output_scale)
    return Session(engine, PreviewDecoder(dit.config.out_dim, 8, 4), text.encode, config, token=args.token)


async def run(args: argparse.Namespace) -> int:
    from framecast.stream.sinks.vcam import VirtualCameraSink, VirtualCameraUnavailable, open_camera

    size = args.size * args.output_scale
    try:  # the camera first: without a driver this fails at once, before the model is built
        camera = open_camera(size, size, args.fps, device=args.device, backend=args.backend)
    except VirtualCameraUnavailable as exc:
        print(f"virtual_camera: no virtual camera is available: {exc}", file=sys.stderr)
        return NO_DRIVER
    session = build_session(args)
    sink = VirtualCameraSink(session, size, size, camera=camera)  # owns the camera from here on
    sink.start()  # subscribed before the session starts: the camera gets every frame
    print(f"virtual_camera: sending {size}x{size} at {args.fps} fps to {sink.device} ({camera.backend})", flush=True)
    runner = None
    try:
        if args.port is not None:
            from aiohttp import web

            from framecast.stream.server import create_app

            runner = web.AppRunner(create_app(session))  # starts the session on startup, closes it on cleanup
            await runner.setup()
            await web.TCPSite(runner, args.host, args.port).start()
            port = runner.addresses[0][1]
            print(f"virtual_camera: steer it at http://{args.host}:{port}/?token={session.token}", flush=True)
        else:
            session.start()
        started = time.monotonic()
        next_report = started + args.stats_every
        while args.seconds is None or time.monotonic() - started < args.seconds:
            await asyncio.sleep(0.1)
            if session.failure is not None or sink.failure is not None:
                print(f"virtual_camera: failed: {session.failure or sink.failure}", file=sys.stderr)
                return 1
            if time.monotonic() >= next_report:
                next_report += args.stats_every
                print(f"virtual_camera: {sink.frames_sent} frames sent ({sink.dropped} skipped by a slow camera)",
                      flush=True)
    finally:
        if runner is not None:
            await runner.cleanup()
        else:
            await asyncio.to_thread(session.close)
        await asyncio.to_thread(sink.close)  # ends with the stream anyway; closes the camera
    print(f"virtual_camera: done: {sink.frames_sent} frames sent to {sink.device}", flush=True)
    return 0 if sink.frames_sent else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="a quiet lake at dawn", help="the first prompt")
    parser.add_argument("--fps", type=int, default=30, help="frame rate (default 30)")
    parser.add_argument("--size", type=int, default=128, help="model frame size in pixels (multiple of 16; default 128)")
    parser.add_argument("--output-scale", type=int, default=4, help="enlarge frames this many times (default 4: 512 px)")
    parser.add_argument("--latency-budget", type=float, default=0.5, help="seconds from media time to the camera")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="camera device, e.g. /dev/video2 (default: the first free one)")
    parser.add_argument("--backend", help="pyvirtualcam backend name (default: any that works)")
    parser.add_argument("--seconds", type=float, help="stop after this many seconds (default: run until Ctrl-C)")
    parser.add_argument("--stats-every", type=float, default=2.0, help="seconds between status lines (default 2)")
    parser.add_argument("--port", type=int, help="also serve the page and /ws on this port (0: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address for --port (default 127.0.0.1)")
    parser.add_argument("--token", help="steering token for --port (default: a random one, printed)")
    args = parser.parse_args(argv)
    if args.size % 16:
        parser.error(f"--size {args.size} must be a multiple of 16")
    try:
        import torch

        torch.set_num_threads(1)  # the tiny model is fastest on one thread; the sink and the loop get the other core
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
