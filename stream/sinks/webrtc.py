"""The WebRTC sink: the live session to browsers and programs over WebRTC, signalled with WHEP (aiortc).

    POST    /whep        body: the SDP offer (Content-Type: application/sdp), ICE gathered in full (no trickle);
                         steering token optional: `Authorization: Bearer <token>` or `?token=`
                         -> 201 Created, Content-Type: application/sdp, Location: /whep/<resource-id>, the answer
    DELETE  /whep/<id>   ends that peer (200; 404 for an unknown id)
    OPTIONS /whep        what the endpoint accepts (204, Allow, Accept-Post)

Refused offers get a text reply naming the problem: 415 (not application/sdp), 413 (too large), 400 (empty,
malformed or truncated SDP, no recv-capable video m-section, no codec in common), 503 (max_peers reached, or the
session is closed). A refusal touches no other peer and not the stream.

Each peer gets:
  * one video track (`RelayTrack`) reading its own mailbox of `session.frames` (capacity 1-2: a slow peer drops
    only its own frames; unsubscribed when the peer ends), each frame sent with its 90 kHz pts. aiortc encodes it
    in a worker thread with the codec the offer prefers among those aiortc sends (VP8, H264 constrained baseline).
  * a data channel the client opens, labelled "control": the same JSON text as the websocket viewers get down
    (hello, acks, errors, chunk events: stream/control.py) and controls up, handled by `ControlInbox` like theirs.

A peer ends on DELETE, when its connection goes failed or closed, when it has not connected within
`connect_timeout_s`, when the stream ends, and on shutdown (`WhepEndpoint.close`).

ICE: aioice offers every interface address except loopback; `pin_ice_host` makes it offer exactly the configured
host instead (process-wide, see there). No STUN or TURN unless `ice_servers` names some (aiortc would otherwise
default to a public STUN server).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import secrets
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING
from urllib.parse import unquote

import aioice.ice
import av
import numpy as np
from aiohttp import web
from aiortc import (
    MediaStreamTrack, RTCConfiguration, RTCDataChannel, RTCIceServer, RTCPeerConnection, RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc import sdp as aiortc_sdp
from aiortc.codecs import get_capabilities
from aiortc.exceptions import InvalidStateError, OperationError
from aiortc.mediastreams import MediaStreamError

from framecast.models.errors import ConfigError, FrameCastError, SessionClosed
from framecast.stream.control import DEFAULT_MAX_BYTES
from framecast.stream.relay import Mailbox, Relay
from framecast.stream.sinks.viewer import ControlInbox

if TYPE_CHECKING:  # both import torch; this module (and the WHEP client that imports it) needs neither at runtime
    from framecast.stream.producer import VideoFrame
    from framecast.stream.session import Session

log = logging.getLogger("framecast.webrtc")

SDP_CONTENT_TYPE = "application/sdp"
CONTROL_LABEL = "control"  # the data channel the client opens for events and controls
HELLO_FORMAT = "webrtc"  # the hello's `format`: frames come on the video track, not as messages
TIME_BASE = Fraction(1, 90_000)  # the media clock's, and RTP's video clock rate
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
_SEND_HIGH_BYTES = 1 << 20  # a peer's data channel backlog above which its event pump waits (its mailbox drops)
_SEND_LOW_BYTES = 1 << 16


# ---- ICE host candidates -------------------------------------------------------------------------------------------

_pinned_hosts: list[str] = []
_pin_lock = threading.Lock()


def _pinned_host_addresses(use_ipv4: bool = True, use_ipv6: bool = True) -> list[str]:
    """Stands in for aioice.ice.get_host_addresses: the pinned addresses of the families asked for."""
    return [address for address in _pinned_hosts if (use_ipv6 if ":" in address else use_ipv4)]


def resolve_ice_host(host: str) -> str:
    """An IP address for `host` (an IP literal as is; a name such as localhost resolved, IPv4 preferred).

    Raises:
        ConfigError: the name does not resolve.
    """
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise ConfigError(f"ice_host={host!r} does not resolve to an address: {exc}") from None
    addresses = [info[4][0] for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
    if not addresses:
        raise ConfigError(f"ice_host={host!r} does not resolve to an IPv4 or IPv6 address")
    return next((a for a in addresses if ":" not in a), addresses[0])


def pin_ice_host(host: str) -> str | None:
    """Make every ICE agent in this process offer `host` as its host candidate; returns the address (None: wildcard).

    aioice gathers host candidates from `aioice.ice.get_host_addresses`, which lists every interface address except
    loopback (so on a loopback-only machine, or a server bound to 127.0.0.1, nothing would connect). This replaces
    that module global (aioice 0.13 looks it up at call time in `Connection.gather_candidates`; aiortc never imports
    it by name) with one returning the pinned addresses. It is process-wide and installed once (idempotent): every
    peer connection of this process, server and client alike, offers every address pinned so far. A wildcard host
    (0.0.0.0, ::, "") pins nothing: aioice's own interface list stays in effect unless something else pinned.

    Raises:
        ConfigError: `host` does not resolve.
    """
    if host in WILDCARD_HOSTS:
        return None
    address = resolve_ice_host(host)
    with _pin_lock:
        if address not in _pinned_hosts:
            _pinned_hosts.append(address)
        if aioice.ice.get_host_addresses is not _pinned_host_addresses:
            aioice.ice.get_host_addresses = _pinned_host_addresses
    return address


def ice_server(url: str) -> RTCIceServer:
    """A STUN or TURN server from its URL: `stun:host[:port]`, `turn[s]:host[:port][?transport=udp|tcp]`; TURN
    credentials go before the host, `turn:user:password@host:port` (percent-encoded where needed).

    Raises:
        ConfigError: another scheme, no host, or TURN without credentials.
    """
    scheme, _, rest = url.partition(":")
    if scheme not in ("stun", "stuns", "turn", "turns") or not rest:
        raise ConfigError(f"ICE server {url!r} must be stun:host[:port] or turn[s]:user:password@host[:port]")
    if "@" not in rest:
        if scheme.startswith("turn"):
            raise ConfigError(f"ICE server {url!r}: TURN needs credentials, turn:user:password@host[:port]")
        return RTCIceServer(urls=url)
    credentials, _, address = rest.rpartition("@")
    username, colon, password = credentials.partition(":")
    if not address or not username or not colon:
        raise ConfigError(f"ICE server {url!r}: expected {scheme}:user:password@host[:port]")
    return RTCIceServer(urls=f"{scheme}:{address}", username=unquote(username), credential=unquote(password))


def video_codec_names() -> list[str]:
    """The video codecs aiortc can send, most preferred first (retransmission not counted)."""
    names = [codec.name for codec in get_capabilities("video").codecs if codec.name != "rtx"]
    return list(dict.fromkeys(names))


# ---- configuration and errors --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WhepConfig:
    """Settings of the WHEP endpoint, validated at construction."""

    ice_host: str = "127.0.0.1"  # the address offered as host candidate (see pin_ice_host); wildcard: aioice's own
    ice_servers: tuple[str, ...] = ()  # STUN/TURN URLs (see ice_server); none: host candidates only
    max_peers: int = 16  # peers connected or being negotiated; more are refused with 503
    max_offer_bytes: int = 64 * 1024  # a browser's offer is a few kB
    max_message_bytes: int = DEFAULT_MAX_BYTES  # the control size limit on the data channel
    frame_capacity: int = 2  # a peer's frame mailbox slots: 1 or 2 (overflow drops that peer's oldest frame)
    connect_timeout_s: float = 30.0  # a peer that has not connected by then is ended (its slot freed)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ice_servers", tuple(self.ice_servers))
        for url in self.ice_servers:
            ice_server(url)
        if not isinstance(self.ice_host, str):
            raise ConfigError(f"ice_host={self.ice_host!r} must be a string (an address, or 0.0.0.0 for any)")
        for name, low in (("max_peers", 1), ("max_offer_bytes", 1024), ("max_message_bytes", 64)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}={value!r} must be an integer >= {low}")
        if self.frame_capacity not in (1, 2) or isinstance(self.frame_capacity, bool):
            raise ConfigError(f"frame_capacity={self.frame_capacity!r} must be 1 or 2")
        timeout = self.connect_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ConfigError(f"connect_timeout_s={timeout!r} must be a finite number > 0")


class WhepRefused(FrameCastError):
    """An offer the endpoint will not answer: `status` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---- the video track -----------------------------------------------------------------------------------------------

