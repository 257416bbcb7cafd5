"""The virtual camera sink: a live session as a webcam (pyvirtualcam) that Zoom, Meet, OBS or a browser can pick.

    session pacing thread --publish--> [sink's own mailbox] --> sink thread (its own small event loop) --> camera

The session's relay mailboxes bind to an asyncio loop, so the sink runs a private loop in its own thread and reads
its mailbox like any viewer: a slow camera drops its own frames and never stalls the stream or the other viewers.
Frames arrive already paced by the session's media clock (the pacing thread publishes each at its deadline), so the
sink sends each one as soon as it arrives with `Camera.send` and never calls `sleep_until_next_frame`, whose own
1/fps timer would pace a second time and drift against the media clock.

Drivers: Linux needs the v4l2loopback kernel module, Windows and macOS the OBS Virtual Camera that OBS Studio
installs. Without one, `open_camera` raises `VirtualCameraUnavailable` naming the driver and how to install it.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import threading
from fractions import Fraction

import numpy as np

from framecast.models.errors import ConfigError, MissingDependency, SessionClosed, ShapeError
from framecast.stream.producer import VideoFrame
from framecast.stream.relay import Mailbox
from framecast.stream.session import Session

log = logging.getLogger("framecast.vcam")

LINUX_DRIVER_HELP = (
    "the Linux virtual camera driver is the v4l2loopback kernel module: install it (Debian/Ubuntu: "
    "sudo apt install v4l2loopback-dkms) and load it with: sudo modprobe v4l2loopback devices=1 exclusive_caps=1"
)
OBS_DRIVER_HELP = (
    "the {system} virtual camera driver is OBS Virtual Camera: install OBS Studio (https://obsproject.com), "
    "then start its virtual camera once (Controls > Start Virtual Camera) so the driver is registered, and stop it "
    "again so FrameCast can use it"
)


class VirtualCameraUnavailable(MissingDependency):
    """No virtual camera can be opened: pyvirtualcam or the operating system's virtual camera driver is missing (or
    the device is busy); the message names the driver and how to install it."""


def driver_help(system: str | None = None) -> str:
    """How to install the virtual camera driver of `system` (platform.system() names; default: this machine's)."""
    system = platform.system() if system is None else system
    if system in ("Windows", "Darwin"):
        return OBS_DRIVER_HELP.format(system="macOS" if system == "Darwin" else system)
    if system == "Linux":
        return LINUX_DRIVER_HELP
    return f"pyvirtualcam has no virtual camera driver for {system}; it supports Linux, Windows and macOS"


def open_camera(width: int, height: int, fps: float, *, device: str | None = None, backend: str | None = None):
    """A `pyvirtualcam.Camera` taking RGB frames of `width` x `height`.

    Raises:
        VirtualCameraUnavailable: pyvirtualcam is not installed, or no virtual camera device could be opened.
        ConfigError: a bad size or fps, or an unknown backend.
    """
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ConfigError(f"{name}={value!r} must be an integer >= 2")
    if not 0 < float(fps) < 1000:
        raise ConfigError(f"fps={fps!r} must be in (0, 1000)")
    try:
        import pyvirtualcam
    except ImportError:
        raise VirtualCameraUnavailable(
            "the virtual camera needs pyvirtualcam: pip install 'framecast[vcam]' (or pip install pyvirtualcam); "
            f"and {driver_help()}"
        ) from None
    backends = pyvirtualcam.camera.BACKENDS  # name -> class; pyvirtualcam.register_backend adds to it
    if backend is not None and backend not in backends:  # checked here: pyvirtualcam would raise a bare KeyError
        raise ConfigError(f"unknown virtual camera backend {backend!r}; this machine has {sorted(backends)}")
    if not backends:
        raise VirtualCameraUnavailable(f"pyvirtualcam has no virtual camera backend on this machine; {driver_help()}")
    try:
        return pyvirtualcam.Camera(width, height, float(fps), fmt=pyvirtualcam.PixelFormat.RGB, device=device,
                                   backend=backend)
    except RuntimeError as exc:  # every backend failed; pyvirtualcam lists each one's reason
        where = f"device {device!r}" if device is not None else "any virtual camera device"
        raise VirtualCameraUnavailable(f"could not open {where} ({exc}); {driver_help()}") from exc


class VirtualCameraSink:
    """Sends a session's frames to a virtual camera from its own thread, each frame as it arrives (paced by the
    session's media clock).

    `start()` opens the camera (raising at once if it cannot) and subscribes before it returns, so every frame
    published afterwards reaches the camera; `close()` unsubscribes and waits for the thread, which closes the
    camera. The thread also ends (and closes the camera) when the session's stream does. A failure (e.g. a frame of
    another size) ends the sink only and is kept in `failure`.
    """

    def __init__(self, session: Session, width: int, height: int, *, device: str | None = None,
                 backend: str | None = None, capacity: int | None = None, camera=None) -> None:
        """`camera`: one already opened by open_camera at this size (e.g. before a slow model load, to fail fast);
        the sink owns it from then on. Otherwise start() opens one on `device` through `backend`."""
        self.session, self.width, self.height = session, width, height
        self.device_name, self.backend_name, self.capacity = device, backend, capacity
        self.fps = Fraction(session.config.fps)
        if camera is not None and (camera.width, camera.height) != (width, height):
            raise ConfigError(f"the camera is open at {camera.width}x{camera.height}, the sink is for {width}x{height}")
        self.camera = camera
        self._device: str | None = None
        self.frames_sent = 0
        self.failure: BaseException | None = None
        self._mailbox: Mailbox[VideoFrame] | None = None
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def device(self) -> str | None:
        """The device the frames go to (e.g. /dev/video0, OBS Virtual Camera), once started."""
        return self._device

    @property
    def dropped(self) -> int:
        """Frames skipped because the camera took them too slowly."""
        return 0 if self._mailbox is None else self._mailbox.dropped

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Open the camera and start sending (once).

        Raises:
            VirtualCameraUnavailable, ConfigError: see open_camera.
            SessionClosed: the session's stream has already ended.
        """
        if self._thread is not None:
            raise RuntimeError("the virtual camera sink is already started")
        if self.camera is None:
            self.camera = open_camera(self.width, self.height, float(self.fps), device=self.device_name,
                                      backend=self.backend_name)
        self._device = self.camera.device
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True,
                                        name=f"framecast-vcam-{self.session.id}")
        self._thread.start()
        self._subscribed.wait()
        if self._mailbox is None:  # the relay was already closed
            self._thread.join()
            raise SessionClosed(f"session {self.session.id} is closed: nothing to send to the virtual camera")
        log.info("session %s: virtual camera %s (%s), %dx%d at %s fps", self.session.id, self._device,
                 self.camera.backend, self.width, self.height, self.fps)

    def join(self, timeout_s: float | None = None) -> None:
        """Wait until the sink ends (the stream ended or close() was called)."""
        if self._thread is not None:
            self._thread.join(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop sending and close the camera (idempotent; any thread but the sink's)."""
        mailbox = self._mailbox
        if mailbox is not None:
            self.session.frames.unsubscribe(mailbox)  # thread-safe: wakes the sink's loop, which then ends
        self.join(timeout_s)
        if self.is_running:
            log.warning("session %s: the virtual camera thread did not end within %.1f s", self.session.id, timeout_s)

    async def _serve(self) -> None:
        """The sink thread: its own mailbox on its own loop; the camera is closed here when the sink ends."""
        try:
            try:
                mailbox = self._mailbox = self.session.frames.subscribe(self.capacity)
            except SessionClosed:
                return
            finally:
                self._subscribed.set()
            try:
                while True:
                    try:
                        frame = await mailbox.get()
                    except SessionClosed:
                        break
                    self._send(frame)
            except Exception as exc:  # this sink ends, loudly; the stream and its other viewers go on
                log.exception("session %s: the virtual camera failed", self.session.id)
                self.failure = exc
            finally:
                self.session.frames.unsubscribe(mailbox)
        finally:
            self.camera.close()

    def _send(self, frame: VideoFrame) -> None:
        rgb = frame.rgb
        if rgb.shape != (self.height, self.width, 3) or rgb.dtype != np.uint8:
            raise ShapeError(f"frame {frame.index} is {rgb.dtype} {rgb.shape}; the virtual camera was opened for "
                             f"uint8 RGB [{self.height}, {self.width}, 3] ({self.width}x{self.height})")
        self.camera.send(rgb)  # no sleep_until_next_frame: the session's pacing thread already kept the time
        self.frames_sent += 1
