"""Input video for video-to-video streaming: frames from a file or a live feed, encoded chunk by chunk to the DiT's
latents.

The Wan VAE encodes 1 + 4(n-1) video frames into the first n latent frames of a stream and 4n frames into each later
n; `LatentSource` asks its frame supply for exactly those groups. A file is a flat iterator of frames (grouped here);
a live feed (stream/live_input.py) answers each `take(count)` with its newest frames resampled to `count`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Protocol, runtime_checkable

import av
import numpy as np
import torch
from torch import Tensor

from framecast.models.errors import CheckpointError, ShapeError
from framecast.models.vae import WanVAEEncodeStream


def video_file_frames(path: str | Path, width: int, height: int) -> Iterator[np.ndarray]:
    """uint8 RGB frames [height, width, 3] of a video file, resized; raises CheckpointError if it cannot be read."""
    try:
        container = av.open(str(path))
    except (OSError, av.error.FFmpegError) as error:
        raise CheckpointError(f"cannot read input video {path}: {error}") from error
    with container:
        for frame in container.decode(video=0):
            yield frame.reformat(width=width, height=height, format="rgb24").to_ndarray()


@runtime_checkable
class FrameGroups(Protocol):
    """A supply of video frames in groups of the size the encoder asks for."""

    def take(self, count: int) -> np.ndarray | None:
        """The next `count` frames, uint8 [count, H, W, 3]; None once the input has ended."""
        ...


class FlatFrames:
    """Groups of a flat iterator of frames (a file): consecutive frames; ends with the input (a short tail is not a
    group)."""

    def __init__(self, frames: Iterable[np.ndarray]) -> None:
        self.frames = iter(frames)

    def take(self, count: int) -> np.ndarray | None:
        group = list(islice(self.frames, count))
        return np.stack(group) if len(group) == count else None


class LatentSource:
    """Takes frame groups by the Wan VAE's rule (1 + 4(n-1) for the first chunk, 4n after) and encodes each group,
    carrying the encoder's time context: chunk k of the output is the latents of the same video frames the engine's
    chunk k stands for. Yields [1, chunk_frames, C, h, w] in the DiT's layout; ends with the input.

    `frames`: a flat iterable of uint8 [H, W, 3] frames (grouped in order), or a `FrameGroups` supply (a live feed).
    """

    def __init__(self, encoder: WanVAEEncodeStream, frames: Iterable[np.ndarray] | FrameGroups,
                 chunk_frames: int) -> None:
        self.encoder, self.chunk_frames = encoder, chunk_frames
        self.frames = frames if isinstance(frames, FrameGroups) else FlatFrames(frames)
        self.scale = encoder.model.config.temporal_scale
        self._started = False

    @property
    def group_frames(self) -> int:
        """Video frames the next chunk stands for: 1 + 4(n-1) at the stream start, 4n after (n = chunk_frames)."""
        return self.chunk_frames * self.scale - (0 if self._started else self.scale - 1)

    def encode(self, group: np.ndarray) -> Tensor:
        """Latents [1, chunk_frames, C, h, w] of the next group, uint8 [group_frames, H, W, 3].

        Raises:
            ShapeError: the group does not have `group_frames` frames (or the encoder refuses its size).
        """
        if group.ndim != 4 or len(group) != self.group_frames:
            raise ShapeError(f"frame group of shape {group.shape}; the next chunk needs [{self.group_frames}, H, W, 3]")
        parameter = next(self.encoder.model.parameters())
        video = torch.from_numpy(np.ascontiguousarray(group)).permute(3, 0, 1, 2).unsqueeze(0)  # (1, 3, T, H, W)
        video = video.to(parameter.device, parameter.dtype) / 127.5 - 1
        with torch.no_grad():
            latents = self.encoder.encode(video)  # (1, C, chunk_frames, h, w)
        self._started = True
        return latents.transpose(1, 2)

    def reset(self) -> None:
        """Start a new stream: the encoder forgets its time context and the next group is a first group again."""
        self.encoder.reset()
        self._started = False

    def __iter__(self) -> Iterator[Tensor]:
        while (group := self.frames.take(self.group_frames)) is not None:
            yield self.encode(group)
