"""Websocket video input end to end on 127.0.0.1: a real session running video-to-video (tiny DiT and tiny Wan VAE
encoder, random weights, 32x32 px, 16 fps at 4x real time), a client pushing pictures to /ingest, a viewer on /ws."""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
from collections.abc import Callable

import aiohttp
import numpy as np
import pytest
import torch
from aiohttp.test_utils import TestServer
from PIL import Image

from framecast.models.config import preset
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import ConfigError
from framecast.models.preview import PreviewDecoder
from framecast.models.text import HashedTextEncoder
from framecast.models.vae import VAE_PRESETS, WanVAE, WanVAEEncodeStream
from framecast.stream.cli import main
from framecast.stream.engine import EngineConfig, StreamEngine
from framecast.stream.live_input import InputKind, InputSpec, LiveFrames, LiveFramesConfig, LiveVideo, pack_ingest_frame
from framecast.stream.server import INGEST_REPLACED, create_app
from framecast.stream.session import Session, SessionConfig
from framecast.stream.simulator import PixelDecoder, SimulatorConfig, WorldSimulator
from framecast.stream.sources import LatentSource

TOKEN = "s3cret"
SIZE = 32  # pixels; 4x4 latents
MAX_INGEST_BYTES = 16 << 10


# the tiny models are fastest on one thread, and the event loop needs a core
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


class RecordingEngine(StreamEngine):
    """A real engine that also keeps the source latents it was given (warm-up's included)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sources: list[torch.Tensor] = []

    def next_chunk(self, steps=None, source=None):
        self.sources.append(source)
        return super().next_chunk(steps, source=source)


class RecordingFrames(LiveFrames):
    """The real live buffer, keeping every group it handed out."""

    def __init__(self, config: LiveFramesConfig) -> None:
        super().__init__(config)
        self.groups: list[np.ndarray] = []

    def take(self, count: int):
        group = super().take(count)
        if group is not None:
            self.groups.append(group)
        return group


def tiny_vae() -> WanVAE:
    torch.manual_seed(1)
    return WanVAE(VAE_PRESETS["tiny"], encoder=True).float().eval()


def make_v2v_session(spec: InputSpec = InputSpec(InputKind.WEBSOCKET)) -> Session:
    torch.manual_seed(0)
    dit = CausalWanDiT(preset("tiny")).float().eval()
    text = HashedTextEncoder(dit.config.text_dim, dit.config.text_len)
    config = EngineConfig(latent_height=SIZE // 8, latent_width=SIZE // 8, denoising_steps=(700, 500))
    engine = RecordingEngine(dit, config, text.encode("a quiet lake at dawn"))
    frames = RecordingFrames(LiveFramesConfig(width=SIZE, height=SIZE, max_wait_s=0.05))
    video = LiveVideo(spec, frames, LatentSource(WanVAEEncodeStream(tiny_vae()), frames, config.chunk_frames))
    session_config = SessionConfig(fps=16, speed=4.0, latency_budget_s=0.5)
    return Session(engine, PreviewDecoder(dit.config.out_dim), text.encode, session_config, token=TOKEN,
                   session_id="v2v", video=video)


def serve(test: Callable, session: Session | None = None) -> None:
    """Run `await test(server, http, session)` against a live server on 127.0.0.1."""

    async def main() -> None:
        live = session or make_v2v_session()
        app = create_app(live, max_ingest_bytes=MAX_INGEST_BYTES)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                await test(server, http, live)
        finally:
            await server.close()
        assert not live.is_running and live.failure is None

    asyncio.run(main())


async def eventually(done: Callable[[], bool], timeout_s: float = 10.0, every: Callable | None = None) -> None:
    """Wait until `done()`; awaits `every()` (e.g. a send) between checks."""
    async def poll() -> None:
        while not done():
            if every is not None:
                await every()
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout_s)


async def next_json(ws: aiohttp.ClientWebSocketResponse) -> dict:
    message = await asyncio.wait_for(ws.receive(), 5)
    assert message.type is aiohttp.WSMsgType.TEXT, (message.type, message.data)
    return json.loads(message.data)


SOF_16x16 = b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x10\x00\x10"  # SOI, then a start-of-frame segment for 16x16


def jpeg_of(rgb: np.ndarray) -> bytes:
    """JPEG bytes through PIL (an encoder independent of the server's PyAV decoder)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_pictures_sent_to_ingest_are_what_the_engine_denoises_from() -> None:
    rng = np.random.default_rng(0)
    first = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)  # raw RGB at the model size: exact pixels
    second = np.full((48, 64, 3), (200, 40, 90), np.uint8)  # JPEG at another size: resized by the server

    async def test(server, http, session) -> None:
        frames: RecordingFrames = session.video.frames
        viewer = await http.ws_connect(server.make_url("/ws?format=rgb"))
        ws = await http.ws_connect(server.make_url(f"/ingest?token={TOKEN}"))
        hello = await next_json(ws)
        assert (hello["type"], hello["width"], hello["height"]) == ("hello", SIZE, SIZE)

        def group_of(picture: Callable[[np.ndarray], bool]) -> bool:
            return any(picture(group) for group in list(frames.groups))

        await eventually(lambda: group_of(lambda g: (g == first).all()),
                         every=lambda: ws.send_bytes(pack_ingest_frame(first)))
        jpeg = pack_ingest_frame(jpeg=jpeg_of(second), size=(64, 48))
        await eventually(lambda: group_of(lambda g: (np.abs(g.astype(int) - second[0, 0]) <= 3).all()),
                         every=lambda: ws.send_bytes(jpeg))
        frames_seen = 0
        async for message in viewer:  # the stream is on: viewers get frames
            frames_seen += message.type is aiohttp.WSMsgType.BINARY
            if frames_seen == 3:
                break
        await ws.close()
        await viewer.close()

    session = make_v2v_session()
    serve(test, session)
    engine: RecordingEngine = session.engine
    groups = session.video.frames.groups
    warm_up = 2 * len(session.scheduler.config.step_lists)  # each step list twice, from a still gray input
    assert len(engine.sources) == warm_up + len(groups)
    assert [len(g) for g in groups[:2]] == [9, 12]  # 1 + 4(3-1) video frames for the first chunk, 4 * 3 after
    # the engine denoised exactly the encoder's latents of the frames taken, chunk by chunk (time context carried)
    replay = LatentSource(WanVAEEncodeStream(tiny_vae()), iter(()), chunk_frames=3)
    for group, received in zip(groups, engine.sources[warm_up:]):
        torch.testing.assert_close(received, replay.encode(group), rtol=0, atol=0)
    assert session.video.frames.received >= 2


