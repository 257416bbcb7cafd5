"""The live server end to end on 127.0.0.1: a real session (tiny DiT, random weights, preview decoder, 64x64 px,
16 fps run 16x faster than real time), real sockets, aiohttp clients."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable

import aiohttp
import pytest
import torch
from aiohttp.test_utils import TestServer

from framecast.models.config import preset
from framecast.models.dit import CausalWanDiT
from framecast.models.preview import PreviewDecoder
from framecast.models.text import HashedTextEncoder
from framecast.stream.engine import EngineConfig, StreamEngine
from framecast.stream.metrics import PROMETHEUS_CONTENT_TYPE
from framecast.stream.server import create_app, output_executor
from framecast.stream.session import Session, SessionConfig
from framecast.stream.sinks.websocket import FrameHeader, unpack_frame

TOKEN = "s3cret"
TICKS_PER_FRAME = 5625  # 90 kHz at 16 fps


# the tiny model is fastest on one thread, and the event loop needs a core
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def make_session(**options) -> Session:
    torch.manual_seed(0)
    dit = CausalWanDiT(dataclasses.replace(preset("tiny"), num_actions=4)).float().eval()
    text = HashedTextEncoder(dit.config.text_dim, dit.config.text_len)
    engine = StreamEngine(dit, EngineConfig(latent_height=8, latent_width=8), text.encode("a quiet lake at dawn"))
    config = SessionConfig(**{"fps": 16, "speed": 16.0, "latency_budget_s": 0.5, **options})
    return Session(engine, PreviewDecoder(dit.config.out_dim), text.encode, config, token=TOKEN, session_id="test")


class Client:
    """A websocket program: collects frame headers and JSON messages."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[FrameHeader] = []
        self.messages: list[dict] = []
        self.sent = 0

    async def send(self, payload: dict | str | bytes) -> int:
        """Send one message; returns its seq (the server counts them from 1)."""
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        await (self.ws.send_bytes(payload) if isinstance(payload, bytes) else self.ws.send_str(payload))
        self.sent += 1
        return self.sent

    async def until(self, done: Callable[[], bool], timeout_s: float = 10.0) -> None:
        async def receive() -> None:
            while not done():
                message = await self.ws.receive()
                if message.type is aiohttp.WSMsgType.BINARY:
                    self.frames.append(unpack_frame(message.data)[0])
                elif message.type is aiohttp.WSMsgType.TEXT:
                    self.messages.append(json.loads(message.data))
                else:
                    raise AssertionError(f"connection ended: {message.type} {message.data}")

        await asyncio.wait_for(receive(), timeout_s)

    def of_type(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == kind]

    def reply(self, seq: int) -> dict | None:
        return next((m for m in self.messages if m["type"] in ("ack", "error") and m["seq"] == seq), None)

    async def reply_to(self, seq: int) -> dict:
        await self.until(lambda: self.reply(seq) is not None)
        return self.reply(seq)

    async def more_frames(self, count: int) -> None:
        target = len(self.frames) + count
        await self.until(lambda: len(self.frames) >= target)


def serve(test: Callable, **app_options) -> None:
    """Run `await test(server, http, session)` against a live server on 127.0.0.1."""

    async def main() -> None:
        session = make_session()
        server = TestServer(create_app(session, **app_options), host="127.0.0.1", port=0)
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                await test(server, http, session)
        finally:
            await server.close()
        assert not session.is_running and session.failure is None

    asyncio.run(main())


async def connect(server: TestServer, http: aiohttp.ClientSession, query: str = "format=rgb", **options) -> Client:
    client = Client(await http.ws_connect(server.make_url(f"/ws?{query}"), **options))
    await client.until(lambda: bool(client.of_type("hello")))
    return client