class RelayTrack(MediaStreamTrack):
    """One peer's video: the frames of its own mailbox of `relay` as av.VideoFrame (RGB; pts in 1/90,000 s).

    aiortc's sender calls `recv` once the connection is up, for each next frame, and encodes it in a worker thread
    (the RGB -> YUV conversion too), so the event loop only wraps the array. The mailbox is subscribed at the first
    `recv` (on the event loop), so a peer still connecting neither counts as a viewer nor drops frames, and is
    unsubscribed by `stop`. The track ends (event "ended") when it is stopped or the relay closes.
    """

    kind = "video"

    def __init__(self, relay: Relay[VideoFrame], capacity: int) -> None:
        super().__init__()
        self.relay, self.capacity = relay, capacity
        self.frames: Mailbox[VideoFrame] | None = None
        self.frames_sent = 0

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError("the track has ended")
        try:
            if self.frames is None:
                self.frames = self.relay.subscribe(self.capacity)
            frame = await self.frames.get()
        except SessionClosed:
            self.stop()
            raise MediaStreamError("the stream has ended") from None
        video = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame.rgb), format="rgb24")
        video.pts, video.time_base = frame.pts, TIME_BASE
        self.frames_sent += 1
        return video

    def stop(self) -> None:
        super().stop()
        if self.frames is not None:
            self.relay.unsubscribe(self.frames)  # idempotent

    @property
    def dropped(self) -> int:
        return 0 if self.frames is None else self.frames.dropped