def test_bad_pictures_get_errors_on_their_connection_and_the_stream_goes_on() -> None:
    async def test(server, http, session) -> None:
        frames = session.video.frames
        for query in ("", "?token=wrong"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(server.make_url(f"/ingest{query}"))
            assert refused.value.status == 403
        viewer = await http.ws_connect(server.make_url("/ws?format=rgb"))
        ws = await http.ws_connect(server.make_url(f"/ingest?token={TOKEN}"))
        assert (await next_json(ws))["type"] == "hello"
        good = pack_ingest_frame(np.zeros((SIZE, SIZE, 3), np.uint8))
        bad = {
            b"\x01": "frame message is 1 bytes; the header alone is 6",
            b"\x02\x01\x10\x00\x10\x00": "frame header version 2; expected 1",
            b"\x01\x07\x10\x00\x10\x00": "frame format code 7",
            b"\x01\x00\x10\x00\x10\x00abc": "raw frame of 3 bytes; 16x16 RGB needs 768",
            b"\x01\x01\x10\x00\x10\x00not a jpeg": "JPEG frame has no start-of-frame marker",
            b"\x01\x01\x10\x00\x10\x00" + SOF_16x16 + b"garbage": "JPEG frame does not decode",
            pack_ingest_frame(jpeg=jpeg_of(np.zeros((16, 16, 3), np.uint8)), size=(32, 16)):
                "JPEG frame header declares 16x16; the message header says 32x16",
            b"\x01\x01\x10\x00\x10\x00" + b"\xff\xd8\xff\xc0\x00\x11\x08\x3e\x80\x3e\x80":  # claims 16000x16000
                "JPEG frame header declares 16000x16000; the message header says 16x16",
            b"\x01\x00\x00\x00\x10\x00": "frame size 0x16",
            b"\x01\x00" + bytes(MAX_INGEST_BYTES): f"picture message of {MAX_INGEST_BYTES + 2} bytes; the limit is",
        }
        for seq, (message, error) in enumerate(bad.items(), start=1):
            await ws.send_bytes(message)
            reply = await next_json(ws)
            assert (reply["type"], reply["seq"]) == ("error", seq) and error in reply["error"], reply
        await ws.send_str('{"v": 1, "type": "prompt", "text": "x"}')
        assert "ingest takes binary picture messages" in (await next_json(ws))["error"]
        received = frames.received
        await ws.send_bytes(good)  # the connection is still good
        await eventually(lambda: frames.received == received + 1)
        # past the hard limit: only this connection closes (1009: message too big)
        await ws.send_bytes(b"\x01\x00" + bytes(2 * MAX_INGEST_BYTES + 1))
        closed = await asyncio.wait_for(ws.receive(), 5)
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        # a second client replaces the first, which is told why
        first = await http.ws_connect(server.make_url(f"/ingest?token={TOKEN}"))
        assert (await next_json(first))["type"] == "hello"
        second = await http.ws_connect(server.make_url(f"/ingest?token={TOKEN}"))
        assert (await next_json(second))["type"] == "hello"
        ended = await asyncio.wait_for(first.receive(), 5)
        assert ended.type is aiohttp.WSMsgType.CLOSE and ended.data == INGEST_REPLACED
        assert ended.extra == "replaced by a newer ingest client"
        received = frames.received
        await second.send_bytes(good)
        await eventually(lambda: frames.received == received + 1)
        frames_seen = 0
        async for message in viewer:  # and the stream went on throughout
            frames_seen += message.type is aiohttp.WSMsgType.BINARY
            if frames_seen == 3:
                break
        metrics = await (await http.get(server.make_url("/metrics"))).text()
        assert 'framecast_input_frames_total{outcome="received"}' in metrics
        for socket in (second, viewer):
            await socket.close()

    serve(test)


def test_a_session_without_video_input_refuses_ingest_and_engines_without_it_refuse_video() -> None:
    async def test(server, http, session) -> None:
        response = await http.get(server.make_url(f"/ingest?token={TOKEN}"))
        assert response.status == 409
        assert "takes no websocket video input (start it with --input ws)" in await response.text()

    text_only = make_v2v_session()
    serve(test, Session(text_only.engine, text_only.decoder, text_only.encode_prompt, SessionConfig(speed=4.0),
                        token=TOKEN))
    simulator = WorldSimulator(SimulatorConfig())
    frames = LiveFrames(LiveFramesConfig(width=SIZE, height=SIZE))
    video = LiveVideo(InputSpec(InputKind.WEBSOCKET), frames,
                      LatentSource(WanVAEEncodeStream(tiny_vae()), frames, chunk_frames=3))
    with pytest.raises(ConfigError, match="WorldSimulator takes no video input"):
        Session(simulator, PixelDecoder(), simulator.encode_prompt, token=TOKEN, video=video)


def test_a_file_input_plays_into_the_engine(tmp_path) -> None:
    from framecast.stream.sinks.file import VideoFileSink

    path = tmp_path / "in.mp4"
    sink = VideoFileSink(path, fps=32)
    sink.write(np.full((16, SIZE, SIZE, 3), (30, 160, 220), np.uint8))
    sink.close()
    session = make_v2v_session(InputSpec(InputKind.FILE, str(path)))
    video, frames = session.video, session.video.frames

    async def test(server, http, session) -> None:
        await eventually(lambda: any((np.abs(g.astype(int) - (30, 160, 220)) <= 4).all() for g in list(frames.groups)))
        assert video.feed.failure is None

    serve(test, session)
    assert not video.feed.is_running  # the session closed its feed


NO_VIDEO63 = not os.path.exists("/dev/video63")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--preset", "tiny", "--input", "ws"], "--input needs --decoder wan-vae --decoder-weights"),
        (["serve", "--preset", "tiny", "--input", "webcam:", "--decoder", "wan-vae", "--decoder-weights", "v.pth"],
         "--input 'webcam:' names no device"),
        (["serve", "--preset", "tiny", "--input", "missing.mp4", "--decoder", "wan-vae", "--decoder-weights", "v.pth"],
         "--input 'missing.mp4': no such file"),
        (["serve", "--family", "rolling-forcing", "--weights", "w", "--input", "ws", "--decoder", "wan-vae",
          "--decoder-weights", "v.pth"], "the rolling-forcing family's rolling-window sampler takes no video input"),
        (["serve", "--simulator", "--input", "ws"], "the simulator takes no video input"),
        (["serve", "--preset", "tiny", "--stream-batch", "--input", "ws"],
         "the stream-batch sampler takes no video input"),
        (["serve", "--input", "ws"], "--input: the world model streams with its trained settings"),
        (["serve", "--preset", "tiny", "--stages", "2", "--device", "cpu", "--input", "ws"],
         "--stages does not take --family, --input or --simulator"),
        (["vcam", "--preset", "tiny", "--input", "ws", "--decoder", "wan-vae", "--decoder-weights", "v.pth"],
         "--input ws needs the server's /ingest endpoint"),
    ],
)
def test_input_flags_are_checked_before_any_model_loads(capsys, argv: list, message: str) -> None:
    assert main([*argv, "--dtype", "float32"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(platform.system() != "Linux" or not NO_VIDEO63, reason="needs Linux without /dev/video63")
def test_serve_with_a_missing_webcam_names_it_and_the_capture_formats(capsys) -> None:
    argv = ["serve", "--preset", "tiny", "--input", "webcam:/dev/video63", "--decoder", "wan-vae",
            "--decoder-weights", "v.pth", "--dtype", "float32"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("framecast: error: cannot open webcam '/dev/video63' with format 'v4l2'")
    assert "avfoundation on macOS, dshow on Windows" in error
