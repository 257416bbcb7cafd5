"""Few-step flow-matching sampling, exactly as the causal-Wan reference computes it.

The schedule is the reference's `FlowMatchScheduler(shift, extra_one_step=True)` with 1000 training timesteps:
`s = linspace(1, 0, 1001)[:-1]`, `sigma = shift*s / (1 + (shift-1)*s)`, `timestep = 1000*sigma`, all float32.
A distilled model's step list (e.g. 1000, 750, 500, 250) is warped onto it: `cat(timesteps, [0])[1000 - step]`.
Each step predicts the flow, turns it into the clean estimate `x0 = x - sigma*flow` (float64), and, except after the
last step, re-noises `x0` to the next step's sigma with fresh noise. Stateless: the schedule and noise are arguments.
Optionally each step's flow is classifier-free guided (`guided_flow`), or only the first `guided_steps` steps' are.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from framecast.models.dit import CausalWanDiT, TextContext
from framecast.models.errors import ConfigError
from framecast.models.memory import FirstRows, Memory
from framecast.stream.noise import NoiseSource

NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class Step:
    """One denoising step: the timestep the model sees, its sigma, and the sigma to re-noise to (0 = last step)."""

    timestep: float  # float32 value, as the model receives it
    sigma: float  # float32 value of the schedule at this timestep
    next_sigma: float  # 0.0 after the last step

    @property
    def is_last(self) -> bool:
        return self.next_sigma == 0.0


class FlowMatchSchedule:
    """The shifted flow-matching schedule over 1000 training timesteps (float32 tables)."""

    def __init__(self, shift: float = 5.0) -> None:
        if not shift > 0:
            raise ConfigError(f"shift={shift!r} must be > 0")
        self.shift = shift
        s = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1]
        self.sigmas = shift * s / (1 + (shift - 1) * s)
        self.timesteps = self.sigmas * NUM_TRAIN_TIMESTEPS

    def sigma_at(self, timestep: float) -> float:
        """Sigma of the schedule entry nearest to `timestep` (the reference's argmin lookup)."""
        index = torch.argmin((self.timesteps - torch.tensor(timestep, dtype=torch.float32)).abs())
        return float(self.sigmas[index])

    @staticmethod
    def _checked(raw_steps: Sequence[int]) -> Sequence[int]:
        if not raw_steps or any(not isinstance(s, int) or not 0 < s <= NUM_TRAIN_TIMESTEPS for s in raw_steps):
            raise ConfigError(f"denoising steps {list(raw_steps)} must be integers in [1, {NUM_TRAIN_TIMESTEPS}]")
        if list(raw_steps) != sorted(raw_steps, reverse=True) or len(set(raw_steps)) != len(raw_steps):
            raise ConfigError(f"denoising steps {list(raw_steps)} must strictly descend")
        return raw_steps

    def warp(self, raw_steps: Sequence[int]) -> list[float]:
        """Raw step list (values in 1..1000, descending) -> the timesteps the model sees (float32 values)."""
        self._checked(raw_steps)
        table = torch.cat([self.timesteps, torch.zeros(1)])
        return [float(table[NUM_TRAIN_TIMESTEPS - step]) for step in raw_steps]

    def steps(self, raw_steps: Sequence[int], warp: bool = True) -> tuple[Step, ...]:
        """The steps of a step list. `warp=False` feeds the raw values to the model as timesteps, as references
        without `warp_denoising_step` do (CausVid, StreamDiffusionV2); sigmas come from the nearest schedule entry."""
        timesteps = self.warp(raw_steps) if warp else [float(step) for step in self._checked(raw_steps)]
        sigmas = [self.sigma_at(t) for t in timesteps]
        return tuple(Step(t, s, n) for t, s, n in zip(timesteps, sigmas, sigmas[1:] + [0.0]))


def to_clean(x: Tensor, flow: Tensor, sigma: float) -> Tensor:
    """x0 = x - sigma * flow, returned in x's dtype.

    float64 as the reference computes it; for lower precisions float32 is exact to the output's rounding and saves
    two conversions per step.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(compute) - sigma * flow.to(compute)).to(x.dtype)


@functools.lru_cache(maxsize=256)
def _float32_complement(sigma: float) -> float:
    """1 - sigma rounded to float32, as the reference's float32 tensor math rounds it."""
    return float(torch.tensor(1.0, dtype=torch.float32) - torch.tensor(sigma, dtype=torch.float32))


def renoise(x0: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """(1 - sigma) * x0 + sigma * noise, in noise's dtype."""
    return (_float32_complement(sigma) * x0 + sigma * noise).to(noise.dtype)


def guided_flow(
    dit: CausalWanDiT, x: Tensor, timesteps: Tensor, text: TextContext, memory: Memory, actions: Tensor | None,
    guidance: float = 1.0,
) -> Tensor:
    """The DiT's flow; above `guidance` 1, classifier-free guided: null + guidance x (prompt - null).

    Guided, `text` and `memory` hold twice the batch, the prompt's rows then the null prompt's (each keeps its own
    context, since context keys and values depend on the prompt through cross-attention), and both run as one batch:
    one DiT call of batch 2B costs ~1.5x one of batch B on a CPU, against 2x for two calls. bf16 flows combine in
    float32."""
    if guidance == 1:
        return dit(x, timesteps, text, memory, actions)
    doubled = dit(x.repeat(2, 1, 1, 1, 1), timesteps.repeat(2, 1), text, memory,
                  None if actions is None else actions.repeat(2, 1))
    compute = torch.promote_types(doubled.dtype, torch.float32)
    flow, null = doubled.to(compute).chunk(2)
    return (null + guidance * (flow - null)).to(doubled.dtype)


def denoise(
    dit: CausalWanDiT,
    x: Tensor,
    text: TextContext,
    memory: Memory,
    steps: Sequence[Step],
    noise: NoiseSource,
    actions: Tensor | None = None,
    guidance: float = 1.0,
    guided_steps: int | None = None,
) -> Tensor:
    """Denoise the frames in flight (x [B, F, C, H, W], pure noise at steps[0]) to their clean estimate; guided
    above `guidance` 1, with `text` and `memory` of batch 2B (see `guided_flow`).

    `guided_steps`: only the first this many steps are guided (None: all); the later ones run the prompt's rows
    alone, at batch B. Guidance shapes what a frame shows in the high-noise steps; the low-noise steps refine it."""
    batch, frames = x.shape[:2]
    guided_steps = len(steps) if guided_steps is None or guidance == 1 else guided_steps
    prompt_only = None
    x0 = x
    for index, step in enumerate(steps):
        timesteps = torch.full((batch, frames), step.timestep, dtype=torch.float32, device=x.device)
        if index < guided_steps:
            flow = guided_flow(dit, x, timesteps, text, memory, actions, guidance)
        else:
            prompt_only = prompt_only or (text.first_rows(batch), FirstRows(memory, batch))
            flow = dit(x, timesteps, *prompt_only, actions)
        x0 = to_clean(x, flow, step.sigma)
        if not step.is_last:
            x = renoise(x0, noise.draw(tuple(x0.shape), x0.dtype, x0.device), step.next_sigma)
    return x0
