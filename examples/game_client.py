"""Play the world model live: keys (or a script) steer it, frames come back over the websocket.

Start a server, then the client (the token is the one `framecast serve` prints, or the one you gave it):

    framecast serve --simulator --token s3cret --fps 30 --output-scale 4   # the world itself: arrow keys move its agent
    python examples/game_client.py --token s3cret                       # keyboard: arrows or WASD, space stops
    python examples/game_client.py --token s3cret --script "right:2s,up:1s,none:1s" --png out/latest.png
    python examples/game_client.py --token s3cret --window              # also show frames (matplotlib)

Keys (the terminal is switched to cbreak mode while the client runs, and restored after): arrows or W/A/S/D send
the world's actions UP=1, DOWN=2, LEFT=3, RIGHT=4 (models/world/vocabulary.py `Action`), space or x sends NONE=0,
p pauses or resumes the stream, q or Esc quits. A terminal sends no key-up, so an action holds until the next key.
A script is a comma-separated list of `step:duration` with steps none|up|down|left|right (or their ids 0..4),
pause, resume or wait, and durations in seconds (`2s`, `0.5`, `250ms`).

Every control is acknowledged by the server with the engine chunk from which it is in effect; the client prints
each ack (and any error), a stats line every `--stats-every` seconds, and exits 0 when it received frames. A model
that takes no actions (the hello says `num_actions: 0`, e.g. the `tiny` preset without --simulator) gets no action
controls: the client says so once and still plays the script's pauses and resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from framecast_ws import FrameStats, control, decode_picture, parse_message, save_png, ws_url  # noqa: E402

ACTIONS = {"none": 0, "up": 1, "down": 2, "left": 3, "right": 4}  # framecast.models.world.vocabulary.Action
ACTION_NAMES = {value: name for name, value in ACTIONS.items()}
KEYS = {  # terminal input -> step
    "\x1b[A": "up", "\x1b[B": "down", "\x1b[D": "left", "\x1b[C": "right",
    "\x1bOA": "up", "\x1bOB": "down", "\x1bOD": "left", "\x1bOC": "right",
    "w": "up", "s": "down", "a": "left", "d": "right", " ": "none", "x": "none",
    "p": "toggle", "q": "quit", "\x1b": "quit",
}
STEPS = set(ACTIONS) | {"pause", "resume", "wait"}


@dataclass(frozen=True)
class ScriptStep:
    step: str
    seconds: float


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"duration {text!r} must look like 2s, 0.5 or 250ms")
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "ms" else value


def parse_script(text: str) -> list[ScriptStep]:
    """'right:2s,up:1s,none:1s' -> steps; raises argparse.ArgumentTypeError naming the bad part."""
    steps = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, duration = part.partition(":")
        name = name.strip().lower()
        if name.isdigit() and int(name) in ACTION_NAMES:
            name = ACTION_NAMES[int(name)]
        if name not in STEPS:
            raise argparse.ArgumentTypeError(f"script step {part!r}: expected one of {', '.join(sorted(STEPS))} "
                                             "or an action id 0..4")
        steps.append(ScriptStep(name, parse_duration(duration) if duration else 1.0))
    if not steps:
        raise argparse.ArgumentTypeError("the script is empty")
    return steps


class GameClient:
    def __init__(self, ws, args: argparse.Namespace) -> None:
        self.ws, self.args = ws, args
        self.stats = FrameStats()
        self.hello: dict | None = None
        self.latest: tuple | None = None  # (header, payload) of the newest frame
        self.sent = 0
        self.pending: dict[int, tuple[str, float]] = {}  # seq -> (what, sent at)
        self.acks = 0
        self.errors = 0
        self.paused = False
        self.action: int | None = None
        self.warned_no_actions = False
        self.hello_event = asyncio.Event()
        self.start_s = time.monotonic()

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start_s:7.2f}s] {text}", flush=True)

    async def receive(self) -> None:
        async for data in self.ws:
            message = parse_message(data)
            if isinstance(message, tuple):
                self.stats.add(message[0])
                self.latest = message
                continue
            kind = message.get("type")
            if kind == "hello":
                self.hello = message
                self.paused = bool(message.get("paused"))
                self.log(f"hello: session {message['session']}, {message['fps']} fps, format {message['format']}, "
                         f"can steer: {message['can_steer']}, actions: {message['num_actions']}")
                self.hello_event.set()
            elif kind in ("ack", "error"):
                what, sent_s = self.pending.pop(message.get("seq"), ("?", time.monotonic()))
                took_ms = 1000 * (time.monotonic() - sent_s)
                if kind == "ack":
                    self.acks += 1
                    superseded = " (superseded)" if message.get("superseded") else ""
                    self.log(f"ack #{message['seq']} {what}: in effect from chunk {message['chunk']}{superseded}"
                             f" ({took_ms:.0f} ms)")
                else:
                    self.errors += 1
                    self.log(f"error #{message.get('seq')} {what}: {message['error']}")

    async def send(self, kind: str, what: str, **fields: object) -> None:
        self.sent += 1
        self.pending[self.sent] = (what, time.monotonic())
        await self.ws.send(control(kind, id=self.sent, **fields))

    async def do(self, step: str) -> None:
        """Carry out one step: an action name, pause, resume, toggle or wait."""
        if step == "wait":
            return
        if step == "toggle":
            step = "resume" if self.paused else "pause"
        if step in ("pause", "resume"):
            self.paused = step == "pause"
            await self.send(step, step)
            return
        action = ACTIONS[step]
        num_actions = self.hello["num_actions"]
        if not num_actions:
            if not self.warned_no_actions:
                self.warned_no_actions = True
                self.log("this model takes no actions (num_actions 0): action keys are not sent; "
                         "serve a model trained with actions to steer it")
            return
        if action != self.action:  # key repeat sends the same key again and again: only changes go out
            self.action = action
            await self.send("action", f"action {step} ({action})", action=action)

    async def play_script(self, steps: list[ScriptStep]) -> None:
        for item in steps:
            await self.do(item.step)
            await asyncio.sleep(item.seconds)

    async def play_keyboard(self) -> None:
        import termios
        import tty

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        keys: asyncio.Queue[str] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def readable() -> None:
            data = os.read(fd, 64).decode(errors="ignore")
            while data:
                for size in (3, 1):  # escape sequences first (arrows are 3 characters)
                    if data[:size] in KEYS:
                        keys.put_nowait(KEYS[data[:size]])
                        data = data[size:]
                        break
                else:
                    data = data[1:]

        tty.setcbreak(fd)
        loop.add_reader(fd, readable)
        self.log("keys: arrows/WASD move, space stops, p pauses/resumes, q quits")
        try:
            while (key := await keys.get()) != "quit":
                await self.do(key)
        finally:
            loop.remove_reader(fd)
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    async def report(self) -> None:
        """Stats line every --stats-every s; the PNG every --png-every s; the window at about 10 frames/s."""
        window = None
        now = time.monotonic()
        next_stats, next_png = now + self.args.stats_every, now + self.args.png_every
        while True:
            await asyncio.sleep(0.1 if self.args.window else min(self.args.stats_every, self.args.png_every))
            now = time.monotonic()
            if self.args.window and self.latest is not None:
                window = show(window, decode_picture(*self.latest))
            if self.args.png and self.latest is not None and now >= next_png:
                save_png(decode_picture(*self.latest), self.args.png)
                next_png = now + self.args.png_every
            if now >= next_stats:
                self.log(self.stats.line())
                next_stats = now + self.args.stats_every

    async def settle(self, timeout_s: float) -> None:
        """Wait for the replies still outstanding (at most timeout_s)."""
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


def show(window, rgb):
    """Show a frame in a matplotlib window (created on first use); returns the window state."""
    import matplotlib.pyplot as plt

    if window is None:
        plt.ion()
        figure, axes = plt.subplots()
        axes.set_axis_off()
        window = (figure, axes.imshow(rgb))
    else:
        window[1].set_data(rgb)
    plt.pause(0.001)
    return window


async def main_async(args: argparse.Namespace) -> int:
    try:
        import websockets
    except ImportError:
        print("game_client: needs the websockets package (pip install websockets)", file=sys.stderr)
        return 2
    url = ws_url(args.host, args.port, args.token, args.format)
    try:
        ws = await websockets.connect(url, max_size=2**24, open_timeout=args.connect_timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        print(f"game_client: cannot connect to {url}: {exc} (is `framecast serve` running on that port?)",
              file=sys.stderr)
        return 1
    client = GameClient(ws, args)
    receiver = asyncio.create_task(client.receive())
    reporter = asyncio.create_task(client.report())
    try:
        await asyncio.wait_for(client.hello_event.wait(), args.connect_timeout)
        if not client.hello["can_steer"]:
            client.log("this connection can only watch (no or wrong --token): controls will be refused")
        if args.script:
            await client.play_script(args.script)
        elif sys.stdin.isatty():
            await client.play_keyboard()
        else:
            print("game_client: stdin is not a terminal; pass --script to play without a keyboard", file=sys.stderr)
            return 2
        await client.settle(args.ack_timeout)
    except asyncio.TimeoutError:
        print("game_client: no hello from the server", file=sys.stderr)
        return 1
    finally:
        reporter.cancel()
        await ws.close()
        await asyncio.gather(receiver, reporter, return_exceptions=True)
    if args.png and client.latest is not None:
        save_png(decode_picture(*client.latest), args.png)
        client.log(f"latest frame saved to {args.png}")
    client.log(f"done: {client.stats.line()}; {client.sent} controls, {client.acks} acks, {client.errors} errors, "
               f"{len(client.pending)} unanswered")
    return 0 if client.stats.count and not client.pending else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="server port (default 8000)")
    parser.add_argument("--token", help="the session's steering token (without it the client can only watch)")
    parser.add_argument("--format", choices=["jpeg", "rgb"], default="jpeg", help="frame format (default jpeg)")
    parser.add_argument("--script", type=parse_script, help='play a script instead of the keyboard, e.g. '
                        '"right:2s,up:1s,none:1s"')
    parser.add_argument("--png", type=Path, help="save the latest frame to this PNG (every --png-every s, and at exit)")
    parser.add_argument("--png-every", type=float, default=1.0, help="seconds between PNG updates (default 1)")
    parser.add_argument("--window", action="store_true", help="show the frames in a matplotlib window")
    parser.add_argument("--stats-every", type=float, default=1.0, help="seconds between stats lines (default 1)")
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to connect and get the hello")
    parser.add_argument("--ack-timeout", type=float, default=5.0, help="seconds to wait for outstanding acks at exit")
    args = parser.parse_args(argv)
    if args.window:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--window needs matplotlib (pip install matplotlib); use --png instead")
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
