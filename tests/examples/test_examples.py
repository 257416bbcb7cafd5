"""The examples end to end: the game client and the prompt schedule against a real `framecast serve` (a subprocess on
127.0.0.1, a free port, a 32x32 tiny model enlarged 2x), the virtual camera example through a recording pyvirtualcam
backend (registered with pyvirtualcam.register_backend; tests/stream/sinks/test_vcam.py's RecordingCamera)."""

from __future__ import annotations

import glob
import importlib.util
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import pyvirtualcam
import torch

from tests.serving import framecast_serve

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TOKEN = "ex4mple"


def serve(*args: str):
    """Start `framecast serve <args>` on 127.0.0.1 and a free port; yield the port once /metrics answers."""
    with framecast_serve(*args, token=TOKEN) as served:
        yield served.port


@pytest.fixture(scope="module")
def server():
    """The tiny preset (random weights) at 16 fps, 32x32 px enlarged to 64x64."""
    yield from serve("--preset", "tiny", "--height", "32", "--width", "32", "--output-scale", "2", "--dtype", "float32",
                     "--fps", "16", "--latency-budget", "0.5")


@pytest.fixture(scope="module")
def world():
    """The world simulator (takes actions: arrow keys move its agent) at 30 fps, 128x128 px."""
    yield from serve("--simulator", "--fps", "30", "--latency-budget", "0.3")


def read_png(path: Path) -> np.ndarray:
    """RGB [H, W, 3] of a PNG as the examples write it (8-bit RGB, every row with filter 0)."""
    data = path.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    chunks, at = [], 8
    while at < len(data):
        (size,), kind = struct.unpack(">I", data[at:at + 4]), data[at + 4:at + 8]
        if kind == b"IDAT":
            chunks.append(data[at + 8:at + 8 + size])
        at += 12 + size
    rows = np.frombuffer(zlib.decompress(b"".join(chunks)), np.uint8).reshape(height, 1 + 3 * width)
    assert not rows[:, 0].any()
    return rows[:, 1:].reshape(height, width, 3)


def run_example(name: str, *args: str, timeout_s: float = 40) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=timeout_s)


def test_game_client_plays_a_script_gets_every_control_acknowledged_and_saves_the_latest_frame(server, tmp_path):
    png = tmp_path / "latest.png"
    result = run_example("game_client.py", "--port", str(server), "--token", TOKEN, "--script",
                         "right:0.5s,pause:0.5s,resume:1s,left:0.5s", "--png", str(png), "--stats-every", "0.5")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert re.search(r"hello: session \w+, 16 fps, format jpeg, can steer: True, actions: 0", out)
    # the tiny preset takes no actions: the client says so and sends none; pause and resume are acknowledged
    assert "this model takes no actions (num_actions 0)" in out
    assert re.search(r"ack #1 pause: in effect from chunk \d+", out)
    assert re.search(r"ack #2 resume: in effect from chunk \d+", out)
    frames = int(re.search(r"done: frames (\d+) \(", out).group(1))
    assert frames >= 10
    assert "2 controls, 2 acks, 0 errors, 0 unanswered" in out
    data = png.read_bytes()  # a PNG of the 64x64 RGB frame (IHDR: width, height, bit depth 8, colour type 2)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">IIBB", data[16:26]) == (64, 64, 8, 2)


def test_game_client_steers_the_worlds_agent_left_and_right(world, tmp_path):
    from framecast.models.world.ground_truth import read_agent

    positions = {}
    for step in ("left", "right"):
        for attempt in range(3):  # a bouncing ball may cover the agent in the one frame saved: hold the key again
            png = tmp_path / f"{step}{attempt}.png"
            result = run_example("game_client.py", "--port", str(world), "--token", TOKEN, "--format", "rgb",
                                 "--script", f"{step}:1.2s", "--png", str(png))
            out = result.stdout
            assert result.returncode == 0, out + result.stderr
            action = {"left": 3, "right": 4}[step]
            assert re.search(rf"ack #1 action {step} \({action}\): in effect from chunk \d+", out), out
            assert "1 controls, 1 acks, 0 errors, 0 unanswered" in out
            positions[step] = read_agent(read_png(png))
            if positions[step] is not None:
                break
        assert positions[step] is not None, f"no agent in the last frame after {step}, 3 times"
    assert positions["right"].xy[0] > positions["left"].xy[0]  # it moved the way the key said


