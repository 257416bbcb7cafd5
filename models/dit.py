"""The causal Wan2.1 DiT: patch embedding, per-frame timestep conditioning, blocks, head.

Module and parameter names follow the original Wan layout (`blocks.{i}.self_attn.q`, `head.modulation`, ...), so a
released state dict loads without renaming. Self-attention reaches past frames only through the `Memory` passed in.

Shapes: B batch, F latent frames, C latent channels, H/W latent height/width, L tokens (F * tokens_per_frame),
D model width, T text tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from framecast.kernels.attention import attention
from framecast.models.config import DiTConfig
from framecast.models.errors import ShapeError
from framecast.models.memory import Memory
from framecast.models.rope import Rope, rotate


def sinusoidal_embedding(width: int, positions: Tensor) -> Tensor:
    """[cos, sin] embedding (cos first) of float positions [N] -> [N, width], in float64 as the reference."""
    half = width // 2
    positions = positions.to(torch.float64)
    sinusoid = torch.outer(positions, torch.pow(10000, -torch.arange(half).to(positions).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


class RMSNorm(nn.Module):
    """Wan's RMSNorm: normalised in float32 whatever the input dtype (float64 included), then scaled."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm in the input dtype, or float32 for 16-bit inputs (bf16 statistics drift)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.element_size() >= 4:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


@dataclass(frozen=True)
class TextContext:
    """A prompt prepared for the DiT: per-layer cross-attention keys and values, each [B, T, heads, head_dim]."""

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def first_rows(self, rows: int) -> TextContext:
        """The first `rows` batch rows (a guided stream's prompt rows, without the null prompt's)."""
        def cut(parts: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
            return tuple(None if t is None else t[:rows] for t in parts)

        return TextContext(keys=cut(self.keys), values=cut(self.values))


class SelfAttention(nn.Module):
    def __init__(self, config: DiTConfig, layer: int) -> None:
        super().__init__()
        dim = config.dim
        self.layer, self.num_heads, self.head_dim = layer, config.num_heads, config.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, config.eps) if config.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, config.eps) if config.qk_norm else nn.Identity()

    def forward(self, x: Tensor, rope_angles: tuple[Tensor, Tensor], memory: Memory) -> Tensor:
        batch, tokens, _ = x.shape
        heads = (batch, tokens, self.num_heads, self.head_dim)
        q = rotate(self.norm_q(self.q(x)).view(heads), *rope_angles)
        k = rotate(self.norm_k(self.k(x)).view(heads), *rope_angles)
        v = self.v(x).view(heads)
        return self.o(memory.attend(self.layer, q, k, v).flatten(2))


