"""The live server: one process, one session, many clients (aiohttp).

    GET /          the page in web/ (index.html); GET /web/<file> the rest of web/
    GET /ws        websocket for programs: ?format=jpeg|rgb (default jpeg), ?token=<token> to steer
                   binary frames and JSON events down, JSON controls up (stream/control.py, stream/sinks/websocket.py)
    GET /metrics   Prometheus text: the session's StreamMetrics plus viewer counts and per-viewer drops
    GET /mjpeg     multipart/x-mixed-replace JPEG for OBS browser/media sources (stream/sinks/mjpeg.py)
    GET /ingest    websocket up: input video for video-to-video (a session started with `--input ws`), ?token=<token>
                   required; binary messages, one picture each (6-byte header + raw RGB or JPEG, see
                   stream/live_input.py), JSON errors down (stream/control.py's error reply, `seq` counting messages)
    POST /whep     WebRTC (WHEP): SDP offer in, 201 + SDP answer + Location /whep/<id> out; DELETE /whep/<id> ends
                   the peer. Video on a track, the same JSON events and controls on a "control" data channel
                   (stream/sinks/webrtc.py); `Authorization: Bearer <token>` or ?token= to steer

Binds 127.0.0.1 by default. A browser's websocket must come from an allowed origin (default: this server's own
address); programs send no Origin header and are let in. Watching needs no token; steering and ingest do. One
ingest client at a time: a new one replaces the one before (it is closed with a reason), so a camera page that lost
its connection gets back in at once instead of waiting for the dead one to time out. A picture larger than
`max_ingest_bytes` gets an error reply; one past `INGEST_HARD_FACTOR` times that closes its connection. WebRTC offers
`ice_host` as its only host candidate (default: the bind address; this pins aioice process-wide, see
webrtc.pin_ice_host), and no STUN/TURN server unless `ice_servers` names some.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from aiohttp import WSMsgType, web

import framecast.web

from framecast.models.errors import BadMessage, ConfigError
from framecast.stream.control import DEFAULT_MAX_BYTES, encode, encode_error
from framecast.stream.live_input import LiveVideo, decode_ingest_frame
from framecast.stream.metrics import PROMETHEUS_CONTENT_TYPE
from framecast.stream.session import Session
from framecast.stream.sinks.mjpeg import mjpeg_handler
from framecast.stream.sinks.webrtc import WhepConfig, WhepEndpoint, add_whep_routes
from framecast.stream.sinks.websocket import FrameFormat, WebSocketViewer

log = logging.getLogger("framecast.server")

WEB_ROOT = Path(framecast.web.__file__).resolve().parent  # package data: found in non-editable installs too
HARD_MESSAGE_FACTOR = 16  # messages up to this many times the control limit get an error reply; larger ones close
OUTPUT_NICENESS = 10  # CFS weight 110 vs 1024: under contention the generation thread gets ~90% of a core
DEFAULT_MAX_INGEST_BYTES = 8 << 20  # a raw 1920x1080 RGB picture (6.2 MB) fits
INGEST_HARD_FACTOR = 2  # picture messages up to this many times max_ingest_bytes get an error reply; larger ones close
INGEST_REPLACED = 4000  # websocket close code (application range): a newer ingest client took over
SESSION_KEY = web.AppKey("session", Session)
WHEP_KEY = web.AppKey("whep", WhepEndpoint)


def _relay_metrics(session: Session, whep: WhepEndpoint) -> str:
    lines = [
        "# HELP framecast_webrtc_peers WebRTC (WHEP) peers now (each is also counted in framecast_viewers).",
        "# TYPE framecast_webrtc_peers gauge",
        f"framecast_webrtc_peers {len(whep.peers)}",
        "# HELP framecast_viewers Viewers connected now.",
        "# TYPE framecast_viewers gauge",
        f"framecast_viewers {session.frames.viewers}",
        "# HELP framecast_viewer_frames_dropped_total Frames viewers skipped because they read too slowly.",
        "# TYPE framecast_viewer_frames_dropped_total counter",
        f"framecast_viewer_frames_dropped_total {session.frames.dropped_total}",
        "# HELP framecast_controls_total Controls acknowledged, by outcome.",
        "# TYPE framecast_controls_total counter",
        f'framecast_controls_total{{outcome="applied"}} {session.controls_applied}',
        f'framecast_controls_total{{outcome="superseded"}} {session.controls_superseded}',
    ]
    video = session.video
    if video is not None:
        frames = video.frames
        lines += [
            "# HELP framecast_input_frames_total Input video frames, by what became of them.",
            "# TYPE framecast_input_frames_total counter",
            f'framecast_input_frames_total{{outcome="received"}} {frames.received}',
            f'framecast_input_frames_total{{outcome="dropped"}} {frames.dropped}',
            f'framecast_input_frames_total{{outcome="repeated"}} {frames.repeated}',
            "# HELP framecast_input_stalls_total Chunks whose input had no new frame (the last one was repeated).",
            "# TYPE framecast_input_stalls_total counter",
            f"framecast_input_stalls_total {frames.stalls}",
        ]
    return "\n".join(lines) + "\n"


class IngestEndpoint:
    """/ingest: one websocket client at a time pushes pictures into the session's live video input."""

    def __init__(self, session: Session, video: LiveVideo, max_message_bytes: int) -> None:
        self.session, self.video, self.max_message_bytes = session, video, max_message_bytes
        self.client: web.WebSocketResponse | None = None
        self._closing: set[asyncio.Task] = set()  # replaced clients' closes in flight (held so they finish)

    async def serve(self, ws: web.WebSocketResponse, peer: str) -> None:
        previous, self.client = self.client, ws
        if previous is not None and not previous.closed:
            log.info("session %s: ingest client replaced by %s", self.session.id, peer)
            # closed in the background: a dead peer can hold close() for aiohttp's timeout; the new client goes on now
            closing = asyncio.create_task(previous.close(code=INGEST_REPLACED, message=b"replaced by a newer ingest client"))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        config = self.video.frames.config
        await ws.send_str(encode("hello", session=self.session.id, width=config.width, height=config.height,
                                 max_bytes=self.max_message_bytes, formats=["rgb", "jpeg"]))
        loop = asyncio.get_running_loop()
        seq = 0
        try:
            async for message in ws:
                if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    continue  # aiohttp answers pings and handles close frames itself
                seq += 1
                try:
                    if message.type is WSMsgType.TEXT:
                        raise BadMessage("ingest takes binary picture messages (6-byte header + RGB or JPEG)")
                    if len(message.data) > self.max_message_bytes:
                        raise BadMessage(f"picture message of {len(message.data)} bytes; the limit is "
                                         f"{self.max_message_bytes}")
                    rgb = await loop.run_in_executor(None, decode_ingest_frame, message.data, config.width,
                                                     config.height)  # off the loop: a big JPEG takes milliseconds
                    self.video.frames.put(rgb)
                except BadMessage as exc:
                    log.info("session %s: ingest message %d from %s refused: %s", self.session.id, seq, peer, exc)
                    await ws.send_str(encode_error(seq, str(exc)))
        finally:
            if self.client is ws:
                self.client = None