def test_a_client_plays_300_frames_with_actions_and_prompt_switches_each_acknowledged() -> None:
    async def test(server, http, session) -> None:
        client = await connect(server, http, f"format=rgb&token={TOKEN}")
        assert client.of_type("hello")[0] | {"session": "test"} == {
            "v": 1, "type": "hello", "session": "test", "can_steer": True, "fps": "16", "format": "rgb",
            "num_actions": 4, "paused": False, "latency_budget_s": 0.5,
        }
        prompts = ["a red fox in snow", "a city at night", "waves on a beach"]
        seqs = []
        while len(client.frames) < 300:
            await client.more_frames(25)
            turn = len(seqs)
            seqs.append(await client.send({"v": 1, "type": "action", "action": turn % 4, "id": f"a{turn}"}))
            seqs.append(await client.send({"v": 1, "type": "prompt", "text": prompts[turn % 3], "id": f"p{turn}"}))
        acks = [await client.reply_to(seq) for seq in seqs]
        assert all(ack["type"] == "ack" and isinstance(ack["chunk"], int) for ack in acks)
        assert [ack["control"] for ack in acks] == ["action", "prompt"] * (len(seqs) // 2)
        assert [ack["chunk"] for ack in acks] == sorted(ack["chunk"] for ack in acks)

        def generated() -> set[int]:
            return {event["chunk"] for event in client.of_type("chunk") if event["chunk"] is not None}

        await client.until(lambda: acks[-1]["chunk"] in generated())
        assert {ack["chunk"] for ack in acks} <= generated()  # each took effect at a chunk that was then streamed
        indices = [frame.index for frame in client.frames]
        assert indices == sorted(set(indices)) and len(indices) >= 300
        assert all(frame.pts == frame.index * TICKS_PER_FRAME for frame in client.frames)
        assert {(frame.width, frame.height) for frame in client.frames} == {(64, 64)}
        assert session.prompt_switches >= 1

    serve(test)


def test_bad_messages_get_error_replies_and_the_stream_goes_on_for_every_client(caplog) -> None:
    caplog.set_level(logging.INFO, logger="framecast")

    async def test(server, http, session) -> None:
        steerer = await connect(server, http, f"format=rgb&token={TOKEN}")
        other = await connect(server, http, "format=jpeg")
        await steerer.more_frames(5)
        bad = [
            ("{not json", "message is not JSON: Expecting property name enclosed in double quotes at character 1"),
            ("x" * 300, "message is 300 bytes; the limit is 256"),
            ('{"v": 1, "type": "jump"}',
             "unknown type 'jump'; expected one of action, pause, prompt, resume, seed, steps"),
            ('{"v": 2, "type": "pause"}', "unsupported version v=2; this server speaks v=1"),
            ('{"v": 1, "type": "prompt"}', "prompt: missing field 'text'"),
            ('{"v": 1, "type": "prompt", "text": ""}', "prompt: field 'text' is empty"),
            ('{"v": 1, "type": "prompt", "text": "' + "a" * 1001 + '"}', None),  # too large before too long
            ('{"v": 1, "type": "action", "action": 9}', "action: field 'action' is 9; this model's actions are 0..3"),
        ]
        for raw, error in bad:
            reply = await steerer.reply_to(await steerer.send(raw))
            assert reply["type"] == "error"
            if error is not None:
                assert reply["error"] == error
        reply = await steerer.reply_to(await steerer.send('{"v": 1, "type": "prompt", "text": "' + "a " * 40 + '"}'))
        assert reply["error"] == "prompt: prompt has 40 words; this model reads at most 16"  # from the encoder
        watcher_seq = await other.send({"v": 1, "type": "prompt", "text": "a fox", "id": "w"})
        assert await other.reply_to(watcher_seq) == {
            "v": 1, "type": "error", "seq": 1, "id": "w",
            "error": "prompt: not allowed without the session token (this connection can only watch)",
        }
        ok = await steerer.reply_to(await steerer.send({"v": 1, "type": "prompt", "text": "a fox", "id": "ok"}))
        assert ok["type"] == "ack" and ok["id"] == "ok" and isinstance(ok["chunk"], int)
        await steerer.more_frames(20)  # the stream goes on for both
        await other.more_frames(20)
        assert not steerer.ws.closed and not other.ws.closed

    serve(test, max_message_bytes=256)
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("framecast")]
    assert sum("session test: control message" in m and "refused" in m for m in logged) == 9  # 8 bad + watcher
    assert any(m.startswith("session test: prompt control refused at chunk") for m in logged)


def test_a_message_past_the_hard_limit_closes_only_its_own_connection() -> None:
    async def test(server, http, session) -> None:
        other = await connect(server, http)
        sender = await connect(server, http, f"token={TOKEN}")
        await sender.send("x" * (16 * 256 + 1))  # past the socket's hard limit: 16 x the control limit
        with pytest.raises(AssertionError, match="connection ended"):
            await sender.until(lambda: False, timeout_s=5)
        assert sender.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        await other.more_frames(20)
        assert session.is_running

    serve(test, max_message_bytes=256)


def test_a_long_prompt_is_refused_by_length() -> None:
    async def test(server, http, session) -> None:
        client = await connect(server, http, f"token={TOKEN}")
        reply = await client.reply_to(await client.send({"v": 1, "type": "prompt", "text": "a" * 1001}))
        assert reply["error"] == "prompt: field 'text' has 1001 characters; the limit is 1000"

    serve(test)


