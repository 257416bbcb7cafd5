"""A WHEP player in Python (aiortc): plays a FrameCast WebRTC stream, for tests, benchmarks and examples.

    async with WhepPlayer("http://127.0.0.1:8000", token=token) as player:
        await player.wait_frames(30)                                  # 30 frames decoded in all
        seq = await player.send({"v": 1, "type": "prompt", "text": "a fox"})
        ack = await player.reply_to(seq)                              # {"type": "ack", "chunk": ..., ...}
        rgb = player.last_frame                                       # uint8 [H, W, 3]

Entering POSTs a recvonly video offer with a "control" data channel, ICE gathered in full (WHEP without trickle),
and applies the answer; leaving DELETEs the resource and closes the peer. Frames are counted as they are decoded
(`frames_received`, `receive_times`, `pts`); the JSON events of the control channel collect in `messages`.
The player pins its ICE host (default 127.0.0.1; see framecast.stream.sinks.webrtc.pin_ice_host: process-wide).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from urllib.parse import urljoin

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc import sdp as aiortc_sdp
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from framecast.models.errors import FrameCastError, SessionClosed
from framecast.stream.sinks.webrtc import CONTROL_LABEL, SDP_CONTENT_TYPE, codec_preferences, ice_server, pin_ice_host

log = logging.getLogger("framecast.whep_client")


class WhepError(FrameCastError):
    """The WHEP server refused the offer: `status` is the HTTP status, the message the server's reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"WHEP offer refused ({status}): {message}")
        self.status, self.reason = status, message


def whep_url(base_url: str) -> str:
    """The WHEP endpoint of a server address (`http://host:port` -> `http://host:port/whep`; a /whep URL as is)."""
    base, _, query = base_url.partition("?")
    base = base.rstrip("/")
    url = base if base.endswith("/whep") else base + "/whep"
    return url + (f"?{query}" if query else "")


