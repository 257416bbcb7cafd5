"""WebRTC output with WHEP signalling, end to end on 127.0.0.1: a real session (tiny DiT, random weights, preview
decoder, 64x64 px, 16 fps run faster than real time), the real server, and aiortc peers (WhepPlayer) or Chromium,
connected over loopback only, as in CI's network namespace."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import aiohttp
import aioice.ice
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from aiortc import RTCConfiguration, RTCPeerConnection

from framecast.models.errors import ConfigError, SessionClosed
from framecast.stream.producer import VideoFrame
from framecast.stream.relay import Mailbox
from framecast.stream.server import WHEP_KEY, create_app
from framecast.stream.sinks.webrtc import (
    SDP_CONTENT_TYPE, WhepConfig, WhepEndpoint, ice_server, pin_ice_host,
)
from framecast.stream.whep_client import WhepError, WhepPlayer, whep_url
from tests.stream.test_server import TOKEN, make_session

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

TICKS_PER_FRAME = 5625  # 90 kHz at 16 fps
RATE_FPS = 64  # frames per wall second in the rate test (16 fps, 4x): a pace this 2-core machine keeps with VP8


def serve(test, session_options: dict | None = None, **app_options) -> None:
    """Run `await test(server, base_url, session, whep)` against a live server; afterwards every peer is gone."""

    async def main() -> None:
        session = make_session(**(session_options or {}))
        server = TestServer(create_app(session, **app_options), host="127.0.0.1", port=0)
        await server.start_server()
        whep: WhepEndpoint = server.app[WHEP_KEY]
        try:
            await test(server, f"http://127.0.0.1:{server.port}", session, whep)
        finally:
            await server.close()
        assert whep.peers == {} and session.frames.viewers == 0
        assert not session.is_running and session.failure is None

    asyncio.run(main())


async def until(done, timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.01)


async def aiortc_offer(*transceivers: tuple[str, str]) -> str:
    """An offer as an aiortc client makes it: the given (kind, direction) transceivers and a control channel."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    for kind, direction in transceivers:
        pc.addTransceiver(kind, direction=direction)
    pc.createDataChannel("control")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def test_a_player_receives_the_frames_at_the_sessions_rate_with_increasing_pts() -> None:
    async def test(server, base, session, whep) -> None:
        published: Mailbox[VideoFrame] = session.frames.subscribe(capacity=64)  # what the session sent, to compare
        async with WhepPlayer(base, codecs=["VP8"]) as player:
            assert player.codec == "VP8" and len(whep.peers) == 1
            await player.wait_frames(10)
            assert session.frames.viewers == 2  # the player's own mailbox, and ours
            received, sent, start = player.frames_received, session.frames.published, time.monotonic()
            await asyncio.sleep(1.5)
            received, sent = player.frames_received - received, session.frames.published - sent
            elapsed = time.monotonic() - start
            assert 0.8 * RATE_FPS < sent / elapsed < 1.1 * RATE_FPS, f"the session sent {sent / elapsed:.0f} fps"
            assert 0.9 * sent <= received <= sent + 4, f"received {received} of {sent} frames"  # the player kept up
            steps = np.diff(player.pts)
            assert (steps > 0).all() and (steps % TICKS_PER_FRAME == 0).all()  # gaps only where frames were dropped
            rgb = player.last_frame
            assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8 and rgb.std() > 5
            recent = [await published.get() for _ in range(len(published))]
            # the picture is the session's: close to one of the frames it just sent (VP8 is lossy)
            errors = [np.abs(rgb.astype(int) - frame.rgb.astype(int)).mean() for frame in recent]
            assert min(errors) < 12, f"mean abs error to the nearest sent frame: {min(errors):.1f}"

    serve(test, session_options={"speed": RATE_FPS / 16})


