"""A latent preview decoder: latents to RGB frames without a VAE.

A fixed linear map from latent channels to RGB, bilinear upsampling by the VAE's spatial factor, and temporal
interpolation that follows the Wan VAE's frame rule (the first latent frame gives 1 frame, every later one gives
`temporal_scale`). It shows the structure of a stream of latents cheaply; it is not a trained decoder (the Wan VAE,
TAEHV and our own autoencoder replace it where they apply). Streaming: it carries the previous frame across chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from framecast.models.errors import ShapeError


class PreviewDecoder:
    def __init__(self, channels: int, spatial_scale: int = 8, temporal_scale: int = 4, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(3, channels, generator=generator)
        self.projection = projection / projection.norm(dim=1, keepdim=True)  # unit gain per colour
        self.channels, self.spatial_scale, self.temporal_scale = channels, spatial_scale, temporal_scale
        self._previous: Tensor | None = None

    def reset(self) -> None:
        self._previous = None

    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, F, C, H, W] -> uint8 frames [B, F', H*s, W*s, 3] (F' = 1 + t*(F-1) at the stream start,
        t*F after), on the CPU."""
        if latents.ndim != 5 or latents.shape[2] != self.channels:
            raise ShapeError(f"latents have shape {tuple(latents.shape)}; expected [B, F, {self.channels}, H, W]")
        rgb = torch.einsum("bfchw,oc->bfohw", latents.detach().float().cpu(), self.projection)
        frames = []
        for index in range(rgb.shape[1]):
            current = rgb[:, index]
            if self._previous is None:
                frames.append(current)
            else:
                for step in range(1, self.temporal_scale + 1):
                    frames.append(torch.lerp(self._previous, current, step / self.temporal_scale))
            self._previous = current
        video = torch.stack(frames, dim=1)  # (B, F', 3, H, W)
        batch, count = video.shape[:2]
        video = F.interpolate(video.flatten(0, 1), scale_factor=self.spatial_scale, mode="bilinear", align_corners=False)
        video = (torch.tanh(video / 2) * 0.5 + 0.5).clamp(0, 1)  # squash latent range (about +-3) into [0, 1]
        return (video * 255).round().to(torch.uint8).unflatten(0, (batch, count)).permute(0, 1, 3, 4, 2)