class CrossAttention(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim = config.dim
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, config.eps) if config.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, config.eps) if config.qk_norm else nn.Identity()

    def text_keys_values(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the projected text [B, T, D]; computed once per prompt."""
        heads = (text.shape[0], -1, self.num_heads, self.head_dim)
        return self.norm_k(self.k(text)).view(heads), self.v(text).view(heads)

    def forward(self, x: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        q = self.norm_q(self.q(x)).view(x.shape[0], -1, self.num_heads, self.head_dim)
        return self.o(attention(q, keys, values).flatten(2))


class Block(nn.Module):
    """Self-attention, cross-attention to text, FFN; self-attention and FFN modulated per frame (6-way adaLN)."""

    def __init__(self, config: DiTConfig, layer: int) -> None:
        super().__init__()
        dim = config.dim
        self.norm1 = LayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(config, layer)
        self.norm3 = LayerNorm(dim, eps=config.eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(config)
        self.norm2 = LayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self, x: Tensor, time: Tensor, rope_angles: tuple[Tensor, Tensor], text: TextContext, memory: Memory
    ) -> Tensor:
        frames = time.shape[1]  # time: [B, F, 6, D]; x: [B, L, D] with L = F * tokens_per_frame
        shift_sa, scale_sa, gate_sa, shift_ffn, scale_ffn, gate_ffn = (self.modulation.unsqueeze(1) + time).chunk(6, dim=2)

        def per_frame(t: Tensor) -> Tensor:  # (B, L, D) -> (B, F, L/F, D)
            return t.unflatten(1, (frames, -1))

        y = self.self_attn((per_frame(self.norm1(x)) * (1 + scale_sa) + shift_sa).flatten(1, 2), rope_angles, memory)
        x = x + (per_frame(y) * gate_sa).flatten(1, 2)
        layer = self.self_attn.layer
        x = x + self.cross_attn(self.norm3(x), text.keys[layer], text.values[layer])
        y = self.ffn((per_frame(self.norm2(x)) * (1 + scale_ffn) + shift_ffn).flatten(1, 2))
        return x + (per_frame(y) * gate_ffn).flatten(1, 2)


class Head(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.norm = LayerNorm(config.dim, eps=config.eps, elementwise_affine=False)
        self.head = nn.Linear(config.dim, config.patch_channels)
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)

    def forward(self, x: Tensor, time: Tensor) -> Tensor:
        """x [B, L, D], time [B, F, 1, D] -> [B, F, L/F, patch_channels]."""
        shift, scale = (self.modulation.unsqueeze(1) + time).chunk(2, dim=2)
        return self.head(self.norm(x).unflatten(1, (time.shape[1], -1)) * (1 + scale) + shift)


class CausalWanDiT(nn.Module):
    """Predicts the flow (velocity) of latent frames given per-frame timesteps, a prompt and the memory of the past."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        if config.num_actions:
            self.action_embedding = nn.Embedding(config.num_actions, dim)
            nn.init.zeros_(self.action_embedding.weight)  # a fresh action table leaves a pretrained model unchanged
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.num_layers))
        self.head = Head(config)
        self.rope = Rope(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def encode_text(self, text_embeds: Tensor) -> TextContext:
        """Text-encoder output [B, T' <= text_len, text_dim] (zero rows past the prompt) -> per-layer K/V.

        Shorter inputs are zero-padded to text_len, as the reference does. Raises ShapeError on a wrong shape.
        """
        return self.text_context(self.embed_text(text_embeds))

    def embed_text(self, text_embeds: Tensor) -> Tensor:
        """Text-encoder output [B, T', text_dim] -> the projected text [B, text_len, D] every layer's K/V come from.

        The half of `encode_text` a pipeline's first stage runs; the other stages derive their layers' K/V from it.
        """
        config = self.config
        if text_embeds.ndim != 3 or text_embeds.shape[2] != config.text_dim or not 1 <= text_embeds.shape[1] <= config.text_len:
            raise ShapeError(
                f"prompt embedding has shape {tuple(text_embeds.shape)}; expected [batch, tokens <= {config.text_len}, "
                f"{config.text_dim}]"
            )
        text_embeds = text_embeds.to(self.device, self.dtype)
        padding = config.text_len - text_embeds.shape[1]
        if padding:
            text_embeds = nn.functional.pad(text_embeds, (0, 0, 0, padding))
        return self.text_embedding(text_embeds)

    def text_context(self, text: Tensor, layers: range | None = None) -> TextContext:
        """Projected text [B, text_len, D] -> cross-attention K/V of `layers` (default: all); others stay None."""
        layers = range(len(self.blocks)) if layers is None else layers
        pairs = [self.blocks[i].cross_attn.text_keys_values(text) if i in layers else (None, None) for i in range(len(self.blocks))]
        return TextContext(keys=tuple(k for k, _ in pairs), values=tuple(v for _, v in pairs))

    def time_conditioning(self, timesteps: Tensor, actions: Tensor | None) -> Tensor:
        """Per-frame timesteps [B, F] (float, 0..1000) and optional action ids [B, F] -> embedding [B, F, D]."""
        batch, frames = timesteps.shape
        time = self.time_embedding(sinusoidal_embedding(self.config.freq_dim, timesteps.flatten()).to(self.dtype))
        time = time.unflatten(0, (batch, frames))
        if actions is not None:
            if not self.config.num_actions:
                raise ShapeError("actions given to a model without an action embedding (num_actions = 0)")
            if actions.shape != (batch, frames):
                raise ShapeError(f"actions have shape {tuple(actions.shape)}; expected [batch, frames] = {[batch, frames]}")
            time = time + self.action_embedding(actions.to(self.device))
        return time

    def forward(
        self, latents: Tensor, timesteps: Tensor, text: TextContext, memory: Memory, actions: Tensor | None = None
    ) -> Tensor:
        """latents [B, F, C, H, W], timesteps [B, F] -> flow [B, F, C, H, W] for the frames in flight in `memory`."""
        config = self.config
        if latents.ndim != 5 or latents.shape[2] != config.in_dim:
            raise ShapeError(f"latents have shape {tuple(latents.shape)}; expected [B, F, {config.in_dim}, H, W]")
        batch, frames, _, height, width = latents.shape
        if timesteps.shape != (batch, frames):
            raise ShapeError(f"timesteps have shape {tuple(timesteps.shape)}; expected [B, F] = {[batch, frames]}")
        if text.batch != batch:
            raise ShapeError(f"prompt batch {text.batch} does not match latent batch {batch}")
        positions = memory.rope_positions()
        if len(positions) != frames:
            raise ShapeError(f"{frames} latent frames given, but the memory has {len(positions)} frames in flight")
        x, grid, time, time6 = self.embed(latents, timesteps, actions)
        x = self.run_blocks(x, time6, self.rope.angles(positions, grid, x.dtype, x.device), text, memory)
        return self.finish(x, time, grid)

    # The three parts of forward(), separately callable so that a pipeline stage runs only its share of the layers.
    def embed(self, latents: Tensor, timesteps: Tensor, actions: Tensor | None = None) -> tuple[Tensor, tuple[int, int], Tensor, Tensor]:
        """Patches and time: -> tokens x [B, L, D], token grid (h, w), time [B, F, D], modulation time6 [B, F, 6, D]."""
        x = self.patch_embedding(latents.to(self.dtype).transpose(1, 2))  # (B, D, F, h, w)
        grid = (x.shape[3], x.shape[4])
        x = x.flatten(2).transpose(1, 2)  # (B, L, D)
        time = self.time_conditioning(timesteps, actions)  # (B, F, D)
        time6 = self.time_projection(time).unflatten(2, (6, self.config.dim))  # (B, F, 6, D)
        return x, grid, time, time6

    def run_blocks(
        self, x: Tensor, time6: Tensor, rope_angles: tuple[Tensor, Tensor], text: TextContext, memory: Memory,
        layers: range | None = None,
    ) -> Tensor:
        """Blocks `layers` (default: all, in order) on tokens x [B, L, D]; `memory` is indexed by absolute layer."""
        for layer in range(len(self.blocks)) if layers is None else layers:
            x = self.blocks[layer](x, time6, rope_angles, text, memory)
        return x

    def finish(self, x: Tensor, time: Tensor, grid: tuple[int, int]) -> Tensor:
        """Head and unpatchify: tokens [B, L, D] -> flow [B, F, C, H, W]."""
        return self.unpatchify(self.head(x, time.unsqueeze(2)), grid)

    def unpatchify(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """[B, F, h*w, pf*ph*pw*C] -> [B, F*pf, C, h*ph, w*pw]; channel is the fastest index, as in the reference."""
        batch, frames = x.shape[:2]
        patch_f, patch_h, patch_w = self.config.patch_size
        x = x.view(batch, frames, *grid, patch_f, patch_h, patch_w, self.config.out_dim)
        x = torch.einsum("bfhwpqrc->bfpchqwr", x)
        return x.reshape(batch, frames * patch_f, self.config.out_dim, grid[0] * patch_h, grid[1] * patch_w)


def parameter_count(config: DiTConfig) -> int:
    """Parameters of a DiT of this config, counted on the meta device (no memory allocated)."""
    with torch.device("meta"):
        model = CausalWanDiT(config)
    return sum(math.prod(p.shape) for p in model.parameters())
