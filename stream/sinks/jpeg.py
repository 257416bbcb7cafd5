"""JPEG pictures of live frames, encoded once per frame and shared by every viewer that wants JPEG.

Every JPEG viewer (websocket `?format=jpeg`, `/mjpeg`) is handed the same `VideoFrame` object by the session's relay,
so the frame object itself is the cache key: the first viewer to ask for a frame encodes it (off the event loop),
viewers asking meanwhile wait for that one encode, and later ones get the bytes at once. 20 viewers cost one encode
per frame instead of 20. The cache keeps the last few frames only (it holds each frame and its bytes, so an entry's
identity cannot be reused while it lives); a viewer so far behind that its frame was evicted encodes it again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import OrderedDict
from fractions import Fraction

import av
import numpy as np

from framecast.models.errors import ConfigError, ShapeError
from framecast.stream.producer import VideoFrame

DEFAULT_QUALITY = 5  # ffmpeg qscale: 2 (best) .. 31 (worst)


class JpegEncoder:
    """RGB frames -> JPEG bytes through PyAV's MJPEG encoder (one codec context per frame size; one thread at a time).

    Baseline JPEG, full-range YUV 4:2:0 (what browsers, OBS and PIL decode).
    """

    def __init__(self, quality: int = DEFAULT_QUALITY) -> None:
        self.quality = quality
        self._context: av.CodecContext | None = None

    def encode(self, rgb: np.ndarray) -> bytes:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ShapeError(f"JPEG needs uint8 [H, W, 3] pictures; got {rgb.dtype} {rgb.shape}")
        height, width, _ = rgb.shape
        context = self._context
        if context is None or (context.width, context.height) != (width, height):
            context = self._context = av.CodecContext.create("mjpeg", "w")
            context.width, context.height, context.pix_fmt = width, height, "yuvj420p"
            context.time_base = Fraction(1, 90_000)
            context.options = {"qscale": str(self.quality)}
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuvj420p")
        return b"".join(bytes(packet) for packet in context.encode(frame))


class SharedJpeg:
    """A thread-safe cache of the JPEG bytes of the last `capacity` frames; each frame is encoded at most once while
    it is cached, however many threads or viewers ask for it at the same time.

    `encode(frame)` blocks (any thread); `await encode_async(frame)` encodes in an executor when it is the first to
    ask, and otherwise waits without holding a thread. `encodes` counts the encodes done (for tests and metrics).
    """

    def __init__(self, capacity: int = 8, quality: int = DEFAULT_QUALITY) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"capacity={capacity!r} must be an integer >= 1")
        if isinstance(quality, bool) or not isinstance(quality, int) or not 2 <= quality <= 31:
            raise ConfigError(f"quality={quality!r} must be an integer in [2, 31] (ffmpeg qscale: 2 is best)")
        self.capacity, self.quality = capacity, quality
        self._lock = threading.Lock()
        # id(frame) -> (frame, its bytes): holding the frame keeps its id from being reused while the entry lives
        self._entries: OrderedDict[int, tuple[VideoFrame, concurrent.futures.Future[bytes]]] = OrderedDict()
        self._encoders = threading.local()  # a codec context is not thread-safe: one encoder per thread
        self.encodes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _claim(self, frame: VideoFrame) -> tuple[concurrent.futures.Future[bytes], bool]:
        """The future of `frame`'s bytes, and whether the caller must encode it (it was not cached)."""
        with self._lock:
            entry = self._entries.get(id(frame))
            if entry is not None and entry[0] is frame:
                return entry[1], False
            future: concurrent.futures.Future[bytes] = concurrent.futures.Future()
            future.set_running_or_notify_cancel()  # running: a cancelled waiter cannot cancel it for the others
            self._entries[id(frame)] = (frame, future)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            return future, True

    def _fill(self, frame: VideoFrame, future: concurrent.futures.Future[bytes]) -> None:
        """Encode `frame` into `future` (the claimer's job); a failure reaches every waiter and is not cached."""
        try:
            encoder = getattr(self._encoders, "encoder", None)
            if encoder is None:
                encoder = self._encoders.encoder = JpegEncoder(self.quality)
            data = encoder.encode(frame.rgb)
        except BaseException as exc:
            self._fill_failed(frame, future, exc)
            if not isinstance(exc, Exception):
                raise
            return
        with self._lock:
            self.encodes += 1
        future.set_result(data)

    def encode(self, frame: VideoFrame) -> bytes:
        """The JPEG bytes of `frame` (any thread; blocks while another thread encodes it)."""
        future, is_first = self._claim(frame)
        if is_first:
            self._fill(frame, future)
        return future.result()

    async def encode_async(self, frame: VideoFrame, executor: concurrent.futures.Executor | None = None) -> bytes:
        """The JPEG bytes of `frame`, encoded in `executor` (default: the loop's) so the event loop never waits."""
        future, is_first = self._claim(frame)
        if is_first:
            loop = asyncio.get_running_loop()
            try:
                loop.run_in_executor(executor, self._fill, frame, future)
            except BaseException as exc:  # the executor refused (shut down): the waiters must not hang
                self._fill_failed(frame, future, exc)
                raise
        return await asyncio.wrap_future(future)

    def _fill_failed(self, frame: VideoFrame, future: concurrent.futures.Future[bytes], exc: BaseException) -> None:
        """Hand `exc` to every waiter of `frame` and forget the entry, so a later request tries again."""
        with self._lock:
            entry = self._entries.get(id(frame))
            if entry is not None and entry[1] is future:
                del self._entries[id(frame)]
        future.set_exception(exc)


SHARED = SharedJpeg()  # the process's cache: every viewer of every session shares it (frames are their own keys)


def jpeg_of(frame: VideoFrame) -> bytes:
    """The JPEG bytes of a live frame from the process-wide cache (any thread)."""
    return SHARED.encode(frame)