def output_executor(niceness: int) -> concurrent.futures.ThreadPoolExecutor:
    """Threads for output encoding that yield the CPU to generation: a late frame costs every viewer, a slower
    encode only delays one (Linux: niceness is per thread; raising it needs no privilege)."""

    def lower_priority() -> None:
        if hasattr(os, "setpriority"):
            tid = threading.get_native_id()
            try:
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
            except OSError as exc:  # not permitted here: encode at normal priority
                log.warning("could not lower the output threads' priority: %s", exc)

    return concurrent.futures.ThreadPoolExecutor(thread_name_prefix="framecast-output", initializer=lower_priority)


def create_app(
    session: Session,
    *,
    allowed_origins: Iterable[str] | None = None,
    max_message_bytes: int = DEFAULT_MAX_BYTES,
    web_root: Path = WEB_ROOT,
    ice_host: str = "127.0.0.1",
    ice_servers: Sequence[str] = (),
    max_peers: int = 16,
    output_niceness: int = OUTPUT_NICENESS,
    max_ingest_bytes: int = DEFAULT_MAX_INGEST_BYTES,
) -> web.Application:
    """The aiohttp application serving `session`; it starts the session on startup and closes it on cleanup.

    `allowed_origins`: browser origins allowed on /ws (default: the origin the request was addressed to).
    `ice_host`: the address WebRTC peers are offered (pinned process-wide, see webrtc.pin_ice_host; 0.0.0.0: every
    interface but loopback, as aioice picks); `ice_servers`: STUN/TURN URLs (see webrtc.ice_server);
    `max_peers`: WebRTC peers at once (more get 503). `output_niceness`: how much lower the priority of the
    encoding threads (the loop's default executor: JPEG, aiortc's VP8/H264) is than the generation thread's
    (0: the same). `max_ingest_bytes`: the largest /ingest picture message (a session with `--input ws`).

    Raises:
        ConfigError: max_message_bytes or max_ingest_bytes < 64, max_peers < 1, a bad ICE server URL or an ice_host
            that does not resolve.
    """
    for name, value in (("max_message_bytes", max_message_bytes), ("max_ingest_bytes", max_ingest_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 64:
            raise ConfigError(f"{name}={value!r} must be an integer >= 64")
    origins = None if allowed_origins is None else frozenset(allowed_origins)
    app = web.Application()
    whep = WhepEndpoint(session, WhepConfig(ice_host=ice_host, ice_servers=tuple(ice_servers), max_peers=max_peers,
                                            max_message_bytes=max_message_bytes))
    app[SESSION_KEY] = session
    app[WHEP_KEY] = whep

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(web_root / "index.html")

    async def metrics(request: web.Request) -> web.Response:
        text = session.metrics.to_prometheus() + _relay_metrics(session, whep)
        return web.Response(body=text.encode(), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})

    def check_origin(request: web.Request) -> None:
        origin = request.headers.get("Origin")
        allowed = origins if origins is not None else {f"{request.scheme}://{request.host}"}
        if origin is not None and origin not in allowed:
            raise web.HTTPForbidden(text=f"origin {origin!r} is not allowed")

    async def websocket(request: web.Request) -> web.StreamResponse:
        check_origin(request)
        name = request.query.get("format", FrameFormat.JPEG.value)
        try:
            frame_format = FrameFormat(name)
        except ValueError:
            raise web.HTTPBadRequest(text=f"format={name!r} must be one of {[f.value for f in FrameFormat]}") from None
        ws = web.WebSocketResponse(max_msg_size=HARD_MESSAGE_FACTOR * max_message_bytes, heartbeat=20.0)
        await ws.prepare(request)
        viewer = WebSocketViewer(ws, session, format=frame_format, token=request.query.get("token"),
                                 max_message_bytes=max_message_bytes, peer=str(request.remote))
        await viewer.serve()
        return ws

    ingest_endpoint = None
    if session.video is not None and session.video.takes_ingest:
        ingest_endpoint = IngestEndpoint(session, session.video, max_ingest_bytes)

    async def ingest(request: web.Request) -> web.StreamResponse:
        if ingest_endpoint is None:
            raise web.HTTPConflict(text="this session takes no websocket video input (start it with --input ws)")
        check_origin(request)
        if not session.can_steer(request.query.get("token")):
            raise web.HTTPForbidden(text="ingest needs the session token (?token=...)")
        ws = web.WebSocketResponse(max_msg_size=INGEST_HARD_FACTOR * max_ingest_bytes, heartbeat=20.0)
        await ws.prepare(request)
        await ingest_endpoint.serve(ws, str(request.remote))
        return ws

    async def start(app: web.Application) -> None:
        if output_niceness:
            asyncio.get_running_loop().set_default_executor(output_executor(output_niceness))
        session.start()

    async def stop(app: web.Application) -> None:
        await asyncio.to_thread(session.close)

    async def close_sockets(app: web.Application) -> None:
        session.frames.close()  # viewers' mailboxes end, so their handlers return before cleanup waits on them
        session.events.close()
        if ingest_endpoint is not None and ingest_endpoint.client is not None:
            await ingest_endpoint.client.close(message=b"server shutting down")

    app.router.add_get("/", index)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/ingest", ingest)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/mjpeg", mjpeg_handler(session))
    app.router.add_static("/web/", web_root)
    add_whep_routes(app, whep)  # its shutdown hook ends the peers
    app.on_startup.append(start)
    app.on_shutdown.append(close_sockets)
    app.on_cleanup.append(stop)
    return app


