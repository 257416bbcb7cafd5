"""Where a pipeline's processes get the DiT from: a picklable recipe each stage worker runs for itself.

Weights never travel over the pipeline: every worker builds (or loads) the model and keeps only its own layers
(`Stage` drops the others). The orchestrator runs the same recipe when it rebuilds a pipeline in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framecast.models.config import DiTConfig
from framecast.models.dit import CausalWanDiT


@dataclass(frozen=True)
class RandomDiT:
    """A randomly initialised DiT: `torch.manual_seed(seed); CausalWanDiT(config).to(dtype)` (tests, benchmarks).
    `action_std` > 0 draws the action table from N(0, std) after construction (a zero table hides actions)."""

    config: DiTConfig
    dtype: torch.dtype = torch.float32
    seed: int = 0
    action_std: float = 0.0

    def __call__(self, device: torch.device | str = "cpu") -> CausalWanDiT:
        torch.manual_seed(self.seed)
        dit = CausalWanDiT(self.config)
        if self.action_std and self.config.num_actions:
            torch.nn.init.normal_(dit.action_embedding.weight, std=self.action_std)
        return dit.to(device=device, dtype=self.dtype).eval().requires_grad_(False)


@dataclass(frozen=True)
class CheckpointDiT:
    """A DiT loaded from a checkpoint file by `load_dit` (any accepted layout)."""

    path: str
    config: DiTConfig | None = None
    dtype: torch.dtype = torch.bfloat16

    def __call__(self, device: torch.device | str = "cpu") -> CausalWanDiT:
        from framecast.models.loading import load_dit

        return load_dit(self.path, self.config, dtype=self.dtype, device=device).eval().requires_grad_(False)