class WhepPlayer:
    """Plays one WHEP stream: counts and keeps the decoded frames' times, collects the control channel's events.

    `token`: the steering token, sent as `Authorization: Bearer`; `codecs`: video codecs to offer, in order of
    preference (default: aiortc's, VP8 first); `ice_host`: the address to offer (None: aioice's own choice).
    """

    def __init__(self, base_url: str, token: str | None = None, *, codecs: Sequence[str] = (),
                 ice_host: str | None = "127.0.0.1", ice_servers: Sequence[str] = (),
                 timeout_s: float = 10.0) -> None:
        self.url = whep_url(base_url)
        self.token, self.timeout_s = token, timeout_s
        self._codecs = codec_preferences(codecs) if codecs else None
        self._ice_servers = [ice_server(url) for url in ice_servers]
        self._ice_host = ice_host
        self.resource_url: str | None = None
        self.codec: str | None = None  # the video codec the server answered with
        self.frames_received = 0
        self.receive_times: list[float] = []  # time.monotonic() as each frame was decoded
        self.pts: list[int] = []  # the frames' 90 kHz pts as aiortc's receiver gives them: rebased to start at 0
        self.messages: list[dict] = []  # JSON events from the control channel, in order
        self.sent = 0  # messages sent on the control channel (the server's seq of the last one)
        self.track_ended = False
        self._last: av.VideoFrame | None = None
        self._last_rgb: tuple[av.VideoFrame, np.ndarray] | None = None
        self._changed = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None
        self._pc: RTCPeerConnection | None = None
        self._channel: RTCDataChannel | None = None
        self._reader: asyncio.Task | None = None

    # connecting and leaving
    async def __aenter__(self) -> WhepPlayer:
        try:
            await self._connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _connect(self) -> None:
        if self._ice_host is not None:
            pin_ice_host(self._ice_host)
        self._pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self._ice_servers)))
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._notify)
        transceiver = pc.addTransceiver("video", direction="recvonly")
        if self._codecs is not None:
            transceiver.setCodecPreferences(self._codecs)
        self._channel = channel = pc.createDataChannel(CONTROL_LABEL)
        channel.on("message", self._on_message)
        channel.on("open", self._notify)
        channel.on("close", self._notify)
        await pc.setLocalDescription(await pc.createOffer())  # gathers every candidate: no trickle
        headers = {"Content-Type": SDP_CONTENT_TYPE}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        async with self._http.post(self.url, data=pc.localDescription.sdp.encode(), headers=headers) as response:
            text = await response.text()
            if response.status != 201:
                raise WhepError(response.status, text)
            if "Location" not in response.headers:
                raise WhepError(response.status, "the answer has no Location header")
            self.resource_url = urljoin(self.url, response.headers["Location"])
        await pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
        video = next(media for media in aiortc_sdp.SessionDescription.parse(text).media if media.kind == "video")
        self.codec = video.rtp.codecs[0].name if video.rtp.codecs else None

    async def close(self, *, delete: bool = True) -> None:
        """DELETE the resource (if the server still answers) and close the peer (idempotent).

        `delete=False` closes the peer connection only, as a client that crashes or loses its page would: the server
        then ends the peer when it sees the connection close.
        """
        if delete and self.resource_url is not None and self._http is not None:
            url, self.resource_url = self.resource_url, None
            try:
                async with self._http.delete(url) as response:
                    if response.status not in (200, 204, 404):
                        log.warning("DELETE %s: %d %s", url, response.status, await response.text())
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                log.info("DELETE %s failed: %s (the server is gone?)", url, exc)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._pc is not None:
            await self._pc.close()
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()
        self._notify()

    # what arrives
    def _notify(self) -> None:
        """Wake every waiter (each waits on the event current when it started)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video" and self._reader is None:
            self._reader = asyncio.ensure_future(self._read(track))

    async def _read(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                self._last = frame
                self.pts.append(frame.pts)
                self.receive_times.append(time.monotonic())
                self.frames_received += 1
                self._notify()
        except MediaStreamError:
            self.track_ended = True
            self._notify()

    def _on_message(self, message: str | bytes) -> None:
        try:
            event = json.loads(message)
        except ValueError:
            log.warning("not JSON on the control channel: %.80r", message)
            return
        self.messages.append(event)
        self._notify()

    @property
    def connection_state(self) -> str:
        return "new" if self._pc is None else self._pc.connectionState

    @property
    def last_frame(self) -> np.ndarray | None:
        """The last decoded frame as uint8 RGB [H, W, 3] (converted when asked for), None before the first."""
        last = self._last
        if last is None:
            return None
        if self._last_rgb is None or self._last_rgb[0] is not last:
            self._last_rgb = (last, last.to_ndarray(format="rgb24"))
        return self._last_rgb[1]

    # waiting
    async def _wait(self, done: Callable[[], bool], timeout_s: float | None, what: str) -> None:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while not done():
            if self.connection_state in ("failed", "closed"):
                raise SessionClosed(f"waiting for {what}: the connection is {self.connection_state} "
                                    f"({self.frames_received} frames, {len(self.messages)} messages received)")
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                raise TimeoutError(f"no {what} within {timeout_s} s ({self.frames_received} frames, "
                                   f"{len(self.messages)} messages received; connection "
                                   f"{self.connection_state})") from None

    async def wait_frames(self, count: int, timeout_s: float | None = None) -> int:
        """Wait until `count` frames have been received in all (not `count` more); returns frames_received.

        Raises:
            TimeoutError: not within timeout_s (default: the player's timeout_s).
            SessionClosed: the connection failed or closed, or the stream ended first.
        """
        def done() -> bool:
            if self.frames_received < count and self.track_ended:
                raise SessionClosed(f"the stream ended after {self.frames_received} of {count} frames")
            return self.frames_received >= count

        await self._wait(done, timeout_s, f"{count} frames")
        return self.frames_received

    async def wait_message(self, predicate: Callable[[dict], bool], timeout_s: float | None = None) -> dict:
        """The first message (received so far or later) for which `predicate` is true.

        Raises:
            TimeoutError, SessionClosed: as wait_frames.
        """
        found: list[dict] = []

        def done() -> bool:
            found[:] = [message for message in self.messages if predicate(message)][:1]
            return bool(found)

        await self._wait(done, timeout_s, "matching message")
        return found[0]

    async def reply_to(self, seq: int, timeout_s: float | None = None) -> dict:
        """The ack or error the server sent for the message with this seq."""
        return await self.wait_message(lambda m: m.get("type") in ("ack", "error") and m.get("seq") == seq, timeout_s)

    # sending
    async def send(self, message: dict | str | bytes, timeout_s: float | None = None) -> int:
        """Send a control (a dict is sent as JSON text); waits for the channel to open. Returns its seq.

        Raises:
            SessionClosed: the channel closed (or never opened) or the player is not connected.
        """
        channel = self._channel
        if channel is None:
            raise SessionClosed("the player is not connected (use `async with WhepPlayer(...)`)")

        def is_open() -> bool:
            if channel.readyState in ("closing", "closed"):
                raise SessionClosed(f"the control channel is {channel.readyState}")
            return channel.readyState == "open"

        await self._wait(is_open, timeout_s, "open control channel")
        channel.send(json.dumps(message) if isinstance(message, dict) else message)
        self.sent += 1
        return self.sent