def test_a_client_that_vanishes_mid_stream_leaves_the_others_streaming() -> None:
    async def test(server, http, session) -> None:
        stayer = await connect(server, http)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"GET /ws?format=rgb HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        await asyncio.wait_for(reader.readexactly(40_000), 5)  # a few frames in
        assert session.frames.viewers == 2
        writer.transport.abort()  # gone: no close frame, a reset connection
        deadline = time.monotonic() + 5
        while session.frames.viewers != 1:
            assert time.monotonic() < deadline, "the vanished viewer was never unsubscribed"
            await asyncio.sleep(0.01)
        await stayer.more_frames(30)
        assert session.is_running

    serve(test)


def test_1000_prompt_switches_in_one_second_are_coalesced_and_each_acknowledged() -> None:
    async def test(server, http, session) -> None:
        client = await connect(server, http, f"token={TOKEN}")
        await client.more_frames(3)
        start = time.monotonic()
        seqs = [await client.send({"v": 1, "type": "prompt", "text": f"fox number {i}", "id": i}) for i in range(1000)]
        assert time.monotonic() - start < 1.0
        await client.until(lambda: client.reply(seqs[-1]) is not None)
        acks = [client.reply(seq) for seq in seqs]
        assert all(ack["type"] == "ack" and isinstance(ack["chunk"], int) for ack in acks)
        assert [ack["id"] for ack in acks] == list(range(1000))
        applied = [ack for ack in acks if not ack["superseded"]]
        assert acks[-1] in applied  # the newest always applies
        assert len(applied) == session.prompt_switches < 100  # coalesced: one encode + recache per boundary
        assert {ack["chunk"] for ack in acks} == {ack["chunk"] for ack in applied}  # superseded at a real switch
        await client.more_frames(12)  # and the stream goes on

    serve(test)


def test_pause_holds_the_stream_and_resume_continues_it_without_a_gap() -> None:
    async def test(server, http, session) -> None:
        client = await connect(server, http, f"token={TOKEN}")
        await client.more_frames(10)
        pause = await client.reply_to(await client.send({"v": 1, "type": "pause"}))
        assert pause["control"] == "pause" and session.is_paused
        deadline = time.monotonic() + 3
        while True:  # the frames made before the pause drain (at most a budget's worth), then nothing comes
            assert time.monotonic() < deadline, "frames kept coming while paused"
            held = len(client.frames)
            try:
                await client.until(lambda: len(client.frames) > held, timeout_s=0.3)  # 4.8 s of media time
            except asyncio.TimeoutError:
                break
        resume = await client.reply_to(await client.send({"v": 1, "type": "resume"}))
        assert resume["chunk"] == pause["chunk"]  # nothing was generated in between
        await client.more_frames(20)
        # media time stood still: the stream goes on from the next frame, on time (gaps only where this viewer
        # skipped frames, counted in the header)
        before, after = client.frames[held - 1], client.frames[held]
        assert after.index - before.index - 1 == after.dropped - before.dropped
        resumed = next(event for event in client.of_type("chunk") if event["first_frame"] > before.index)
        assert resumed["action"] == "generate" and resumed["chunk"] == pause["chunk"] and resumed["slack_s"] > 0

    serve(test)


def test_metrics_page_origin_check_and_format_choice() -> None:
    async def test(server, http, session) -> None:
        client = await connect(server, http, "format=jpeg")
        await client.more_frames(5)
        async with http.get(server.make_url("/metrics")) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == PROMETHEUS_CONTENT_TYPE
            text = await response.text()
        assert "# TYPE framecast_sink_frames_total counter" in text
        assert "framecast_viewers 1" in text and "framecast_viewer_frames_dropped_total" in text
        async with http.get(server.make_url("/")) as response:
            assert response.status == 200 and "<title>FrameCast</title>" in await response.text()
        for asset in ("studio.js", "studio.css"):
            async with http.get(server.make_url(f"/web/{asset}")) as response:
                assert response.status == 200, asset
        async with http.get(server.make_url("/mjpeg")) as response:
            assert response.status == 200 and response.content_type == "multipart/x-mixed-replace"
            assert (await response.content.readuntil(b"\xff\xd9")).count(b"\xff\xd8") == 1  # one whole JPEG
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(server.make_url("/ws"), origin="http://evil.example")
        assert info.value.status == 403
        own = f"http://127.0.0.1:{server.port}"
        allowed = await connect(server, http, "format=rgb", origin=own)
        await allowed.more_frames(2)
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(server.make_url("/ws?format=png"))
        assert info.value.status == 400

    serve(test)


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread niceness is a POSIX feature")
def test_output_threads_yield_the_cpu_to_generation() -> None:
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    own = niceness()
    with output_executor(5) as executor:
        assert executor.submit(niceness).result() == min(19, own + 5)
    assert niceness() == own  # the caller's thread keeps its priority