def test_controls_on_the_data_channel_are_acknowledged_and_refused_without_the_token() -> None:
    async def test(server, base, session, whep) -> None:
        async with WhepPlayer(base, token=TOKEN) as steerer, WhepPlayer(base, codecs=["H264"]) as viewer:
            assert (steerer.codec, viewer.codec) == ("VP8", "H264")  # both codecs Chromium offers, at once
            hello = await steerer.wait_message(lambda m: m["type"] == "hello")
            assert (hello["fps"], hello["can_steer"], hello["format"]) == ("16", True, "webrtc")
            assert not (await viewer.wait_message(lambda m: m["type"] == "hello"))["can_steer"]
            await steerer.wait_frames(5)
            await viewer.wait_frames(5)
            assert session.frames.viewers == 2 and len(whep.peers) == 2

            seq = await steerer.send({"v": 1, "type": "prompt", "text": "a red fox in snow", "id": "p"})
            ack = await steerer.reply_to(seq)
            assert ack["type"] == "ack" and ack["id"] == "p" and isinstance(ack["chunk"], int)
            await steerer.wait_message(lambda m: m["type"] == "chunk" and m["chunk"] == ack["chunk"])
            assert session.prompt_switches == 1
            error = await steerer.reply_to(await steerer.send("{not json"))
            assert error["type"] == "error" and error["error"].startswith("message is not JSON")

            refused = await viewer.reply_to(await viewer.send({"v": 1, "type": "pause", "id": 7}))
            assert refused == {"v": 1, "type": "error", "seq": 1, "id": 7,
                               "error": "pause: not allowed without the session token (this connection can only watch)"}
            assert not session.is_paused
            for player in (steerer, viewer):  # the stream goes on for both
                await player.wait_frames(player.frames_received + 20)

    serve(test)


def test_delete_ends_the_peer_and_a_vanished_peer_is_cleaned_up() -> None:
    async def test(server, base, session, whep) -> None:
        def hello(message: dict) -> bool:
            return message["type"] == "hello"

        async with WhepPlayer(base) as stayer:
            await stayer.wait_message(hello)
            first = WhepPlayer(base)
            async with first:
                await first.wait_frames(3)
                await first.wait_message(hello)
                resource = first.resource_url
                assert session.frames.viewers == 2 and session.events.viewers == 2
            assert session.frames.viewers == 1 and session.events.viewers == 1 and len(whep.peers) == 1
            async with aiohttp.ClientSession() as http:
                async with http.delete(resource) as response:
                    assert response.status == 404 and "no WHEP resource" in await response.text()

            vanishing = WhepPlayer(base)
            await vanishing.__aenter__()
            await vanishing.wait_frames(3)
            await vanishing.wait_message(hello)
            assert session.frames.viewers == 2 and session.events.viewers == 2
            await vanishing.close(delete=False)  # the page crashed: no DELETE, the connection just closes
            await until(lambda: (session.frames.viewers, session.events.viewers, len(whep.peers)) == (1, 1, 1),
                        what="vanished peer cleanup")
            await stayer.wait_frames(stayer.frames_received + 20)
            with pytest.raises(SessionClosed, match="connection is closed"):
                await vanishing.wait_frames(10_000, timeout_s=1)

    serve(test)


def test_a_peer_that_never_connects_is_ended_after_the_connect_timeout(caplog) -> None:
    async def test(server, base, session, whep) -> None:
        whep.config = dataclasses.replace(whep.config, connect_timeout_s=0.5)
        client = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # offers, then never applies the answer
        client.addTransceiver("video", direction="recvonly")
        await client.setLocalDescription(await client.createOffer())
        try:
            async with aiohttp.ClientSession() as http:
                headers = {"Content-Type": SDP_CONTENT_TYPE}
                async with http.post(f"{base}/whep", data=client.localDescription.sdp.encode(), headers=headers) as r:
                    assert r.status == 201 and r.headers["Content-Type"] == SDP_CONTENT_TYPE
                    assert r.headers["Location"].startswith("/whep/") and "a=end-of-candidates" in await r.text()
                assert len(whep.peers) == 1 and session.frames.viewers == 0  # not a viewer until connected
                await until(lambda: not whep.peers and "ended: not connected after 0.5 s" in caplog.text,
                            timeout_s=3, what="the unconnected peer's cleanup")
                async with http.delete(f"{base}{r.headers['Location']}") as response:
                    assert response.status == 404
        finally:
            await client.close()

    with caplog.at_level(logging.INFO, logger="framecast.webrtc"):
        serve(test)


