"""Live video input for video-to-video: frames pushed from outside (a websocket client, a webcam, a file played at
its own rate), kept in a bounded buffer, and taken by the generation thread one chunk's group at a time.

    producer (event loop / feed thread): put(frame) -> LiveFrames (newest `capacity_frames`, resized to the model size)
    generation thread: LiveVideo.next_latents() -> LiveFrames.take(group) -> LatentSource.encode -> engine source

The rate rule (`LiveFrames.take`): a group is the frames that arrived since the previous group, resampled evenly to
the group's size and ending with the newest frame. So an input faster than the stream is thinned (the frames left
out are counted as dropped) and keeps its speed of motion, a slower input has frames repeated (counted), and a chunk
the scheduler skipped costs nothing: the next group simply spans more time. When nothing new has arrived, the take
waits at most `max_wait_s` (a network hiccup shorter than that costs nothing) and then repeats the last frame: the
generation thread runs on a media clock that every viewer watches, so it must never block on a stalled input; a
frozen input shows as a still scene. Before the first frame arrives the last frame is mid-gray; frames that arrive
during the session's warm-up are stale by the time it streams and are discarded (but the newest).

Websocket ingest messages (`/ingest?token=...`, stream/server.py), binary, one picture each: a 6-byte little-endian
header, then the picture.

    offset  size  field
    0       1     header version (1)
    1       1     format: 0 raw RGB (uint8 [H, W, 3], row-major), 1 JPEG (baseline or progressive, any subsampling)
    2       2     width in pixels (1..4096)
    4       2     height in pixels (1..4096)

Any size is accepted and resized (stretched) to the model's pixel size. A malformed picture raises `BadMessage`
naming what is wrong; the server replies with it on that connection only, as JSON text (stream/control.py's error,
`seq` counting this connection's messages from 1), after a `{"type": "hello", "width": W, "height": H, "max_bytes":
N, ...}` at connect. Accepted pictures get no reply (`/metrics` counts them).
"""

from __future__ import annotations

import enum
import logging
import platform
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from torch import Tensor

from framecast.models.errors import BadMessage, ConfigError, ShapeError
from framecast.stream.sources import LatentSource

log = logging.getLogger("framecast.input")

INGEST_HEADER = struct.Struct("<BBHH")
INGEST_HEADER_VERSION = 1
MAX_INGEST_SIDE = 4096
MID_GRAY = 128  # the picture before any input arrives: ~0 in the encoder's [-1, 1] range
DEFAULT_FRAME_PERIOD_S = 1 / 30  # a looping file whose last frame's duration is unknown


class IngestFormat(enum.Enum):
    RGB = 0
    JPEG = 1


class InputKind(enum.Enum):
    WEBSOCKET = "ws"  # pictures pushed to /ingest
    WEBCAM = "webcam"  # a capture device through PyAV
    FILE = "file"  # a video file played at its own rate, looping


# the capture format PyAV (ffmpeg) reads cameras with, and the default device, per OS
CAMERA_FORMATS = {"Linux": ("v4l2", "/dev/video0"), "Darwin": ("avfoundation", "0"), "Windows": ("dshow", None)}


@dataclass(frozen=True)
class InputSpec:
    """What `--input` names: `ws`, `webcam[:DEVICE]` or a video file."""

    kind: InputKind
    location: str | None = None  # the device (webcam) or path (file)

    def __str__(self) -> str:
        return self.kind.value if self.location is None else f"{self.kind.value}:{self.location}"


def parse_input(text: str) -> InputSpec:
    """`ws` -> WEBSOCKET; `webcam` or `webcam:/dev/video2` -> WEBCAM (default device of this OS); else a FILE path.

    Raises:
        ConfigError: empty text, or `webcam:` with no device.
    """
    if not text:
        raise ConfigError("--input is empty; give ws, webcam[:DEVICE] or a video file")
    if text == InputKind.WEBSOCKET.value:
        return InputSpec(InputKind.WEBSOCKET)
    if text == "webcam" or text.startswith("webcam:"):
        device = text.partition(":")[2] if ":" in text else None
        if device == "":
            raise ConfigError(f"--input {text!r} names no device; e.g. webcam:/dev/video0")
        return InputSpec(InputKind.WEBCAM, device)
    return InputSpec(InputKind.FILE, text)


