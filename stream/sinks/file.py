"""Writes RGB frames to a video file through PyAV (H.264 in MP4 by default)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from framecast.models.errors import SessionClosed, ShapeError


class VideoFileSink:
    """`write(frames)` appends uint8 RGB frames [N, H, W, 3]; `close()` flushes. Frame i gets pts i at 1/fps."""

    def __init__(self, path: str | Path, fps: int | Fraction, codec: str = "libx264", crf: int = 18) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = Fraction(fps)
        self._container = av.open(str(self.path), mode="w")
        self._codec, self._crf = codec, crf
        self._stream: av.video.stream.VideoStream | None = None
        self.frames_written = 0

    def _open_stream(self, height: int, width: int) -> av.video.stream.VideoStream:
        stream = self._container.add_stream(self._codec, rate=self.fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if self._codec == "libx264":
            stream.options = {"crf": str(self._crf)}
        return stream

    def write(self, frames: np.ndarray) -> None:
        if self._container is None:
            raise SessionClosed(f"video file {self.path} is closed")
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ShapeError(f"frames must be uint8 [N, H, W, 3]; got {frames.dtype} {frames.shape}")
        if self._stream is None:
            self._stream = self._open_stream(frames.shape[1], frames.shape[2])
        if (frames.shape[1], frames.shape[2]) != (self._stream.height, self._stream.width):
            raise ShapeError(f"frame size {frames.shape[1:3]} differs from the stream's {(self._stream.height, self._stream.width)}")
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = self.frames_written
            self._container.mux(self._stream.encode(frame))
            self.frames_written += 1

    def close(self) -> None:
        if self._container is None:
            return
        if self._stream is not None:
            self._container.mux(self._stream.encode(None))
        self._container.close()
        self._container = None
