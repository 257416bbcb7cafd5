"""The MJPEG endpoint end to end on 127.0.0.1: a real session (tiny DiT, preview decoder, 16x faster than real time),
an aiohttp app with `GET /mjpeg`, aiohttp clients parsing the multipart stream as OBS or a browser would."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from framecast.stream.session import Session
from framecast.stream.sinks.jpeg import SharedJpeg
from framecast.stream.sinks.mjpeg import BOUNDARY, mjpeg_handler
from tests.stream.test_server import TICKS_PER_FRAME, make_session

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]
    jpeg: bytes

    @property
    def index(self) -> int:
        return int(self.headers["x-frame-index"])


async def read_part(content: aiohttp.StreamReader) -> Part | None:
    """The next part of a multipart/x-mixed-replace body, or None at its end."""
    line = await content.readline()
    if not line:
        return None
    assert line == f"--{BOUNDARY}\r\n".encode()
    headers = {}
    while (line := await content.readline()) != b"\r\n":
        assert line.endswith(b"\r\n"), f"truncated part header {line!r}"
        name, value = line.decode("ascii").split(":", 1)
        headers[name.strip().lower()] = value.strip()
    jpeg = await content.readexactly(int(headers["content-length"]))
    assert await content.readexactly(2) == b"\r\n"
    return Part(headers, jpeg)


async def read_parts(response: aiohttp.ClientResponse, count: int | None, timeout_s: float = 10.0) -> list[Part]:
    """`count` parts, or every part until the response ends (count None)."""
    parts: list[Part] = []

    async def read() -> None:
        while count is None or len(parts) < count:
            part = await read_part(response.content)
            if part is None:
                return
            parts.append(part)

    await asyncio.wait_for(read(), timeout_s)
    return parts


def serve(test: Callable, jpeg: SharedJpeg | None = None, **session_options) -> None:
    """Run `await test(server, http, session)` against an app with GET /mjpeg around a live session."""

    async def main() -> None:
        session = make_session(**session_options)
        app = web.Application()
        app.router.add_get("/mjpeg", mjpeg_handler(session, jpeg=jpeg))

        async def start(app: web.Application) -> None:
            session.start()

        async def end_streams(app: web.Application) -> None:
            session.frames.close()

        async def stop(app: web.Application) -> None:
            await asyncio.to_thread(session.close)

        app.on_startup.append(start)
        app.on_shutdown.append(end_streams)
        app.on_cleanup.append(stop)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                await test(server, http, session)
        finally:
            await server.close()
        assert not session.is_running and session.failure is None

    asyncio.run(main())


def test_a_client_reads_jpeg_parts_of_the_right_size_in_order() -> None:
    async def test(server: TestServer, http: aiohttp.ClientSession, session: Session) -> None:
        async with http.get(server.make_url("/mjpeg")) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == f"multipart/x-mixed-replace; boundary={BOUNDARY}"
            assert "no-cache" in response.headers["Cache-Control"]
            parts = await read_parts(response, 24)
        indices = [part.index for part in parts]
        assert indices == sorted(set(indices)), indices  # in order, none twice
        for part in parts:
            assert part.headers["content-type"] == "image/jpeg"
            assert int(part.headers["x-pts"]) == part.index * TICKS_PER_FRAME
            assert part.jpeg[:2] == b"\xff\xd8" and part.jpeg[-2:] == b"\xff\xd9"
            picture = Image.open(io.BytesIO(part.jpeg))
            assert picture.format == "JPEG" and picture.size == (128, 128)  # 64 px frames, output_scale 2
        assert np.asarray(Image.open(io.BytesIO(parts[0].jpeg))).std() > 0  # a picture, not a blank

    serve(test, output_scale=2)


def test_two_clients_share_one_encode_per_frame_and_each_gets_the_stream_to_its_end() -> None:
    cache = SharedJpeg(capacity=64)  # room enough that no frame is evicted between the two clients' reads

    async def test(server: TestServer, http: aiohttp.ClientSession, session: Session) -> None:
        responses = [await http.get(server.make_url("/mjpeg")) for _ in range(2)]
        try:
            firsts = await asyncio.gather(*(read_parts(r, 16) for r in responses))
            await asyncio.to_thread(session.close)  # the stream ends: each response ends after its last frames
            rests = await asyncio.gather(*(read_parts(r, None) for r in responses))
        finally:
            for response in responses:
                response.release()
        served = [{part.index for part in first + rest} for first, rest in zip(firsts, rests)]
        assert len(served[0] & served[1]) >= 8  # both watched the same frames ...
        assert cache.encodes == len(served[0] | served[1])  # ... and each frame was encoded once, not per client

    serve(test, jpeg=cache)


def test_a_client_that_goes_away_is_unsubscribed() -> None:
    async def test(server: TestServer, http: aiohttp.ClientSession, session: Session) -> None:
        response = await http.get(server.make_url("/mjpeg"))
        await read_parts(response, 3)
        assert session.frames.viewers == 1
        response.close()  # drop the connection without reading on

        async def unsubscribed() -> None:
            while session.frames.viewers:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(unsubscribed(), 5.0)
        async with http.get(server.make_url("/mjpeg")) as again:  # the endpoint still serves newcomers
            assert len(await read_parts(again, 2)) == 2

    serve(test)


def test_a_closed_session_answers_503() -> None:
    async def test(server: TestServer, http: aiohttp.ClientSession, session: Session) -> None:
        await asyncio.to_thread(session.close)
        async with http.get(server.make_url("/mjpeg")) as response:
            assert response.status == 503
            assert await response.text() == "session test is closed"

    serve(test)
