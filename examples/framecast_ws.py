"""Helpers shared by the example clients (not an example itself): the /ws address, frame decoding, PNG output.

The examples talk to a running `framecast serve` over its websocket (`/ws`, see stream/sinks/websocket.py and
stream/control.py): binary messages are frames (a 22-byte header, then JPEG or raw RGB), text messages are JSON
events, acks and errors.
"""

from __future__ import annotations

import io
import json
import struct
import time
import zlib
from pathlib import Path
from urllib.parse import urlencode

import numpy as np

from framecast.stream.sinks.websocket import FrameFormat, FrameHeader, unpack_frame


def ws_url(host: str, port: int, token: str | None, frame_format: str = "jpeg") -> str:
    """The program endpoint of a `framecast serve` (token optional: without it a client can only watch)."""
    query = {"format": frame_format}
    if token:
        query["token"] = token
    return f"ws://{host}:{port}/ws?{urlencode(query)}"


def control(kind: str, **fields: object) -> str:
    """One control message (protocol v1) as JSON text."""
    return json.dumps({"v": 1, "type": kind, **fields})


def decode_picture(header: FrameHeader, payload: bytes) -> np.ndarray:
    """uint8 RGB [H, W, 3] of one frame message's picture (JPEG through Pillow when installed, else PyAV)."""
    if header.format is FrameFormat.RGB:
        return np.frombuffer(payload, np.uint8).reshape(header.height, header.width, 3)
    try:
        from PIL import Image
    except ImportError:
        import av

        codec = av.CodecContext.create("mjpeg", "r")
        frames = codec.decode(av.Packet(payload))
        return frames[0].to_ndarray(format="rgb24")
    with Image.open(io.BytesIO(payload)) as image:
        return np.asarray(image.convert("RGB"))


def png_bytes(rgb: np.ndarray) -> bytes:
    """A PNG file of an RGB picture, written with zlib alone (no imaging library needed)."""
    height, width, _ = rgb.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), np.ascontiguousarray(rgb).reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def save_png(rgb: np.ndarray, path: Path) -> None:
    """Write an RGB picture as PNG; replaces the file atomically (a viewer never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(png_bytes(rgb))
    partial.replace(path)


class FrameStats:
    """Frames received: count, rate over the last second, frames the server skipped for this client."""

    def __init__(self) -> None:
        self.count = 0
        self.dropped = 0
        self.first_index: int | None = None
        self.last: FrameHeader | None = None
        self._times: list[float] = []

    def add(self, header: FrameHeader, at_s: float | None = None) -> None:
        at_s = time.monotonic() if at_s is None else at_s
        self.count += 1
        self.dropped = header.dropped
        self.last = header
        if self.first_index is None:
            self.first_index = header.index
        self._times.append(at_s)
        while self._times and self._times[0] < at_s - 1.0:
            self._times.pop(0)

    @property
    def fps(self) -> float:
        return float(len(self._times))

    def line(self) -> str:
        size = f"{self.last.width}x{self.last.height}" if self.last else "-"
        index = self.last.index if self.last else "-"
        return f"frames {self.count} ({self.fps:.0f}/s, {size}, last index {index}, skipped {self.dropped})"


def parse_message(data: str | bytes) -> tuple[FrameHeader, bytes] | dict:
    """A websocket message from the server: (header, picture bytes) for a frame, the JSON object otherwise."""
    if isinstance(data, bytes):
        return unpack_frame(data)
    return json.loads(data)
