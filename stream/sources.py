"""Input video for video-to-video streaming: frames from a file, encoded chunk by chunk to the DiT's latents."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import torch
from torch import Tensor

from framecast.models.errors import CheckpointError
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


class LatentSource:
    """Groups frames by the Wan VAE's rule (1 + 4(n-1) for the first chunk, 4n after) and encodes each group,
    carrying the encoder's time context: chunk k of the output is the latents of the same video frames the engine's
    chunk k stands for. Yields [1, chunk_frames, C, h, w] in the DiT's layout; ends with the input."""

    def __init__(self, encoder: WanVAEEncodeStream, frames: Iterator[np.ndarray], chunk_frames: int) -> None:
        self.encoder, self.frames, self.chunk_frames = encoder, frames, chunk_frames
        self.scale = encoder.model.config.temporal_scale
        self._started = False

    def __iter__(self) -> Iterator[Tensor]:
        model = self.encoder.model
        parameter = next(model.parameters())
        while True:
            count = self.chunk_frames * self.scale - (0 if self._started else self.scale - 1)
            group = [frame for _, frame in zip(range(count), self.frames)]
            if len(group) < count:
                return
            self._started = True
            video = torch.from_numpy(np.stack(group)).permute(3, 0, 1, 2).unsqueeze(0)  # (1, 3, T, H, W)
            video = video.to(parameter.device, parameter.dtype) / 127.5 - 1
            with torch.no_grad():
                latents = self.encoder.encode(video)  # (1, C, chunk_frames, h, w)
            yield latents.transpose(1, 2)
