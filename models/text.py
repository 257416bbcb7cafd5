"""Prompt text -> the embedding the DiT's cross-attention reads.

`HashedTextEncoder` gives every word a fixed pseudo-random vector (seeded by a stable hash of the word), so that
random-weight models react to prompts deterministically. It carries no meaning: real checkpoints need the text
encoder they were trained with (umT5 for the Wan family, the embedded model's own encoder), or precomputed
embeddings loaded with `load_prompt_embeds`.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from torch import Tensor

from framecast.models.errors import CheckpointError, ShapeError

_WORD = re.compile(r"[\w']+")


class HashedTextEncoder:
    def __init__(self, text_dim: int, text_len: int) -> None:
        self.text_dim, self.text_len = text_dim, text_len

    def encode(self, prompt: str) -> Tensor:
        """[text_len, text_dim] float32: one unit-RMS row per word (at most text_len), zero rows after."""
        words = _WORD.findall(prompt.lower())
        if not words:
            raise ShapeError(f"prompt {prompt!r} has no words")
        if len(words) > self.text_len:
            raise ShapeError(f"prompt has {len(words)} words; this model reads at most {self.text_len}")
        rows = torch.zeros(self.text_len, self.text_dim)
        for index, word in enumerate(words):
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
            rows[index] = torch.randn(self.text_dim, generator=torch.Generator().manual_seed(seed))
        return rows


def load_prompt_embeds(path: str | Path, text_dim: int, text_len: int) -> Tensor:
    """A precomputed prompt embedding [T <= text_len, text_dim] (or [1, T, text_dim]) from .pt or .safetensors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"prompt embedding file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
        if len(tensors) != 1:
            raise CheckpointError(f"{path}: expected one tensor, found {sorted(tensors)}")
        embeds = next(iter(tensors.values()))
    else:
        embeds = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(embeds, Tensor):
            raise CheckpointError(f"{path}: expected a tensor, found {type(embeds).__name__}")
    if embeds.ndim == 3 and embeds.shape[0] == 1:
        embeds = embeds[0]
    if embeds.ndim != 2 or embeds.shape[1] != text_dim or not 1 <= embeds.shape[0] <= text_len:
        raise ShapeError(f"{path}: prompt embedding of shape {tuple(embeds.shape)}; expected [<= {text_len}, {text_dim}]")
    return embeds.float()