def load_example(name: str):
    """An example script as a module (registered in sys.modules while it runs: its dataclasses need that)."""
    spec = importlib.util.spec_from_file_location(f"framecast_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_game_client_parses_scripts() -> None:
    module = load_example("game_client")
    steps = module.parse_script("right:2s, up:250ms,none,4:0.5,pause:1")
    assert [(s.step, s.seconds) for s in steps] == [("right", 2.0), ("up", 0.25), ("none", 1.0), ("right", 0.5),
                                                    ("pause", 1.0)]
    assert module.ACTIONS == {"none": 0, "up": 1, "down": 2, "left": 3, "right": 4}
    from framecast.models.world.vocabulary import Action

    assert all(module.ACTIONS[a.name.lower()] == a.value for a in Action)
    with pytest.raises(Exception, match="script step 'jump:1s'"):
        module.parse_script("jump:1s")


def test_prompt_schedule_reports_each_prompts_chunk_and_time_to_effect(server):
    result = run_example("prompt_schedule.py", "--port", str(server), "--token", TOKEN,
                         "--schedule", "0:a sunny grass field,1:snowfall, at night", "--hold", "8")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    acks = re.findall(r"ack: '([^']+)' in effect from chunk (\d+)", out)
    assert [prompt for prompt, _ in acks] == ["a sunny grass field", "snowfall, at night"]
    assert int(acks[0][1]) < int(acks[1][1])
    effects = re.findall(r"on screen: '([^']+)' from frame \d+ \(chunk (\d+)\), (\d+) ms after it was sent", out)
    assert sorted(prompt for prompt, _, _ in effects) == ["a sunny grass field", "snowfall, at night"]
    assert all(chunk == dict(acks)[prompt] for prompt, chunk, _ in effects)
    assert all(0 < int(ms) < 8000 for _, _, ms in effects)


def test_prompt_schedule_without_the_token_is_told_to_pass_it(server):
    result = run_example("prompt_schedule.py", "--port", str(server), "--schedule", "0:a fox")
    assert result.returncode == 2
    assert "refuses steering without the session token (pass --token)" in result.stderr


@pytest.fixture
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_virtual_camera_example_feeds_every_frame_to_the_camera(capsys, restore_torch_threads) -> None:
    from tests.stream.sinks.test_vcam import RecordingCamera

    pyvirtualcam.register_backend("framecast-example-recording", RecordingCamera)
    RecordingCamera.opened.clear()
    try:
        code = load_example("virtual_camera").main(["--backend", "framecast-example-recording", "--seconds", "2", "--size", "32",
                                           "--output-scale", "2", "--fps", "16", "--stats-every", "0.5"])
    finally:
        pyvirtualcam.camera.BACKENDS.pop("framecast-example-recording")
    out = capsys.readouterr().out
    assert code == 0, out
    (camera,) = RecordingCamera.opened
    assert (camera.width, camera.height, camera.fps) == (64, 64, 16.0) and camera.closed == 1
    assert len(camera.frames) >= 8 and all(frame.shape == (64 * 64 * 3,) for frame in camera.frames)
    assert np.ptp(np.stack(camera.frames[-2:])) > 0  # pictures, not blanks
    assert "virtual_camera: sending 64x64 at 16 fps to recording0 (framecast-example-recording)" in out
    assert f"virtual_camera: done: {len(camera.frames)} frames sent to recording0" in out


@pytest.mark.skipif(sorted(glob.glob("/dev/video*")) != [], reason="this machine has video devices")
def test_virtual_camera_example_without_a_driver_says_how_to_install_one(capsys, restore_torch_threads) -> None:
    code = load_example("virtual_camera").main(["--backend", "v4l2loopback", "--seconds", "1"])
    assert code == 3
    error = capsys.readouterr().err
    assert error.startswith("virtual_camera: no virtual camera is available")
    assert "sudo modprobe v4l2loopback devices=1 exclusive_caps=1" in error
