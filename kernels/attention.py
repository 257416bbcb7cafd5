"""The one attention function every FrameCast model calls; a faster kernel replaces this function alone.

Layout is the DiT's: [batch, tokens, heads, head_dim]. Dispatches to PyTorch SDPA, which picks flash / memory-
efficient / math backends by itself, so no flash-attn install is required.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax attention with the default 1/sqrt(head_dim) scale.

    q [B, Lq, H, D], k and v [B, Lk, H, D]; mask: optional bool [Lq, Lk], True where a query may attend.
    Returns [B, Lq, H, D] in q's dtype.
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def linear_attention(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor, normalizer: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor, Tensor]:
    """ReLU-kernel linear attention of a block of tokens over a running state plus the block itself.

    q, k, v [B, L, H, D]; state [B, H, D, D] (sum of phi(k)^T v over earlier blocks), normalizer [B, H, D] (sum of
    phi(k)). Computed in float32 at least. Returns (out [B, L, H, D] in q's dtype, the block's own state term,
    the block's own normalizer term); the caller decides when to add them to the running state.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    fq, fk, vv = torch.relu(q.to(compute)), torch.relu(k.to(compute)), v.to(compute)
    block_state = torch.einsum("blhd,blhe->bhde", fk, vv)
    block_normalizer = fk.sum(dim=1)
    numerator = torch.einsum("blhd,bhde->blhe", fq, state + block_state)
    denominator = torch.einsum("blhd,bhd->blh", fq, normalizer + block_normalizer).unsqueeze(-1) + eps
    return (numerator / denominator).to(q.dtype), block_state, block_normalizer


def masked_linear_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Quadratic form of `linear_attention` under a bool mask [Lq, Lk]: the cache-free reference of the state path."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    fq, fk, vv = torch.relu(q.to(compute)), torch.relu(k.to(compute)), v.to(compute)
    scores = torch.einsum("bqhd,bkhd->bhqk", fq, fk) * mask
    numerator = torch.einsum("bhqk,bkhe->bqhe", scores, vv)
    denominator = scores.sum(dim=-1).transpose(1, 2).unsqueeze(-1) + eps
    return (numerator / denominator).to(q.dtype)