# ---- one peer ------------------------------------------------------------------------------------------------------

class WhepPeer:
    """One WebRTC viewer: its peer connection, video track, frame and event mailboxes, and control inbox."""

    def __init__(self, endpoint: WhepEndpoint, pc: RTCPeerConnection, *, token: str | None, peer: str) -> None:
        self.endpoint, self.session, self.pc = endpoint, endpoint.session, pc
        self.id = secrets.token_urlsafe(12)
        self.token, self.peer = token, peer
        self.track: RelayTrack | None = None
        self.events: Mailbox[str] | None = None
        self.inbox: ControlInbox | None = None
        self.codec: str | None = None
        self.is_closed = False
        self._pump: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._timer = asyncio.get_running_loop().call_later(endpoint.config.connect_timeout_s, self._connect_timeout)
        pc.on("connectionstatechange", self._on_state)
        pc.on("datachannel", self._on_datachannel)

    def __repr__(self) -> str:
        return f"peer {self.id} ({self.peer})"

    def attach_video(self, transceiver: RTCRtpTransceiver) -> None:
        """Send this peer's own mailbox of the session's frames on `transceiver` (subscribed once connected)."""
        self.track = RelayTrack(self.session.frames, self.endpoint.config.frame_capacity)
        self.track.on("ended", lambda: self._later(self.close("the stream ended", drain_events=True)))
        transceiver.sender.replaceTrack(self.track)
        transceiver.direction = "sendonly"

    def _later(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _connect_timeout(self) -> None:
        if self.pc.connectionState != "connected":
            self._later(self.close(f"not connected after {self.endpoint.config.connect_timeout_s} s"))

    def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self._timer.cancel()
            log.info("session %s: WebRTC %s connected (%s)", self.session.id, self, self.codec)
        elif state in ("failed", "closed"):
            self._later(self.close(f"connection {state}"))

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != CONTROL_LABEL or self.inbox is not None or self.is_closed:
            log.info("session %s: WebRTC %s: ignoring data channel %r (only one %r channel is used)",
                     self.session.id, self, channel.label, CONTROL_LABEL)
            return
        try:
            self.events = events = self.session.events.subscribe()
        except SessionClosed:
            channel.close()
            return
        self.inbox = inbox = ControlInbox(self.session, token=self.token, reply=events.put,
                                          max_message_bytes=self.endpoint.config.max_message_bytes)
        events.put(self.session.hello(can_steer=inbox.can_steer, frame_format=HELLO_FORMAT))
        channel.on("message", self._on_message)
        channel.on("close", lambda: self.session.events.unsubscribe(events))  # ends the pump; the video goes on
        self._pump = asyncio.ensure_future(self._send_events(channel, events))

    def _on_message(self, message: str | bytes) -> None:
        if self.inbox is not None and not self.is_closed:
            self.inbox.receive(message)  # a closed session ends the stream, and with it this peer

    async def _send_events(self, channel: RTCDataChannel, events: Mailbox[str]) -> None:
        """Events down the data channel; while the client reads too slowly, its own event mailbox drops."""
        channel.bufferedAmountLowThreshold = _SEND_LOW_BYTES
        loop = asyncio.get_running_loop()
        try:
            while True:
                text = await events.get()
                if channel.readyState != "open":
                    return
                if channel.bufferedAmount > _SEND_HIGH_BYTES:
                    drained = loop.create_future()
                    channel.once("bufferedamountlow", lambda: drained.done() or drained.set_result(None))
                    await drained
                channel.send(text)
        except SessionClosed:  # the stream ended: the track ends too, and closes the peer
            pass
        except (InvalidStateError, ConnectionError):  # the channel or the connection went away
            pass

    async def close(self, reason: str, *, drain_events: bool = False) -> None:
        """End this peer: unsubscribe its mailboxes, stop its tasks, close the connection (idempotent).

        `drain_events`: first let the events still queued go out (at most 1 s): the stream's last word, a failure.
        """
        if self.is_closed:
            return
        self.is_closed = True
        self.endpoint.peers.pop(self.id, None)
        self._timer.cancel()
        if self.track is not None:
            self.track.stop()  # unsubscribes its mailbox
        if self.events is not None:
            if self._pump is not None and drain_events:
                await asyncio.wait([self._pump], timeout=1.0)
            self.session.events.unsubscribe(self.events)
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        await self.pc.close()
        log.info("session %s: WebRTC %s ended: %s; %d frames sent, %d dropped, %d messages received",
                 self.session.id, self, reason, 0 if self.track is None else self.track.frames_sent,
                 0 if self.track is None else self.track.dropped, 0 if self.inbox is None else self.inbox.received)


# ---- the endpoint --------------------------------------------------------------------------------------------------

def _refuse_unless_offer(text: str) -> aiortc_sdp.SessionDescription:
    """The parsed offer, or WhepRefused(400) naming what is wrong with it."""
    if not text.strip():
        raise WhepRefused(400, "empty SDP offer")
    if not text.startswith("v=0"):
        raise WhepRefused(400, "malformed SDP offer: it must begin with 'v=0'")
    try:
        description = aiortc_sdp.SessionDescription.parse(text)
    except Exception as exc:  # the parser raises whatever a malformed line trips (ValueError, AssertionError, ...)
        raise WhepRefused(400, f"malformed SDP offer: {_describe(exc)}") from None
    if not description.media:
        raise WhepRefused(400, "malformed SDP offer: it has no m= sections")
    for index, media in enumerate(description.media):
        if not media.ice.usernameFragment or not media.ice.password:
            raise WhepRefused(400, f"malformed SDP offer: m-section {index} ({media.kind}) has no ICE ufrag/pwd "
                                   "(truncated?)")
        if not media.dtls or not media.dtls.fingerprints:
            raise WhepRefused(400, f"malformed SDP offer: m-section {index} ({media.kind}) has no DTLS fingerprint "
                                   "(truncated?)")
    videos = [media for media in description.media if media.kind == "video"]
    if not videos:
        raise WhepRefused(400, "offer has no video transceiver (no m=video section)")
    if not any(_receives(media) for media in videos):
        directions = ", ".join(str(media.direction) for media in videos)
        raise WhepRefused(400, f"offer has no video transceiver that can receive (video direction: {directions}; "
                               "it must be recvonly or sendrecv)")
    supported = {name.lower() for name in video_codec_names()}
    if not any(codec.name.lower() in supported for media in videos if _receives(media) for codec in media.rtp.codecs):
        raise _no_common_codec(description)
    return description


def _no_common_codec(description: aiortc_sdp.SessionDescription) -> WhepRefused:
    offered = dict.fromkeys(codec.name for media in description.media if media.kind == "video"
                            for codec in media.rtp.codecs if codec.name.lower() != "rtx")
    return WhepRefused(400, f"offer has no video codec this server can send (offered: {', '.join(offered) or 'none'}; "
                            f"supported: {', '.join(video_codec_names())})")


def _describe(exc: Exception) -> str:
    detail = str(exc)
    return f"{type(exc).__name__}: {detail}" if detail else f"a line cannot be parsed ({type(exc).__name__})"


def _receives(media: aiortc_sdp.MediaDescription) -> bool:
    return media.port != 0 and (media.direction or "sendrecv") in ("recvonly", "sendrecv")


def _bearer_token(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query.get("token")


class WhepEndpoint:
    """The WHEP resource of one session: answers offers, owns the peers. Its handlers are aiohttp handlers.

    Constructing it pins the ICE host (see pin_ice_host).
    """

    def __init__(self, session: Session, config: WhepConfig | None = None) -> None:
        self.session = session
        self.config = config = config if config is not None else WhepConfig()
        self.ice_servers = [ice_server(url) for url in config.ice_servers]
        self.ice_address = pin_ice_host(config.ice_host)
        self.peers: dict[str, WhepPeer] = {}
        self._negotiating = 0
        self._is_closed = False

    async def options(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers={"Allow": "OPTIONS, POST", "Accept-Post": SDP_CONTENT_TYPE})

    async def post(self, request: web.Request) -> web.Response:
        """An offer -> 201 with the answer and the peer's resource, or a refusal (logged; nothing else changes)."""
        try:
            peer, answer = await self._answer(request)
        except WhepRefused as exc:
            log.warning("session %s: WHEP offer from %s refused (%d): %s", self.session.id, request.remote,
                        exc.status, exc)
            return web.Response(status=exc.status, text=str(exc))
        location = f"{request.path.rstrip('/')}/{peer.id}"
        log.info("session %s: WebRTC %s answered (%s; %d peers)", self.session.id, peer, peer.codec, len(self.peers))
        return web.Response(status=201, body=answer.encode(),
                            headers={"Content-Type": SDP_CONTENT_TYPE, "Location": location})

    async def delete(self, request: web.Request) -> web.Response:
        resource = request.match_info["resource"]
        peer = self.peers.get(resource)
        if peer is None:
            return web.Response(status=404, text=f"no WHEP resource {resource!r} (it ended, or never existed)")
        await peer.close("deleted by the client")
        return web.Response(status=200, text=f"peer {resource} ended")

    async def close(self) -> None:
        """End every peer; later offers are refused (idempotent). For the app's shutdown."""
        self._is_closed = True
        await asyncio.gather(*(peer.close("the server is shutting down") for peer in list(self.peers.values())))

    async def _read_offer(self, request: web.Request) -> str:
        if request.content_type != SDP_CONTENT_TYPE or "Content-Type" not in request.headers:
            given = request.headers.get("Content-Type")
            raise WhepRefused(415, f"Content-Type must be {SDP_CONTENT_TYPE}, "
                                   + ("none was given" if given is None else f"got {given!r}"))
        limit = self.config.max_offer_bytes
        too_large = f"SDP offer is larger than {limit} bytes"
        if request.content_length is not None and request.content_length > limit:
            raise WhepRefused(413, f"{too_large} ({request.content_length} bytes)")
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > limit:
                raise WhepRefused(413, too_large)
        try:
            return body.decode()
        except UnicodeDecodeError:
            raise WhepRefused(400, "malformed SDP offer: it is not UTF-8 text") from None

    def _check_room(self) -> None:
        if self._is_closed:
            raise WhepRefused(503, f"session {self.session.id} is closed")
        if self.session.failure is not None:
            raise WhepRefused(503, f"session {self.session.id} has failed: {self.session.failure}")
        busy = len(self.peers) + self._negotiating
        if busy >= self.config.max_peers:
            raise WhepRefused(503, f"too many peers: {busy} of max_peers={self.config.max_peers}; try again later")

    async def _answer(self, request: web.Request) -> tuple[WhepPeer, str]:
        text = await self._read_offer(request)
        description = _refuse_unless_offer(text)
        self._check_room()
        self._negotiating += 1
        try:
            pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self.ice_servers)))
            peer = WhepPeer(self, pc, token=_bearer_token(request), peer=str(request.remote))
            try:
                await self._negotiate(peer, description, text)
            except BaseException:
                await peer.close("negotiation failed")
                raise
        finally:
            self._negotiating -= 1
        if self._is_closed:  # shut down meanwhile
            await peer.close("the server is shutting down")
            raise WhepRefused(503, f"session {self.session.id} is closed")
        self.peers[peer.id] = peer
        return peer, pc.localDescription.sdp

    async def _negotiate(self, peer: WhepPeer, description: aiortc_sdp.SessionDescription, text: str) -> None:
        pc = peer.pc
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="offer"))
        except OperationError:  # the names matched, the parameters (an H264 profile, say) did not
            raise _no_common_codec(description) from None
        except Exception as exc:  # aiortc trips on whatever the offer lacks
            raise WhepRefused(400, f"malformed SDP offer: {_describe(exc)}") from None
        mids = [media.rtp.muxId for media in description.media if media.kind == "video" and _receives(media)]
        transceiver = next(t for t in pc.getTransceivers() if t.kind == "video" and t.mid == mids[0])
        peer.attach_video(transceiver)
        await pc.setLocalDescription(await pc.createAnswer())  # gathers every candidate: a non-trickle answer
        answer = aiortc_sdp.SessionDescription.parse(pc.localDescription.sdp)
        codecs = next(media.rtp.codecs for media in answer.media if media.rtp.muxId == transceiver.mid)
        peer.codec = codecs[0].name if codecs else None


def add_whep_routes(app: web.Application, endpoint: WhepEndpoint, path: str = "/whep") -> None:
    """Route POST/OPTIONS `path` and DELETE `path`/<id> to `endpoint`, and end its peers on the app's shutdown."""
    app.router.add_post(path, endpoint.post)
    app.router.add_route("OPTIONS", path, endpoint.options)
    app.router.add_delete(path + "/{resource}", endpoint.delete)

    async def close_peers(app: web.Application) -> None:
        await endpoint.close()

    app.on_shutdown.append(close_peers)


def codec_preferences(names: Sequence[str]):
    """aiortc codec capabilities for `names` in that order (plus retransmission), for setCodecPreferences.

    Raises:
        ConfigError: a name aiortc cannot handle.
    """
    capabilities = get_capabilities("video").codecs
    chosen = []
    for name in names:
        matches = [codec for codec in capabilities if codec.name.lower() == name.lower()]
        if not matches or name.lower() == "rtx":
            raise ConfigError(f"video codec {name!r} is not supported; choose from {video_codec_names()}")
        chosen += matches
    return chosen + [codec for codec in capabilities if codec.name == "rtx"]