def viewer_url(host: str, port: int, token: str | None = None) -> str:
    """The page's address (with the steering token when given)."""
    return f"http://{host}:{port}/" + (f"?token={token}" if token else "")


async def serve(session: Session, host: str = "127.0.0.1", port: int = 8000, *,
                announce: Callable[[str], None] = print, **app_options) -> None:
    """Serve until cancelled; prints the URL with the token (anyone with it can steer).

    WebRTC peers are offered the bind address unless `ice_host` says otherwise (see create_app).
    """
    app_options.setdefault("ice_host", host)
    runner = web.AppRunner(create_app(session, **app_options))
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1] if port == 0 else port
        announce(f"framecast: streaming at {viewer_url(host, bound_port, session.token)}")
        announce(f"framecast: programs: ws://{host}:{bound_port}/ws?format=jpeg&token={session.token}")
        announce(f"framecast: WebRTC (WHEP): http://{host}:{bound_port}/whep (Authorization: Bearer {session.token})")
        if session.video is not None and session.video.takes_ingest:
            announce(f"framecast: video input: ws://{host}:{bound_port}/ingest?token={session.token}")
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run_server(session: Session, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Blocking: serve `session` until Ctrl-C."""
    try:
        asyncio.run(serve(session, host, port, **options))
    except KeyboardInterrupt:
        pass
