"""Where the sampler's Gaussian noise comes from: a seeded generator, or recorded draws to replay."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import Tensor

from framecast.models.errors import ShapeError


class NoiseSource(Protocol):
    def draw(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor: ...


class GaussianNoise:
    """Standard normal noise from one seeded generator; draws in float32 so a seed gives the same noise in any dtype."""

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.seed, self.device = seed, torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def draw(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        sample = torch.randn(shape, generator=self.generator, device=self.device, dtype=torch.float32)
        return sample.to(device=device, dtype=dtype)


class ReplayNoise:
    """Hands out recorded draws in order (each reshaped to the requested shape); for parity tests against fixtures."""

    def __init__(self, draws: Iterable[Tensor]) -> None:
        self._draws = list(draws)
        self.used = 0

    def draw(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        if self.used >= len(self._draws):
            raise ShapeError(f"replay noise exhausted after {self.used} draws")
        sample = self._draws[self.used]
        if sample.numel() != torch.Size(shape).numel():
            raise ShapeError(f"replay draw {self.used} has {tuple(sample.shape)}; requested {tuple(shape)}")
        self.used += 1
        return sample.reshape(shape).to(device=device, dtype=dtype)
