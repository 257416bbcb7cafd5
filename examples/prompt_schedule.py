"""Send a timed prompt schedule to a live session and report when each prompt took effect.

    framecast serve --token s3cret --fps 30 --output-scale 4
    python examples/prompt_schedule.py --token s3cret \\
        --schedule "0:a sunny grass field,5:snowfall at night,10:a red fox in snow"
    python examples/prompt_schedule.py --token s3cret --file schedule.txt     # one `seconds: prompt` per line

Each entry is `seconds:prompt`, seconds counted from the first frame received. In `--schedule` entries are separated
by commas followed by the next entry's time, so a prompt may itself contain commas ("0:snow, at night,5:fog");
in a file, one entry per line, blank lines and lines starting with # ignored.

For every prompt it prints the server's ack: the engine chunk index from which the prompt is in effect, and the
time to effect: from sending the prompt to the first frame of that chunk arriving here (the server announces each
chunk with a `chunk` event just before its first frame). After the last prompt it waits `--hold` seconds (or
until the last effect is seen), then exits 0 if every prompt was acknowledged and frames arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from framecast_ws import FrameStats, control, parse_message, ws_url  # noqa: E402

ENTRY_SPLIT = re.compile(r",\s*(?=\d+(?:\.\d*)?\s*:)")  # a comma followed by the next entry's "seconds:"


@dataclass(frozen=True)
class Entry:
    at_s: float
    prompt: str


@dataclass
class Sent:
    entry: Entry
    seq: int
    sent_s: float
    ack: dict | None = None
    ack_s: float | None = None
    effect_s: float | None = None  # when the first frame of the ack's chunk arrived
    effect_frame: int | None = None
    error: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


def parse_entry(text: str) -> Entry:
    seconds, colon, prompt = text.partition(":")
    try:
        at_s = float(seconds)
    except ValueError:
        at_s = -1.0
    if not colon or at_s < 0 or not prompt.strip():
        raise argparse.ArgumentTypeError(f"schedule entry {text.strip()!r} must be `seconds:prompt`, seconds >= 0")
    return Entry(at_s, prompt.strip())


def parse_schedule(text: str) -> list[Entry]:
    entries = [parse_entry(part) for part in ENTRY_SPLIT.split(text.strip()) if part.strip()]
    if not entries:
        raise argparse.ArgumentTypeError("the schedule is empty")
    return sorted(entries, key=lambda e: e.at_s)


def read_schedule(path: Path) -> list[Entry]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    entries = [parse_entry(line) for line in lines if line and not line.startswith("#")]
    if not entries:
        raise argparse.ArgumentTypeError(f"{path}: no `seconds: prompt` lines")
    return sorted(entries, key=lambda e: e.at_s)


class ScheduleClient:
    def __init__(self, ws) -> None:
        self.ws = ws
        self.stats = FrameStats()
        self.hello: dict | None = None
        self.first_frame = asyncio.Event()
        self.hello_event = asyncio.Event()
        self.sent: dict[int, Sent] = {}
        self.seq = 0
        self.chunk_first_frame: dict[int, int] = {}  # engine chunk -> its first video frame index
        self.start_s = time.monotonic()

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start_s:7.2f}s] {text}", flush=True)

    def _check_effects(self, frame_index: int, at_s: float) -> None:
        for item in self.sent.values():
            if item.ack is None or item.effect_s is not None or item.ack.get("superseded"):
                continue
            first = self.chunk_first_frame.get(item.ack["chunk"])
            if first is not None and frame_index >= first:
                item.effect_s, item.effect_frame = at_s, frame_index
                self.log(f"on screen: {item.entry.prompt!r} from frame {frame_index} (chunk {item.ack['chunk']}), "
                         f"{1000 * (at_s - item.sent_s):.0f} ms after it was sent")
                item.done.set()

    async def receive(self) -> None:
        async for data in self.ws:
            now = time.monotonic()
            message = parse_message(data)
            if isinstance(message, tuple):
                header = message[0]
                self.stats.add(header, now)
                self.first_frame.set()
                self._check_effects(header.index, now)
                continue
            kind = message.get("type")
            if kind == "hello":
                self.hello = message
                self.hello_event.set()
            elif kind == "chunk" and message.get("chunk") is not None:
                self.chunk_first_frame[message["chunk"]] = message["first_frame"]
            elif kind in ("ack", "error") and message.get("seq") in self.sent:
                item = self.sent[message["seq"]]
                item.ack_s = now
                if kind == "error":
                    item.error = message["error"]
                    self.log(f"error for {item.entry.prompt!r}: {item.error}")
                    item.done.set()
                    continue
                item.ack = message
                note = " (superseded by a newer prompt before it applied)" if message["superseded"] else ""
                self.log(f"ack: {item.entry.prompt!r} in effect from chunk {message['chunk']}{note}, "
                         f"{1000 * (now - item.sent_s):.0f} ms after it was sent")
                if message["superseded"]:
                    item.done.set()

    async def send(self, entry: Entry) -> Sent:
        self.seq += 1
        item = self.sent[self.seq] = Sent(entry, self.seq, time.monotonic())
        await self.ws.send(control("prompt", text=entry.prompt, id=self.seq))
        self.log(f"sent prompt {entry.prompt!r} (scheduled at {entry.at_s:g} s)")
        return item


def summary(items: list[Sent]) -> str:
    rows = ["", f"{'at (s)':>7}  {'chunk':>5}  {'ack (ms)':>8}  {'effect (ms)':>11}  prompt"]
    for item in items:
        chunk = "error" if item.error else ("-" if item.ack is None else str(item.ack["chunk"]))
        ack_ms = "-" if item.ack_s is None else f"{1000 * (item.ack_s - item.sent_s):.0f}"
        effect_ms = "-" if item.effect_s is None else f"{1000 * (item.effect_s - item.sent_s):.0f}"
        rows.append(f"{item.entry.at_s:>7g}  {chunk:>5}  {ack_ms:>8}  {effect_ms:>11}  {item.entry.prompt}")
    return "\n".join(rows)


async def main_async(args: argparse.Namespace) -> int:
    try:
        import websockets
    except ImportError:
        print("prompt_schedule: needs the websockets package (pip install websockets)", file=sys.stderr)
        return 2
    url = ws_url(args.host, args.port, args.token)
    try:
        ws = await websockets.connect(url, max_size=2**24, open_timeout=args.connect_timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        print(f"prompt_schedule: cannot connect to {url}: {exc} (is `framecast serve` running on that port?)",
              file=sys.stderr)
        return 1
    client = ScheduleClient(ws)
    receiver = asyncio.create_task(client.receive())
    items: list[Sent] = []
    try:
        await asyncio.wait_for(asyncio.gather(client.hello_event.wait(), client.first_frame.wait()),
                               args.connect_timeout)
        if not client.hello["can_steer"]:
            print("prompt_schedule: the server refuses steering without the session token (pass --token)",
                  file=sys.stderr)
            return 2
        origin = time.monotonic()
        client.log(f"connected to session {client.hello['session']} ({client.hello['fps']} fps); "
                   f"{len(args.entries)} prompts over {args.entries[-1].at_s:g} s")
        for entry in args.entries:
            await asyncio.sleep(max(0.0, origin + entry.at_s - time.monotonic()))
            items.append(await client.send(entry))
        try:
            await asyncio.wait_for(asyncio.gather(*(item.done.wait() for item in items)), args.hold)
        except asyncio.TimeoutError:
            pass
    except asyncio.TimeoutError:
        print("prompt_schedule: no hello or no frames from the server", file=sys.stderr)
        return 1
    finally:
        await ws.close()
        await asyncio.gather(receiver, return_exceptions=True)
    print(summary(items))
    client.log(f"done: {client.stats.line()}")
    answered = all(item.ack is not None for item in items)
    return 0 if answered and client.stats.count else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="server port (default 8000)")
    parser.add_argument("--token", help="the session's steering token (printed by `framecast serve`)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--schedule", type=parse_schedule, help='e.g. "0:a sunny grass field,5:snowfall at night"')
    source.add_argument("--file", type=Path, help="a schedule file: one `seconds: prompt` per line")
    parser.add_argument("--hold", type=float, default=10.0,
                        help="seconds to wait after the last prompt for its effect (default 10)")
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to connect and get frames")
    args = parser.parse_args(argv)
    try:
        args.entries = args.schedule if args.schedule else read_schedule(args.file)
    except (OSError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
