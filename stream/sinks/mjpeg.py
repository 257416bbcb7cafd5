"""The MJPEG sink: a live session as `multipart/x-mixed-replace` JPEG over plain HTTP (aiohttp).

What OBS's Browser and Media sources, an `<img src>`, VLC and ffmpeg play without any client code:

    HTTP/1.1 200 OK
    Content-Type: multipart/x-mixed-replace; boundary=framecast-frame

    --framecast-frame\r\n
    Content-Type: image/jpeg\r\n
    Content-Length: 8123\r\n
    X-Frame-Index: 41\r\n
    X-Pts: 230625\r\n
    \r\n
    <8123 bytes of JPEG>\r\n
    --framecast-frame\r\n
    ...

Each client reads its own bounded mailbox of `session.frames` (a slow client drops its own frames, never anyone
else's), and the JPEG bytes come from the shared cache (stream/sinks/jpeg.py): one encode per frame for all clients.
The response ends when the stream ends; a client that goes away is unsubscribed at the next frame it misses.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from framecast.models.errors import SessionClosed
from framecast.stream.producer import VideoFrame
from framecast.stream.relay import Mailbox
from framecast.stream.session import Session
from framecast.stream.sinks.jpeg import SHARED, SharedJpeg

log = logging.getLogger("framecast.mjpeg")

BOUNDARY = "framecast-frame"
CONTENT_TYPE = f"multipart/x-mixed-replace; boundary={BOUNDARY}"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def part_header(frame: VideoFrame, length: int) -> bytes:
    """The boundary line and headers that come before one JPEG picture."""
    return (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {length}\r\n"
            f"X-Frame-Index: {frame.index}\r\nX-Pts: {frame.pts}\r\n\r\n").encode("ascii")


def mjpeg_handler(session: Session, *, jpeg: SharedJpeg | None = None, capacity: int | None = None) -> Handler:
    """An aiohttp GET handler streaming `session`'s frames as MJPEG until the stream ends or the client leaves.

    `jpeg`: the JPEG cache (default: the process's, shared with the websocket viewers); `capacity`: frames each
    client's mailbox holds (default: the session's frame_capacity).
    """
    cache = jpeg if jpeg is not None else SHARED

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            frames: Mailbox[VideoFrame] = session.frames.subscribe(capacity)
        except SessionClosed:
            raise web.HTTPServiceUnavailable(text=f"session {session.id} is closed") from None
        sent = 0
        try:
            response = web.StreamResponse(headers={
                "Content-Type": CONTENT_TYPE, "Cache-Control": "no-cache, no-store, must-revalidate",
                "Pragma": "no-cache", "X-Accel-Buffering": "no",
            })
            await response.prepare(request)
            while True:
                try:
                    frame = await frames.get()
                except SessionClosed:  # the stream ended: so does the response
                    break
                data = await cache.encode_async(frame)
                await response.write(part_header(frame, len(data)) + data + b"\r\n")
                sent += 1
        except ConnectionError:  # the client went away (aiohttp's ClientConnectionResetError is one)
            pass
        finally:
            session.frames.unsubscribe(frames)
            log.info("session %s: MJPEG client %s left after %d frames (%d dropped)", session.id, request.remote,
                     sent, frames.dropped)
        return response

    return handler
