"""3-D rotary position embedding of the Wan DiT.

Each head's `head_dim / 2` complex pairs are split over (frame, height, width) as the reference splits them; every axis
has its own frequencies `theta ** (-2i / axis_dim)`, angles are `position * frequency` in float64, and a pair
`(x[2i], x[2i+1])` is rotated as a complex number. Positions are passed in explicitly: the memory (cache or state)
decides which frame positions the frames in flight take, so that streams can outlive the reference's 1024-entry table.
"""

from __future__ import annotations

import torch
from torch import Tensor

from framecast.models.config import DiTConfig

_THETA = 10000.0
_MAX_MEMO = 32  # angle tables kept per Rope; a stream reuses a handful of (positions, grid) combinations


def axis_frequencies(pairs: int) -> Tensor:
    """Inverse frequencies (float64) of one axis with `pairs` complex pairs (axis width 2*pairs)."""
    width = 2 * pairs
    # on the CPU explicitly: models are built under `with torch.device("meta")` when loading checkpoints
    return 1.0 / torch.pow(_THETA, torch.arange(0, width, 2, dtype=torch.float64, device="cpu").div(width))


class Rope:
    """Computes and applies the rotations; holds no learned state and no device buffers but a small memo."""

    def __init__(self, config: DiTConfig) -> None:
        self.split = config.rope_split
        self.frequencies = [axis_frequencies(pairs) for pairs in self.split]
        self._memo: dict[tuple, tuple[Tensor, Tensor]] = {}

    def angles(
        self, frame_positions: tuple[int, ...], grid: tuple[int, int], dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """cos and sin, each [L, 1, pairs] in `dtype` (float64 for float64 models, float32 otherwise).

        Token order is frame-major, then patch row, then patch column, as the patch embedding flattens.
        """
        key = (frame_positions, grid, dtype, device)
        if key in self._memo:
            return self._memo[key]
        grid_h, grid_w = grid
        frames = len(frame_positions)
        f_freq, h_freq, w_freq = self.frequencies
        f_angle = torch.outer(torch.tensor(frame_positions, dtype=torch.float64), f_freq)
        h_angle = torch.outer(torch.arange(grid_h, dtype=torch.float64), h_freq)
        w_angle = torch.outer(torch.arange(grid_w, dtype=torch.float64), w_freq)
        angle = torch.cat(
            [
                f_angle.view(frames, 1, 1, -1).expand(frames, grid_h, grid_w, -1),
                h_angle.view(1, grid_h, 1, -1).expand(frames, grid_h, grid_w, -1),
                w_angle.view(1, 1, grid_w, -1).expand(frames, grid_h, grid_w, -1),
            ],
            dim=-1,
        ).reshape(frames * grid_h * grid_w, 1, -1)
        compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        result = (angle.cos().to(compute_dtype).to(device), angle.sin().to(compute_dtype).to(device))
        if len(self._memo) >= _MAX_MEMO:
            self._memo.pop(next(iter(self._memo)))
        self._memo[key] = result
        return result

    def frame_shift(self, delta_frames: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and sin [frame_pairs] that move keys by `delta_frames` frame positions (negative moves back)."""
        angle = float(delta_frames) * self.frequencies[0]
        compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return angle.cos().to(device, compute_dtype), angle.sin().to(device, compute_dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of x [..., 2*pairs] by the angles (cos/sin broadcast to [..., pairs]); keeps x's dtype."""
    pairs = x.float() if cos.dtype == torch.float32 and x.dtype != torch.float32 else x.to(cos.dtype)
    pairs = pairs.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
