"""The websocket sink: one live session to one program over a websocket (aiohttp).

Down, binary messages, one per frame: a 22-byte little-endian header, then the picture.

    offset  size  field
    0       1     header version (1)
    1       1     format: 0 raw RGB (uint8 [H, W, 3], row-major), 1 JPEG (baseline, full-range YUV 4:2:0)
    2       2     width in pixels
    4       2     height in pixels
    6       4     frame index on the media clock
    10      8     pts in 1/90,000 s
    18      4     frames this viewer has skipped so far because it read too slowly

Down, text messages: JSON events, acks and errors; up, text messages: JSON controls (stream/control.py). The client
picks the format at connect (`/ws?format=jpeg|rgb`). Frames and events come from the viewer's own bounded mailboxes,
so a slow or vanished client only loses its own frames.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import struct
from dataclasses import dataclass

import numpy as np
from aiohttp import WSMsgType, web

from framecast.models.errors import BadMessage, SessionClosed, ShapeError
from framecast.stream.producer import VideoFrame
from framecast.stream.relay import Mailbox
from framecast.stream.session import Session
from framecast.stream.sinks.jpeg import SHARED, JpegEncoder, SharedJpeg, jpeg_of
from framecast.stream.sinks.viewer import ControlInbox

__all__ = ["FRAME_HEADER", "FrameFormat", "FrameHeader", "JpegEncoder", "WebSocketViewer", "pack_frame",
           "pack_header", "unpack_frame"]  # JpegEncoder lives in stream/sinks/jpeg.py; re-exported for old imports

log = logging.getLogger("framecast.websocket")

FRAME_HEADER = struct.Struct("<BBHHIQI")
FRAME_HEADER_VERSION = 1


class FrameFormat(enum.Enum):
    RGB = "rgb"
    JPEG = "jpeg"

    @property
    def code(self) -> int:
        return {FrameFormat.RGB: 0, FrameFormat.JPEG: 1}[self]


@dataclass(frozen=True)
class FrameHeader:
    format: FrameFormat
    width: int
    height: int
    index: int
    pts: int
    dropped: int


def pack_header(frame: VideoFrame, format: FrameFormat, dropped: int) -> bytes:
    """The 22-byte header of one binary frame message (the picture follows it)."""
    height, width, channels = frame.rgb.shape
    if channels != 3 or frame.rgb.dtype != np.uint8:
        raise ShapeError(f"frame {frame.index}: expected uint8 [H, W, 3], got {frame.rgb.dtype} {frame.rgb.shape}")
    return FRAME_HEADER.pack(FRAME_HEADER_VERSION, format.code, width, height, frame.index, frame.pts, dropped)


def pack_frame(frame: VideoFrame, format: FrameFormat, dropped: int, jpeg: JpegEncoder | None = None) -> bytes:
    """One binary frame message: header + picture (raw RGB, or JPEG through `jpeg`, default the shared cache)."""
    header = pack_header(frame, format, dropped)
    if format is FrameFormat.JPEG:
        return header + (jpeg.encode(frame.rgb) if jpeg is not None else jpeg_of(frame))
    return header + np.ascontiguousarray(frame.rgb).tobytes()


def unpack_frame(data: bytes) -> tuple[FrameHeader, bytes]:
    """Header and picture bytes of one binary frame message (what a client does).

    Raises:
        BadMessage: too short, an unknown header version or format, or a raw picture of the wrong size.
    """
    if len(data) < FRAME_HEADER.size:
        raise BadMessage(f"frame message is {len(data)} bytes; the header alone is {FRAME_HEADER.size}")
    version, code, width, height, index, pts, dropped = FRAME_HEADER.unpack_from(data)
    if version != FRAME_HEADER_VERSION:
        raise BadMessage(f"frame header version {version}; expected {FRAME_HEADER_VERSION}")
    formats = {f.code: f for f in FrameFormat}
    if code not in formats:
        raise BadMessage(f"frame format code {code}; expected one of {sorted(formats)}")
    payload = data[FRAME_HEADER.size:]
    if formats[code] is FrameFormat.RGB and len(payload) != width * height * 3:
        raise BadMessage(f"raw frame of {len(payload)} bytes; {width}x{height} RGB needs {width * height * 3}")
    return FrameHeader(formats[code], width, height, index, pts, dropped), payload


class WebSocketViewer:
    """Serves one connected client: frames and events down, controls up, until either side goes away.

    `token`: what the client presented (steering needs the session's); `max_message_bytes`: the control size limit
    (a larger message gets an error reply; the socket's own hard limit, above it, closes the connection).
    """

    def __init__(self, ws: web.WebSocketResponse, session: Session, *, format: FrameFormat, token: str | None,
                 max_message_bytes: int, peer: str = "?", jpeg: SharedJpeg | None = None) -> None:
        self.ws, self.session, self.format, self.token = ws, session, format, token
        self.max_message_bytes, self.peer = max_message_bytes, peer
        self.can_steer = session.can_steer(token)
        self._jpeg = jpeg if jpeg is not None else SHARED  # one encode per frame for all JPEG viewers
        self._send_lock = asyncio.Lock()
        self.frames_sent = 0
        self.messages_received = 0

    async def serve(self) -> None:
        session = self.session
        try:
            frames: Mailbox[VideoFrame] = session.frames.subscribe()
            events: Mailbox[str] = session.events.subscribe()
        except SessionClosed:
            await self.ws.close(message=b"session closed")
            return
        events.put(session.hello(can_steer=self.can_steer, frame_format=self.format.value))
        senders = [asyncio.create_task(self._send_frames(frames)), asyncio.create_task(self._send_events(events))]
        try:
            await self._receive(events)
        finally:
            session.frames.unsubscribe(frames)
            session.events.unsubscribe(events)
            for task in senders:
                task.cancel()
            await asyncio.gather(*senders, return_exceptions=True)
            log.info("session %s: viewer %s left after %d frames (%d dropped)", session.id, self.peer,
                     self.frames_sent, frames.dropped)

    async def _receive(self, events: Mailbox[str]) -> None:
        inbox = ControlInbox(self.session, token=self.token, reply=events.put,
                             max_message_bytes=self.max_message_bytes)
        async for message in self.ws:
            if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue  # aiohttp answers pings and handles close frames itself
            self.messages_received += 1
            if not inbox.receive(message.data):  # parsed and submitted as every viewer does (sinks/viewer.py)
                break

    async def _send(self, data: str | bytes) -> None:
        async with self._send_lock:
            if isinstance(data, str):
                await self.ws.send_str(data)
            else:
                await self.ws.send_bytes(data)

    async def _send_frames(self, frames: Mailbox[VideoFrame]) -> None:
        try:
            while True:
                frame = await frames.get()
                if self.format is FrameFormat.JPEG:  # encoded once, off the loop, for every JPEG viewer
                    header = pack_header(frame, self.format, frames.dropped)
                    data = header + await self._jpeg.encode_async(frame)
                else:
                    data = pack_frame(frame, self.format, frames.dropped)
                await self._send(data)
                self.frames_sent += 1
        except SessionClosed:  # the stream ended: end this connection too
            await self.ws.close()
        except ConnectionError:  # the client vanished; the receive loop sees it too
            await self.ws.close()

    async def _send_events(self, events: Mailbox[str]) -> None:
        try:
            while True:
                await self._send(await events.get())
        except SessionClosed:
            await self.ws.close()
        except ConnectionError:
            await self.ws.close()
