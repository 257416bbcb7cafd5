"""The studio in a real browser: headless Chromium (Debian's package) driven by Playwright, on 127.0.0.1 only.

The stream is the world simulator (stream/simulator.py) at 128 px enlarged 4x to 512 px, so every effect has a
known look: `read_setting`/`read_agent` on the frame the page shows say when a prompt switch or a key press
became visible. Measured numbers and a screenshot go to $FRAMECAST_ARTIFACTS (default test-artifacts/).

Skips when Playwright or Chromium is missing; FRAMECAST_REQUIRE_BROWSER=1 (set by .ci/run) makes that a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from framecast.models.world.ground_truth import read_agent, read_setting
from framecast.models.world.vocabulary import Terrain, TimeOfDay
from framecast.stream.server import WHEP_KEY, create_app
from framecast.stream.session import Session, SessionConfig
from framecast.stream.simulator import PixelDecoder, SimulatorConfig, WorldSimulator

CHROMIUM = os.environ.get("FRAMECAST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--allow-loopback-in-peer-connection",
    # host candidates as plain addresses, not mDNS names: no multicast resolver exists in a loopback-only namespace
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]
FPS = 16
SCALE = 4
TOKEN = "studio-token"
ARTIFACTS = Path(os.environ.get("FRAMECAST_ARTIFACTS", "test-artifacts"))


def browser_or_skip():
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why, sync_playwright = "Python playwright is not installed (pip install playwright)", None
    if why is None and shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        why = f"{CHROMIUM} not found (apt-get install -y chromium)"
    if why is not None:
        if os.environ.get("FRAMECAST_REQUIRE_BROWSER") == "1":
            pytest.fail(why + "; FRAMECAST_REQUIRE_BROWSER=1 makes this a failure")
        pytest.skip(why)
    return sync_playwright


class ServerThread:
    """`framecast serve` in-process: the aiohttp app on its own event loop in a thread, bound to 127.0.0.1."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    def __enter__(self) -> ServerThread:
        self.thread.start()

        async def start() -> int:
            self.app = create_app(self.session, ice_host="127.0.0.1")
            self.runner = web.AppRunner(self.app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            return self.runner.addresses[0][1]

        self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        return self

    def end_webrtc_peers(self) -> None:
        """End every WebRTC peer from the server's side, as a network failure or a server restart would."""
        endpoint = self.app[WHEP_KEY]

        async def end() -> None:
            await asyncio.gather(*(peer.close("ended by the test") for peer in list(endpoint.peers.values())))

        asyncio.run_coroutine_threadsafe(end(), self.loop).result(10)

    def __exit__(self, *exc) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def shown(page, size: int = 128) -> np.ndarray:
    """The frame the page's video shows now, scaled back to the world's 128 px."""
    return np.asarray(page.evaluate(f"studio.grab({size})"), dtype=np.uint8).reshape(size, size, 3)


def wait_for(condition, timeout_s: float, poll_s: float = 0.05):
    """Poll until `condition()` is truthy; returns (value, seconds waited) or fails."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        value = condition()
        if value:
            return value, time.monotonic() - start
        time.sleep(poll_s)
    pytest.fail(f"condition not met within {timeout_s} s")


def test_the_studio_plays_webrtc_switches_prompts_and_steers_the_agent(tmp_path):
    sync_playwright = browser_or_skip()
    simulator = WorldSimulator(SimulatorConfig(seed=5))
    session = Session(simulator, PixelDecoder(), simulator.encode_prompt,
                      SessionConfig(fps=FPS, latency_budget_s=0.5, output_scale=SCALE), token=TOKEN,
                      session_id="browser")
    results: dict[str, object] = {"fps_target": FPS, "frame_px": 128 * SCALE}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with ServerThread(session) as server, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = context.new_page()
            console: list[str] = []
            page.on("console", lambda message: console.append(message.text))
            page.goto(f"http://127.0.0.1:{server.port}/?token={TOKEN}")
            try:
                page.wait_for_function("studio.state === 'connected' && studio.framesDecoded > 8", timeout=30_000)
            except Exception:
                pytest.fail(f"no video: state={page.evaluate('studio.state')}, log={page.inner_text('#log')!r}, "
                            f"console={console[-20:]}")
            assert page.evaluate("studio.hello.can_steer") is True

            # frames decoded (getStats) grows at the target rate
            decoded, start = page.evaluate("studio.framesDecoded"), time.monotonic()
            time.sleep(4.0)
            rate = (page.evaluate("studio.framesDecoded") - decoded) / (time.monotonic() - start)
            results["decoded_fps"] = round(rate, 2)
            assert 0.8 * FPS <= rate <= 1.25 * FPS, f"decoded {rate:.1f} fps; target {FPS}"

            # a typed prompt: time from Enter to the first shown frame with the new setting
            before = read_setting(shown(page))
            assert (before.terrain, before.time) == (Terrain.GRASS, TimeOfDay.DAY)
            page.fill("#prompt", "snow at night")
            page.press("#prompt", "Enter")  # wait_for times from here

            def switched() -> bool:
                setting = read_setting(shown(page))
                return setting.terrain is Terrain.SNOW and setting.time is TimeOfDay.NIGHT

            _, effect_s = wait_for(switched, timeout_s=5.0)
            results["prompt_to_visible_s"] = round(effect_s, 3)
            acks = page.evaluate("studio.acks")
            assert [a["control"] for a in acks] == ["prompt"] and not acks[0]["superseded"]

            # keys: hold a direction with room to move, the agent moves that way
            page.click("#video")
            agent = read_agent(shown(page))
            assert agent is not None, "no agent visible in the stream"
            key, sign = ("ArrowLeft", -1) if agent.xy[0] > 64 else ("ArrowRight", 1)
            page.keyboard.down(key)

            def moved() -> bool:
                now = read_agent(shown(page))
                return now is not None and sign * (now.xy[0] - agent.xy[0]) > 8

            _, move_s = wait_for(moved, timeout_s=5.0)
            results["key_to_visible_move_s"] = round(move_s, 3)
            page.keyboard.up(key)
            time.sleep(1.0)  # released: the agent glides to rest
            rest = read_agent(shown(page))
            time.sleep(0.5)
            assert rest is not None and abs(read_agent(shown(page)).xy[0] - rest.xy[0]) <= 2.0
            assert [a["control"] for a in page.evaluate("studio.acks")][1:] == ["action", "action"]
            assert page.evaluate("studio.errors") == []

            page.screenshot(path=str(ARTIFACTS / "studio.png"))
            results["frames_decoded"] = page.evaluate("studio.framesDecoded")
            results["frames_dropped"] = page.evaluate("studio.framesDropped")

            # the connection drops: the page says so, reconnects by itself, and the video goes on
            server.end_webrtc_peers()
            page.wait_for_function("!document.getElementById('banner').hidden", timeout=10_000)
            results["drop_banner"] = page.inner_text("#banner")
            page.wait_for_function("studio.connects >= 2 && studio.state === 'connected'", timeout=20_000)
            page.wait_for_function("studio.framesDecoded > 16", timeout=10_000)  # counted per connection
            assert page.evaluate("document.getElementById('banner').hidden")
        finally:
            context.close()
    (ARTIFACTS / "studio.json").write_text(json.dumps(results, indent=2))
    print("studio:", results)