def test_bad_offers_get_their_status_and_reason_and_the_stream_goes_on() -> None:
    async def test(server, base, session, whep) -> None:
        good = await aiortc_offer(("video", "recvonly"))
        async with WhepPlayer(base, token=TOKEN) as player, aiohttp.ClientSession() as http:
            await player.wait_frames(5)

            async def post(body: str | bytes, content_type: str | None = SDP_CONTENT_TYPE) -> tuple[int, str]:
                headers = {} if content_type is None else {"Content-Type": content_type}
                body = body.encode() if isinstance(body, str) else body
                async with http.post(f"{base}/whep", data=body, headers=headers,
                                     skip_auto_headers=["Content-Type"]) as response:
                    return response.status, await response.text()

            no_video = await aiortc_offer(("audio", "recvonly"))
            send_only = await aiortc_offer(("video", "sendonly"))
            only_av1 = good.replace("VP8/90000", "AV1/90000").replace("H264/90000", "AV1/90000")
            cases = [
                (post(good, None), 415, "Content-Type must be application/sdp, none was given"),
                (post(good, "text/plain"), 415, "Content-Type must be application/sdp, got 'text/plain"),
                (post(""), 400, "empty SDP offer"),
                (post("hello"), 400, "malformed SDP offer: it must begin with 'v=0'"),
                (post(b"v=0\r\n\xff\xfe"), 400, "malformed SDP offer: it is not UTF-8 text"),
                (post(good[: len(good) // 2]), 400, "malformed SDP offer: m-section 0 (video) has no"),
                (post(good[: len(good) - 200]), 400, "malformed SDP offer: m-section 1 (application) has no"),
                (post(no_video), 400, "offer has no video transceiver"),
                (post(send_only), 400, "offer has no video transceiver that can receive (video direction: sendonly"),
                (post(only_av1), 400, "offer has no video codec this server can send (offered: AV1; supported: VP8"),
                (post(good + "a=x" * 30_000), 413, "SDP offer is larger than 65536 bytes"),
                (post(good), 503, "too many peers: 1 of max_peers=1; try again later"),
            ]
            for request, status, reason in cases:
                got = await request
                assert got[0] == status and got[1].startswith(reason), (status, reason, got)
            with pytest.raises(WhepError) as info:
                async with WhepPlayer(base):
                    pass
            assert info.value.status == 503 and "too many peers" in str(info.value)
            async with http.options(f"{base}/whep") as response:
                assert response.status == 204 and response.headers["Accept-Post"] == SDP_CONTENT_TYPE
            trickle = {"Content-Type": "application/trickle-ice-sdpfrag"}
            async with http.patch(player.resource_url, data=b"a=candidate", headers=trickle) as response:
                assert response.status == 405  # no trickle: the offer carries every candidate
            async with http.get(f"{base}/metrics") as response:
                assert "framecast_webrtc_peers 1" in await response.text()

            assert len(whep.peers) == 1 and session.frames.viewers == 1 and session.is_running
            await player.wait_frames(player.frames_received + 20)  # unaffected
            ack = await player.reply_to(await player.send({"v": 1, "type": "seed", "seed": 3}))
            assert ack["type"] == "ack"

    serve(test, max_peers=1)


def test_shutdown_ends_every_peer() -> None:
    async def main() -> None:
        session = make_session()
        server = TestServer(create_app(session), host="127.0.0.1", port=0)
        await server.start_server()
        async with WhepPlayer(f"http://127.0.0.1:{server.port}") as player:
            await player.wait_frames(3)
            await server.close()
            assert server.app[WHEP_KEY].peers == {} and session.frames.viewers == 0
            await until(lambda: player.connection_state == "closed", what="the player seeing the close")
            assert not session.is_running

    asyncio.run(main())


# A WHEP player in the page: offer (recvonly video, preferring `codec`, and a control channel), wait for ICE
# gathering, POST, answer; then until 20 frames are decoded and the hello is in, a control, DELETE.
CHROMIUM_PLAYER = """async ({codec, token}) => {
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const pc = new RTCPeerConnection({iceServers: []});
  const transceiver = pc.addTransceiver("video", {direction: "recvonly"});
  const codecs = RTCRtpReceiver.getCapabilities("video").codecs;
  const named = (name) => codecs.filter((c) => c.mimeType.toLowerCase() === "video/" + name);
  if (!named(codec.toLowerCase()).length) return {missing: codec};
  transceiver.setCodecPreferences(named(codec.toLowerCase()).concat(named("rtx")));
  const channel = pc.createDataChannel("control");
  const messages = [];
  channel.onmessage = (event) => messages.push(JSON.parse(event.data));
  const video = document.createElement("video");
  video.muted = video.autoplay = true;
  document.body.appendChild(video);
  pc.ontrack = (event) => { video.srcObject = new MediaStream([event.track]); };
  await pc.setLocalDescription(await pc.createOffer());
  for (let i = 0; i < 100 && pc.iceGatheringState !== "complete"; i++) await sleep(50);
  const headers = {"Content-Type": "application/sdp", "Authorization": "Bearer " + token};
  const response = await fetch("/whep", {method: "POST", headers, body: pc.localDescription.sdp});
  const answer = await response.text();
  if (response.status !== 201) return {status: response.status, answer};
  await pc.setRemoteDescription({type: "answer", sdp: answer});
  let decoded = 0, used = null;
  for (let i = 0; i < 200 && !(decoded >= 20 && video.videoWidth && messages.length); i++) {
    (await pc.getStats()).forEach((s, _, stats) => {
      if (s.type === "inbound-rtp" && s.kind === "video") {
        decoded = s.framesDecoded || 0;
        used = stats.get(s.codecId) ? stats.get(s.codecId).mimeType : null;
      }
    });
    await sleep(50);
  }
  channel.send(JSON.stringify({v: 1, type: "seed", seed: 5, id: "browser"}));
  for (let i = 0; i < 100 && !messages.some((m) => m.id === "browser"); i++) await sleep(50);
  const deleted = (await fetch(response.headers.get("Location"), {method: "DELETE"})).status;
  pc.close();
  return {state: pc.connectionState, decoded, codec: used, width: video.videoWidth, height: video.videoHeight,
          hello: messages.find((m) => m.type === "hello"), reply: messages.find((m) => m.id === "browser"), deleted};
}"""


def test_chromium_plays_vp8_and_h264_and_steers_over_the_data_channel() -> None:
    from tests.web.test_studio import CHROMIUM, CHROMIUM_FLAGS, browser_or_skip

    browser_or_skip()  # skips without Playwright or Chromium (fails instead where CI requires the browser)
    from playwright.async_api import async_playwright

    # Chromium names its host candidates by mDNS unless told not to, and a loopback-only namespace has no mDNS
    needed = ["--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns"]
    flags = list(dict.fromkeys([*CHROMIUM_FLAGS, *needed]))

    async def test(server, base, session, whep) -> None:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
            try:
                page = await browser.new_page()
                await page.goto(f"{base}/metrics")  # any page of the server: fetch("/whep") is same-origin
                played = []
                for codec in ("VP8", "H264"):
                    result = await page.evaluate(CHROMIUM_PLAYER, {"codec": codec, "token": TOKEN})
                    if codec == "H264" and result.get("missing"):
                        continue  # a Chromium built without H264: VP8 is the codec every browser has
                    played.append(codec)
                    assert result["codec"] == f"video/{codec}" and result["decoded"] >= 20, result
                    assert (result["width"], result["height"]) == (64, 64)
                    assert result["hello"]["can_steer"] and result["hello"]["format"] == "webrtc"
                    assert result["reply"]["type"] == "ack" and isinstance(result["reply"]["chunk"], int), result
                    assert result["deleted"] == 200 and whep.peers == {}
                assert played[0] == "VP8"
            finally:
                await browser.close()

    serve(test)


class FailingDecoder:
    """The session's decoder, until `fail` is set: then it raises, and the stream fails."""

    def __init__(self, decoder) -> None:
        self.decoder, self.fail = decoder, False

    def decode(self, latents):
        if self.fail:
            raise RuntimeError("decoder exploded")
        return self.decoder.decode(latents)

    def __getattr__(self, name: str):
        return getattr(self.decoder, name)


def test_a_failed_stream_sends_its_error_and_ends_the_peers() -> None:
    async def main() -> None:
        session = make_session()
        session.decoder = decoder = FailingDecoder(session.decoder)
        server = TestServer(create_app(session), host="127.0.0.1", port=0)
        await server.start_server()
        try:
            async with WhepPlayer(f"http://127.0.0.1:{server.port}") as player:
                await player.wait_frames(3)
                decoder.fail = True
                error = await player.wait_message(lambda m: m["type"] == "error")
                assert error["error"] == "the stream failed: decoder exploded"
                await until(lambda: player.connection_state == "closed", what="the peer's end")
                assert server.app[WHEP_KEY].peers == {} and session.frames.viewers == 0
                offer = await aiortc_offer(("video", "recvonly"))
                async with aiohttp.ClientSession() as http:  # and no new peer is taken on
                    async with http.post(f"http://127.0.0.1:{server.port}/whep", data=offer.encode(),
                                         headers={"Content-Type": SDP_CONTENT_TYPE}) as response:
                        assert response.status == 503 and "has failed: decoder exploded" in await response.text()
        finally:
            await server.close()
        assert isinstance(session.failure, RuntimeError)

    asyncio.run(main())


def test_ice_hosts_are_pinned_once_process_wide() -> None:
    assert pin_ice_host("127.0.0.1") == "127.0.0.1" and pin_ice_host("localhost") == "127.0.0.1"
    pinned = aioice.ice.get_host_addresses
    assert pin_ice_host("127.0.0.1") == "127.0.0.1" and aioice.ice.get_host_addresses is pinned  # installed once
    assert pinned(use_ipv4=True, use_ipv6=True).count("127.0.0.1") == 1
    assert pinned(use_ipv4=False, use_ipv6=True) == [a for a in pinned(True, True) if ":" in a]
    assert pin_ice_host("0.0.0.0") is None and pin_ice_host("::") is None  # wildcard: nothing pinned
    with pytest.raises(ConfigError, match="does not resolve"):
        pin_ice_host("no-such-host.invalid")


def test_ice_servers_and_config_are_checked() -> None:
    assert ice_server("stun:stun.example.org:3478").urls == "stun:stun.example.org:3478"
    turn = ice_server("turn:alice:s%40cret@turn.example.org:3478?transport=udp")
    assert turn.urls == "turn:turn.example.org:3478?transport=udp"
    assert (turn.username, turn.credential) == ("alice", "s@cret")
    for bad in ("http://example.org", "turn:turn.example.org", "stun:", "turn:@host"):
        with pytest.raises(ConfigError):
            ice_server(bad)
    for options in ({"max_peers": 0}, {"frame_capacity": 3}, {"connect_timeout_s": 0}, {"ice_servers": ["x"]},
                    {"max_offer_bytes": True}):
        with pytest.raises(ConfigError):
            WhepConfig(**options)
    assert whep_url("http://h:1") == whep_url("http://h:1/") == whep_url("http://h:1/whep") == "http://h:1/whep"
    assert whep_url("http://h:1?token=t") == "http://h:1/whep?token=t"
