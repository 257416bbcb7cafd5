"""The cache-free reference stream: every model call re-runs the whole history under the block-causal mask.

Slow (quadratic in the stream length) and obviously correct, nanoGPT-style: the cached engine must produce the same
chunks for the same noise. It draws noise in the engine's order (chunk noise, one draw per re-noise, one for a noisy
context pass) so one seed drives both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from framecast.models.config import AttentionKind
from framecast.models.dit import CausalWanDiT
from framecast.models.memory import BlockCausal
from framecast.stream.engine import CacheKind, EngineConfig
from framecast.stream.noise import NoiseSource
from framecast.stream.sampler import FlowMatchSchedule, renoise, to_clean


@torch.inference_mode()
def reference_stream(
    dit: CausalWanDiT,
    config: EngineConfig,
    prompt: Tensor,
    noise: NoiseSource,
    num_chunks: int,
    actions: Tensor | None = None,
) -> Tensor:
    """Clean latents [B, num_chunks * chunk_frames, C, H, W]; actions [B, num_chunks * chunk_frames] if the model
    takes them. One prompt for the whole stream (prompt switches are the cached engine's business)."""
    schedule = FlowMatchSchedule(config.shift)
    steps = schedule.steps(config.denoising_steps, config.warp_steps)
    n, batch = config.chunk_frames, config.batch
    shape = (batch, n, dit.config.in_dim, config.latent_height, config.latent_width)
    text = dit.encode_text((prompt if prompt.ndim == 3 else prompt.unsqueeze(0)).expand(batch, -1, -1))
    tokens = dit.config.tokens_per_frame(config.latent_height, config.latent_width)
    windowed = dit.config.attention is AttentionKind.SOFTMAX and config.cache is CacheKind.ROLLING
    context: list[Tensor] = []  # what the context pass saw for each committed chunk
    clean: list[Tensor] = []
    for chunk in range(num_chunks):
        first = chunk * n
        memory = BlockCausal(
            dit.config, num_frames=first + n, chunk_frames=n, tokens_per_frame=tokens,
            window_frames=config.window_frames if windowed else None,
            sink_frames=config.sink_frames if windowed else 0, device=dit.device,
        )
        frame_actions = actions[:, : first + n] if actions is not None else None
        x = noise.draw(shape, dit.dtype, dit.device)
        for step in steps:
            timesteps = torch.cat(
                [torch.full((batch, first), float(config.context_noise)), torch.full((batch, n), step.timestep)], dim=1
            )
            flow = dit(torch.cat([*context, x], dim=1), timesteps, text, memory, frame_actions)[:, first:]
            x0 = to_clean(x, flow, step.sigma)
            if not step.is_last:
                x = renoise(x0, noise.draw(shape, dit.dtype, dit.device), step.next_sigma)
        clean.append(x0)
        if config.context_noise:
            sigma = schedule.sigma_at(float(config.context_noise))
            context.append(renoise(x0, noise.draw(shape, dit.dtype, dit.device), sigma))
        else:
            context.append(x0)
    return torch.cat(clean, dim=1)
