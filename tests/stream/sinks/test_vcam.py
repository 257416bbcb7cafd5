"""The virtual camera sink with a real session (tiny DiT, preview decoder, 16x faster than real time) and a recording
pyvirtualcam backend (registered through pyvirtualcam.register_backend, the library's own extension point), plus the
errors a machine without a virtual camera driver gets, and a real /dev/video device where there is one."""

from __future__ import annotations

import asyncio
import glob
import platform
import sys
import threading
import time

import numpy as np
import pytest
import pyvirtualcam
from pyvirtualcam.util import encode_fourcc

from framecast.models.errors import ConfigError, MissingDependency, SessionClosed, ShapeError
from framecast.stream.producer import VideoFrame
from framecast.stream.session import Session
from framecast.stream.sinks.vcam import VirtualCameraSink, VirtualCameraUnavailable, driver_help, open_camera
from tests.stream.test_server import make_session

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

BACKEND = "framecast-recording"
VIDEO_DEVICES = sorted(glob.glob("/dev/video*"))


class RecordingCamera:
    """A pyvirtualcam backend that keeps what it is sent and when (what a v4l2loopback device would get)."""

    opened: list[RecordingCamera] = []

    def __init__(self, *, width: int, height: int, fps: float, fourcc: int, device: str | None, **kw) -> None:
        self.width, self.height, self.fps, self.fourcc = width, height, fps, fourcc
        self._device = device if device is not None else "recording0"
        self.frames: list[np.ndarray] = []
        self.sent_at: list[float] = []  # time.monotonic() of each send
        self.closed = 0
        RecordingCamera.opened.append(self)

    def send(self, frame: np.ndarray) -> None:
        self.sent_at.append(time.monotonic())
        self.frames.append(frame.copy())

    def close(self) -> None:
        self.closed += 1

    def device(self) -> str:
        return self._device

    def native_fourcc(self) -> int:
        return self.fourcc


class BusyCamera(RecordingCamera):
    """A backend whose device cannot be opened (what pyvirtualcam's native backends raise without a driver)."""

    def __init__(self, **kw) -> None:
        raise RuntimeError("device /dev/video7 is busy")


@pytest.fixture(autouse=True)
def recording_backend():
    pyvirtualcam.register_backend(BACKEND, RecordingCamera)
    pyvirtualcam.register_backend("framecast-busy", BusyCamera)
    RecordingCamera.opened.clear()
    yield
    for name in (BACKEND, "framecast-busy"):
        pyvirtualcam.camera.BACKENDS.pop(name, None)


class Watcher:
    """A second viewer of the session's frames on its own loop: the reference the camera's frames are checked
    against."""

    def __init__(self, session: Session) -> None:
        self.frames: list[VideoFrame] = []
        ready = threading.Event()

        async def watch() -> None:
            mailbox = session.frames.subscribe(4096)
            ready.set()
            try:
                while True:
                    self.frames.append(await mailbox.get())
            except SessionClosed:
                pass

        self.thread = threading.Thread(target=asyncio.run, args=(watch(),), daemon=True)
        self.thread.start()
        ready.wait()


def wall_time(session: Session, media_s: float) -> float:
    """The time.monotonic() at which the session's (speed-scaled) clock reads `media_s`."""
    origin = session.time.origin
    return origin + (media_s - origin) / session.time.speed


def test_frames_reach_the_camera_in_order_with_the_right_size_and_format_at_the_session_rate() -> None:
    session = make_session()
    watcher = Watcher(session)
    sink = VirtualCameraSink(session, 64, 64, backend=BACKEND, capacity=4096)
    sink.start()
    (camera,) = RecordingCamera.opened
    assert (camera.width, camera.height, camera.fps) == (64, 64, 16.0)
    assert camera.fourcc == encode_fourcc("raw ") and sink.device == "recording0"  # pyvirtualcam's RGB
    session.start()
    while len(camera.frames) < 96:
        assert session.failure is None and sink.is_running
        time.sleep(0.01)
    session.close()
    sink.join(5.0)
    watcher.thread.join(5.0)
    assert not sink.is_running and sink.failure is None and camera.closed == 1
    assert len(camera.frames) == len(watcher.frames) == session.frames.published == sink.frames_sent
    for sent, frame in zip(camera.frames, watcher.frames):  # every frame, in order, as RGB [H, W, 3] bytes
        assert sent.dtype == np.uint8 and sent.shape == (64 * 64 * 3,)
        assert np.array_equal(sent.reshape(64, 64, 3), frame.rgb)
    assert [f.index for f in watcher.frames] == list(range(len(watcher.frames)))
    # paced once, by the media clock: each frame goes out at its deadline, not before and not a camera period later
    lags = np.array([at - wall_time(session, f.deadline_s) for at, f in zip(camera.sent_at, watcher.frames)])
    assert lags.min() > -0.002, lags.min()
    assert np.median(lags) < 0.02, np.median(lags)
    seconds = camera.sent_at[-1] - camera.sent_at[0]
    nominal = (len(camera.frames) - 1) / (16 * session.time.speed)
    assert 0.9 * nominal <= seconds <= 2.0 * nominal, (seconds, nominal)