@dataclass(frozen=True)
class LiveFramesConfig:
    """The live buffer's size and rules, validated at construction."""

    width: int  # model pixel size: every frame is resized to it
    height: int
    capacity_frames: int = 64  # frames kept between two takes; more arrive than this: the oldest are dropped
    max_wait_s: float = 0.1  # how long a take waits for a first new frame before repeating the last one

    def __post_init__(self) -> None:
        for name in ("width", "height", "capacity_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        if not 0 <= self.max_wait_s < float("inf"):
            raise ConfigError(f"max_wait_s={self.max_wait_s!r} must be a finite number >= 0")


def resize(picture: av.VideoFrame, width: int, height: int) -> np.ndarray:
    """uint8 RGB [height, width, 3] of any PyAV picture (stretched: the model's frame is fixed)."""
    return picture.reformat(width=width, height=height, format="rgb24").to_ndarray()


class LiveFrames:
    """The newest input frames, thread-safe and bounded; `put` never waits, `take` waits at most `max_wait_s`.

    Counters (read any time): `received`, `dropped` (never used: overflow or thinned out), `repeated` (slots of a
    group filled by a frame used again), `stalls` (takes with no new frame at all).
    """

    def __init__(self, config: LiveFramesConfig) -> None:
        self.config = config
        self._new: deque[np.ndarray] = deque()
        self._last = np.full((config.height, config.width, 3), MID_GRAY, np.uint8)
        self._cond = threading.Condition()
        self.is_closed = False
        self.received = self.dropped = self.repeated = self.stalls = 0

    def put(self, rgb: np.ndarray) -> None:
        """Add a frame, uint8 [h, w, 3] of any size (resized to the model's). Any thread.

        Raises:
            ShapeError: not uint8 [h, w, 3].
        """
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ShapeError(f"input frames must be uint8 [H, W, 3]; got {rgb.dtype} {rgb.shape}")
        config = self.config
        if rgb.shape[:2] != (config.height, config.width):
            rgb = resize(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24"),
                         config.width, config.height)
        with self._cond:
            if len(self._new) == config.capacity_frames:
                self._new.popleft()
                self.dropped += 1
            self._new.append(rgb)
            self.received += 1
            self._cond.notify_all()

    def take(self, count: int) -> np.ndarray | None:
        """`count` frames uint8 [count, H, W, 3]: those that arrived since the last take, resampled evenly and ending
        with the newest (see the module docstring); None once closed."""
        with self._cond:
            if not self._new:
                self._cond.wait_for(lambda: self._new or self.is_closed, timeout=self.config.max_wait_s)
            if self.is_closed:
                return None
            is_stalled = not self._new
            new = [self._last] if is_stalled else list(self._new)
            self._new.clear()
            self._last = new[-1]
            # newest first, evenly spaced back to the oldest: distinct when there are enough, repeats when not
            picks = np.round(np.linspace(len(new) - 1, 0, count)).astype(int)[::-1]
            used = 0 if is_stalled else len(set(picks.tolist()))  # a stall's frame was used before: all repeats
            self.stalls += is_stalled
            self.dropped += 0 if is_stalled else len(new) - used
            self.repeated += count - used
        return np.stack([new[i] for i in picks])

    def discard(self) -> None:
        """Drop the frames waiting (counted) but the newest, kept as the frame a stall repeats: what arrived before
        the stream (re)started is stale."""
        with self._cond:
            if self._new:
                self._last = self._new[-1]
                self.dropped += len(self._new) - 1
                self._new.clear()

    def close(self) -> None:
        """Wake and end any take (idempotent)."""
        with self._cond:
            self.is_closed = True
            self._cond.notify_all()


def decode_ingest_frame(data: bytes, width: int, height: int) -> np.ndarray:
    """The picture of one ingest message (see the module docstring) as uint8 RGB [height, width, 3].

    Raises:
        BadMessage: too short, an unknown version or format, a size out of range, a raw picture of the wrong length,
            or a JPEG that does not decode or whose size differs from the header's.
    """
    if len(data) < INGEST_HEADER.size:
        raise BadMessage(f"frame message is {len(data)} bytes; the header alone is {INGEST_HEADER.size}")
    version, code, frame_width, frame_height = INGEST_HEADER.unpack_from(data)
    if version != INGEST_HEADER_VERSION:
        raise BadMessage(f"frame header version {version}; expected {INGEST_HEADER_VERSION}")
    formats = {f.value: f for f in IngestFormat}
    if code not in formats:
        raise BadMessage(f"frame format code {code}; expected 0 (raw RGB) or 1 (JPEG)")
    if not (1 <= frame_width <= MAX_INGEST_SIDE and 1 <= frame_height <= MAX_INGEST_SIDE):
        raise BadMessage(f"frame size {frame_width}x{frame_height}; each side must be in [1, {MAX_INGEST_SIDE}]")
    payload = data[INGEST_HEADER.size:]
    if formats[code] is IngestFormat.RGB:
        expected = frame_width * frame_height * 3
        if len(payload) != expected:
            raise BadMessage(f"raw frame of {len(payload)} bytes; {frame_width}x{frame_height} RGB needs {expected}")
        rgb = np.frombuffer(payload, np.uint8).reshape(frame_height, frame_width, 3)
        if (frame_height, frame_width) == (height, width):
            return rgb.copy()
        return resize(av.VideoFrame.from_ndarray(rgb, format="rgb24"), width, height)
    declared = jpeg_size(payload)  # before decoding: a small file may declare a huge picture
    if declared != (frame_width, frame_height):
        raise BadMessage(f"JPEG frame header declares {declared[0]}x{declared[1]}; the message header says "
                         f"{frame_width}x{frame_height}" if declared else "JPEG frame has no start-of-frame marker")
    try:
        pictures = av.CodecContext.create("mjpeg", "r").decode(av.Packet(payload))
    except (av.error.FFmpegError, ValueError) as error:
        raise BadMessage(f"JPEG frame does not decode: {error}") from None
    if not pictures:
        raise BadMessage(f"JPEG frame of {len(payload)} bytes holds no picture")
    picture = pictures[0]
    if (picture.width, picture.height) != (frame_width, frame_height):
        raise BadMessage(f"JPEG picture is {picture.width}x{picture.height}; the header says {frame_width}x{frame_height}")
    return resize(picture, width, height)


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start of frame (baseline, progressive, ...)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment, without decoding; None if there is none."""
    if data[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            at += 2
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in _SOF_MARKERS:
            if at + 9 > len(data):
                return None
            height = int.from_bytes(data[at + 5 : at + 7], "big")
            width = int.from_bytes(data[at + 7 : at + 9], "big")
            return width, height
        at += 2 + length
    return None


def pack_ingest_frame(rgb: np.ndarray | None = None, *, jpeg: bytes | None = None, size: tuple[int, int] = (0, 0)) -> bytes:
    """One ingest message (what a client sends): raw `rgb` uint8 [H, W, 3], or `jpeg` bytes of a (width, height)
    picture."""
    if rgb is not None:
        height, width, _ = rgb.shape
        return INGEST_HEADER.pack(INGEST_HEADER_VERSION, IngestFormat.RGB.value, width, height) + rgb.tobytes()
    width, height = size
    return INGEST_HEADER.pack(INGEST_HEADER_VERSION, IngestFormat.JPEG.value, width, height) + jpeg


# feeds: a thread per device or file, pushing frames into a LiveFrames
def camera_format(system: str | None = None) -> tuple[str, str | None]:
    """(ffmpeg capture format, default device) of this OS; raises ConfigError on one PyAV cannot capture from."""
    system = system or platform.system()
    if system not in CAMERA_FORMATS:
        raise ConfigError(f"no webcam capture format known for {system}; known: {sorted(CAMERA_FORMATS)}")
    return CAMERA_FORMATS[system]


def open_webcam(device: str | None) -> av.container.InputContainer:
    """The capture device opened through PyAV (Linux v4l2; macOS avfoundation; Windows dshow).

    Raises:
        ConfigError: no device given where this OS has no default, or it cannot be opened (names the device, the
            format tried, and the formats of the other systems).
    """
    capture, default = camera_format()
    device = device or default
    if device is None:
        raise ConfigError(f"--input webcam on {platform.system()} needs a device: webcam:video=<camera name> "
                          f"({capture}; list them with `ffmpeg -list_devices true -f {capture} -i dummy`)")
    try:
        return av.open(device, format=capture)
    except (OSError, av.error.FFmpegError) as error:
        raise ConfigError(f"cannot open webcam {device!r} with format {capture!r}: {error} (capture formats: v4l2 "
                          "on Linux, avfoundation on macOS, dshow on Windows; give the device as --input "
                          "webcam:DEVICE, e.g. webcam:/dev/video1, webcam:0 on macOS, webcam:video=NAME on Windows)"
                          ) from None


def check_video_file(path: str) -> None:
    """Raises ConfigError when `path` is not a readable video file (before any model loads)."""
    if not Path(path).is_file():
        raise ConfigError(f"--input {path!r}: no such file (give ws, webcam[:DEVICE] or a video file)")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ConfigError(f"--input {path!r} has no video stream")
    except (OSError, av.error.FFmpegError) as error:
        raise ConfigError(f"--input {path!r} is not a readable video: {error}") from None


class FrameFeed:
    """A thread that reads pictures from `open_pictures()` into `frames` until closed.

    `paced`: hold each picture until its time (a file plays at its own rate; a camera paces itself). `loop`: open
    it again at its end (a file input never ends the live stream). A read error is logged, kept in `failure`, and
    ends the feed; the stream goes on repeating the last frame.
    """

    def __init__(self, frames: LiveFrames, open_pictures: Callable[[], Iterator[av.VideoFrame]], *, name: str,
                 paced: bool, loop: bool) -> None:
        self.frames, self.open_pictures, self.name = frames, open_pictures, name
        self.is_paced, self.loops = paced, loop
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"framecast-input-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        start, played_s = time.monotonic(), 0.0  # pacing from an absolute start: no drift over loops
        config = self.frames.config
        try:
            while not self._stop.is_set():
                first_s = last_s = period_s = None
                pictures = 0
                for picture in self.open_pictures():
                    if self._stop.is_set():
                        return
                    pictures += 1
                    if self.is_paced and picture.time is not None:
                        if last_s is not None:
                            period_s = picture.time - last_s
                        first_s = picture.time if first_s is None else first_s
                        last_s = picture.time
                        if self._stop.wait(max(0.0, start + played_s + last_s - first_s - time.monotonic())):
                            return
                    self.frames.put(resize(picture, config.width, config.height))
                if not self.loops:
                    return
                if not pictures:
                    raise ConfigError(f"input {self.name} holds no video frames")
                if first_s is not None:  # the next loop starts one frame after this one's last frame
                    played_s += last_s - first_s + (period_s or DEFAULT_FRAME_PERIOD_S)
        except Exception as exc:  # the feed ends; the stream goes on with the last frame
            log.exception("input %s failed; the stream repeats its last frame", self.name)
            self.failure = exc


def file_pictures(path: str) -> Callable[[], Iterator[av.VideoFrame]]:
    def pictures() -> Iterator[av.VideoFrame]:
        with av.open(path) as container:
            yield from container.decode(video=0)
    return pictures


def webcam_pictures(device: str | None) -> Callable[[], Iterator[av.VideoFrame]]:
    def pictures() -> Iterator[av.VideoFrame]:
        with open_webcam(device) as container:
            yield from container.decode(video=0)
    return pictures


def input_feed(spec: InputSpec, frames: LiveFrames) -> FrameFeed | None:
    """The thread that feeds `frames` for `spec` (None for the websocket: its client pushes frames)."""
    if spec.kind is InputKind.WEBCAM:
        return FrameFeed(frames, webcam_pictures(spec.location), name=str(spec), paced=False, loop=False)
    if spec.kind is InputKind.FILE:
        return FrameFeed(frames, file_pictures(spec.location), name=spec.location, paced=True, loop=True)
    return None


def check_input(spec: InputSpec) -> None:
    """Fail fast, before any model loads: the webcam opens, the file reads (raises ConfigError naming the problem)."""
    if spec.kind is InputKind.WEBCAM:
        open_webcam(spec.location).close()
    elif spec.kind is InputKind.FILE:
        check_video_file(spec.location)


def check_video_input(engine: object) -> None:
    """Raises ConfigError unless `engine` takes video input (the chunk sampler of StreamEngine, in one process)."""
    from framecast.stream.engine import StreamEngine

    if not isinstance(engine, StreamEngine):
        raise ConfigError(f"{type(engine).__name__} takes no video input; video-to-video runs on a StreamEngine "
                          "in one process (not the world model, the simulator or --stages)")
    if engine.config.rolling_chunks > 1:
        raise ConfigError("the rolling-window sampler (rolling-forcing) takes no video input: its chunks enter the "
                          "window as pure noise")


class LiveVideo:
    """A session's video input: live frames (and the feed thread filling them), encoded one chunk at a time."""

    def __init__(self, spec: InputSpec, frames: LiveFrames, source: LatentSource) -> None:
        self.spec, self.frames, self.source = spec, frames, source
        self.feed = input_feed(spec, frames)

    @property
    def takes_ingest(self) -> bool:
        """Whether websocket clients push its frames (/ingest)."""
        return self.spec.kind is InputKind.WEBSOCKET

    def start(self) -> None:
        if self.feed is not None:
            self.feed.start()

    def next_latents(self) -> Tensor | None:
        """The next chunk's input latents [1, chunk_frames, C, h, w] (generation thread); None once closed."""
        group = self.frames.take(self.source.group_frames)
        return None if group is None else self.source.encode(group)

    def still_latents(self) -> Tensor:
        """Latents of a mid-gray group through the same encoder, for warm-up (call `reset` after)."""
        config = self.frames.config
        return self.source.encode(np.full((self.source.group_frames, config.height, config.width, 3), MID_GRAY,
                                          np.uint8))

    def reset(self) -> None:
        """Start over (after the warm-up): the encoder forgets its time context, and frames waiting are stale."""
        self.source.reset()
        self.frames.discard()

    def close(self) -> None:
        self.frames.close()
        if self.feed is not None:
            self.feed.close()