def test_a_frame_of_another_size_ends_the_sink_only() -> None:
    session = make_session()
    sink = VirtualCameraSink(session, 32, 48, backend=BACKEND)
    sink.start()
    session.start()
    try:
        sink.join(10.0)
        assert isinstance(sink.failure, ShapeError)
        assert str(sink.failure) == ("frame 0 is uint8 (64, 64, 3); the virtual camera was opened for uint8 RGB "
                                     "[48, 32, 3] (32x48)")
        assert RecordingCamera.opened[0].closed == 1 and session.frames.viewers == 0
        assert session.is_running and session.failure is None  # the stream goes on
    finally:
        session.close()


def test_close_unsubscribes_and_closes_the_camera_once() -> None:
    session = make_session()
    sink = VirtualCameraSink(session, 64, 64, backend=BACKEND, device="studio-cam")
    sink.start()
    session.start()
    try:
        camera = RecordingCamera.opened[0]
        while not camera.frames:
            time.sleep(0.01)
        sink.close()
        assert not sink.is_running and camera.closed == 1 and session.frames.viewers == 0
        sent = len(camera.frames)
        time.sleep(0.1)  # ~25 more frames are published meanwhile
        assert len(camera.frames) == sent and sink.device == "studio-cam"
        sink.close()  # idempotent
        assert camera.closed == 1
    finally:
        session.close()


def test_a_closed_session_cannot_feed_a_camera() -> None:
    session = make_session()
    session.close()
    sink = VirtualCameraSink(session, 64, 64, backend=BACKEND)
    with pytest.raises(SessionClosed, match="session test is closed: nothing to send to the virtual camera"):
        sink.start()
    assert RecordingCamera.opened[0].closed == 1


@pytest.mark.skipif(platform.system() != "Linux" or bool(VIDEO_DEVICES),
                    reason="needs Linux without /dev/video* (v4l2loopback's own no-device error)")
def test_without_v4l2loopback_the_error_names_the_driver_and_how_to_load_it() -> None:
    with pytest.raises(VirtualCameraUnavailable) as info:
        open_camera(64, 64, 16, backend="v4l2loopback")
    message = str(info.value)
    assert "No v4l2 loopback device found" in message  # pyvirtualcam's reason, kept
    assert "v4l2loopback kernel module" in message
    assert "sudo modprobe v4l2loopback devices=1 exclusive_caps=1" in message
    assert isinstance(info.value, MissingDependency)


def test_a_device_that_cannot_be_opened_gives_the_reason_and_the_driver_help() -> None:
    with pytest.raises(VirtualCameraUnavailable) as info:
        open_camera(64, 64, 16, device="/dev/video7", backend="framecast-busy")
    assert str(info.value).startswith("could not open device '/dev/video7' ('framecast-busy' backend: device "
                                      "/dev/video7 is busy); ")
    assert str(info.value).endswith(driver_help())


def test_the_driver_help_names_each_systems_driver() -> None:
    assert "sudo modprobe v4l2loopback devices=1 exclusive_caps=1" in driver_help("Linux")
    for system, name in (("Windows", "Windows"), ("Darwin", "macOS")):
        assert f"the {name} virtual camera driver is OBS Virtual Camera: install OBS Studio" in driver_help(system)
    assert "no virtual camera driver for Plan9" in driver_help("Plan9")


def test_without_pyvirtualcam_the_error_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)  # what `import pyvirtualcam` meets when not installed
    with pytest.raises(VirtualCameraUnavailable, match=r"needs pyvirtualcam: pip install 'framecast\[vcam\]'"):
        open_camera(64, 64, 16)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown virtual camera backend 'nope'; this machine has \[.*'framecast-"):
        open_camera(64, 64, 16, backend="nope")
    with pytest.raises(ConfigError, match="width=0 must be an integer >= 2"):
        open_camera(0, 64, 16)
    with pytest.raises(ConfigError, match=r"fps=0 must be in \(0, 1000\)"):
        open_camera(64, 64, 0)


@pytest.mark.skipif(not VIDEO_DEVICES, reason="no /dev/video* device: load v4l2loopback "
                    "(sudo modprobe v4l2loopback devices=1 exclusive_caps=1) to run this on a real virtual camera")
def test_a_real_virtual_camera_device_takes_the_stream() -> None:
    session = make_session()
    sink = VirtualCameraSink(session, 64, 64)
    try:
        sink.start()
    except VirtualCameraUnavailable as exc:
        pytest.skip(f"the video devices here are not usable virtual cameras: {exc}")
    session.start()
    try:
        deadline = time.monotonic() + 10.0
        while sink.frames_sent < 32 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sink.frames_sent >= 32 and sink.failure is None and sink.device.startswith("/dev/video")
    finally:
        session.close()
        sink.close()
