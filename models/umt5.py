"""Wan's umT5 text encoder (encoder only): prompt text -> the [B, text_len, dim] embedding the DiT cross-attends to.

A re-implementation of `wan/modules/t5.py` (`umt5_xxl(encoder_only=True)`, `shared_pos=False`) with the same parameter
names, so Wan's `models_t5_umt5-xxl-enc-bf16.pth` loads as is. Numerics follow the reference, which is what the DiT was
trained on: the RMS-norm variance and the attention softmax run in float32 whatever the model dtype, attention scores
are not scaled by 1/sqrt(head_dim), and padded keys get `finfo(dtype).min`.

`UMT5Encoder` is the network (token ids + mask -> hidden states); `PromptEncoder` adds the tokenizer, the zeroing of
padding rows the DiT expects, a bounded per-prompt cache and device placement; `load_umt5` is the checkpoint boundary.
"""

from __future__ import annotations

import dataclasses
import enum
import html
import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from framecast.models.errors import CheckpointError, ConfigError, MissingDependency, ShapeError
from framecast.models.config import check_positive
from framecast.models.loading import check_fits, read_checkpoint

StateDict = dict[str, Tensor]


# ---------------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class UMT5Config:
    """Sizes of the umT5 encoder; the defaults are Wan's umt5-xxl (5.7B parameters, 24 layers of width 4096)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096  # width of q/k/v: num_heads * head_dim, not tied to dim
    ffn_dim: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32  # relative-position buckets, both directions together
    max_distance: int = 128  # distances at or beyond this share the last bucket
    text_len: int = 512  # tokens per prompt after padding / truncation (the DiT's text_len)
    eps: float = 1e-6
    pad_id: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "dim_attn", "ffn_dim", "num_heads", "num_layers", "text_len"):
            check_positive(name, getattr(self, name))
        if self.dim_attn % self.num_heads:
            raise ConfigError(f"dim_attn={self.dim_attn} must be divisible by num_heads={self.num_heads}")
        if not isinstance(self.num_buckets, int) or self.num_buckets < 4 or self.num_buckets % 2:
            raise ConfigError(f"num_buckets={self.num_buckets!r} must be an even integer >= 4 (half per direction)")
        if not isinstance(self.max_distance, int) or self.max_distance <= self.num_buckets // 4:
            raise ConfigError(
                f"max_distance={self.max_distance!r} must be an integer > num_buckets/4={self.num_buckets // 4} "
                "(the exact-distance buckets)"
            )
        if not 0 < self.eps < 1:
            raise ConfigError(f"eps={self.eps!r} must be in (0, 1)")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ConfigError(f"pad_id={self.pad_id!r} must be in [0, vocab_size={self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    def replace(self, **changes: object) -> UMT5Config:
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            names = [f.name for f in dataclasses.fields(self)]
            raise ConfigError(f"unknown UMT5Config field(s) {unknown}; fields: {names}")
        return dataclasses.replace(self, **changes)


UMT5_PRESETS: dict[str, UMT5Config] = {
    # google/umt5-xxl encoder as Wan2.1 ships it (models_t5_umt5-xxl-enc-bf16.pth)
    "umt5-xxl": UMT5Config(),
    # the parity fixture's size (umt5_tiny_float64.pt)
    "tiny": UMT5Config(vocab_size=64, dim=32, dim_attn=32, ffn_dim=80, num_heads=2, num_layers=2, text_len=160),
}


def umt5_preset(name: str, **overrides: object) -> UMT5Config:
    """The named preset, optionally with fields changed; raises ConfigError naming the valid presets."""
    if name not in UMT5_PRESETS:
        raise ConfigError(f"unknown umT5 preset {name!r}; presets: {', '.join(UMT5_PRESETS)}")
    config = UMT5_PRESETS[name]
    return config.replace(**overrides) if overrides else config


# ---------------------------------------------------------------------------------------------------------------------
# Network


def relative_position_buckets(
    query_len: int, key_len: int, num_buckets: int = 32, max_distance: int = 128, device: torch.device | str = "cpu"
) -> Tensor:
    """int64 [query_len, key_len]: T5's bidirectional bucket of (key - query).

    Half the buckets per direction (+num_buckets/2 when the key is after the query); in each half, distances below a
    quarter of num_buckets get their own bucket, larger ones share log-spaced buckets up to `max_distance`.
    """
    relative = torch.arange(key_len, device=device)[None, :] - torch.arange(query_len, device=device)[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = relative.abs()
    # log in float32, as the reference: in float64 a few distances land in the neighbouring bucket. The clamp only
    # keeps log(0) out of the branch that `where` discards.
    scaled = torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = (exact + scaled.long()).clamp(max=half - 1)
    return (relative > 0).long() * half + torch.where(distance < exact, distance, far)


class T5RMSNorm(nn.Module):
    """w * x / rms(x), no mean subtraction and no bias; the variance is taken in float32 whatever the dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class GeluTanh(nn.Module):
    """The tanh approximation of GELU, written out as the reference does (bit-identical in float64)."""

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head); each layer has its own table (umT5: shared_pos=False)."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: Tensor) -> Tensor:
        """[L, L] bucket ids -> [1, N, L, L] additive attention bias."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class UMT5Attention(nn.Module):
    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q = nn.Linear(config.dim, config.dim_attn, bias=False)
        self.k = nn.Linear(config.dim, config.dim_attn, bias=False)
        self.v = nn.Linear(config.dim, config.dim_attn, bias=False)
        self.o = nn.Linear(config.dim_attn, config.dim, bias=False)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x [B, L, dim], bias [B or 1, N, L, L] (positions + key mask) -> [B, L, dim]."""
        batch, heads, head_dim = x.shape[0], self.num_heads, self.head_dim
        q = self.q(x).view(batch, -1, heads, head_dim)  # (B, L, N, C)
        k = self.k(x).view(batch, -1, heads, head_dim)
        v = self.v(x).view(batch, -1, heads, head_dim)
        # T5 folds the 1/sqrt(C) scale into its initialisation: the scores are not scaled
        scores = torch.einsum("binc,bjnc->bnij", q, k) + bias  # (B, N, L, L)
        # softmax in float32 and back, as the reference: in float64 that rounding is visible (~1e-6)
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        out = torch.einsum("bnij,bjnc->binc", weights, v)  # (B, L, N, C)
        return self.o(out.reshape(batch, -1, heads * head_dim))


class UMT5FeedForward(nn.Module):
    """Gated GELU: fc2(fc1(x) * gelu_tanh(gate(x)))."""

    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(config.dim, config.ffn_dim, bias=False), GeluTanh())
        self.fc1 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.fc2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _clamp_float16(x: Tensor) -> Tensor:
    """The reference's guard against float16 overflow in the residual stream; a no-op in every other dtype."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        x = x.clamp(min=-limit, max=limit)
    return x


class UMT5Block(nn.Module):
    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        self.norm1 = T5RMSNorm(config.dim, config.eps)
        self.attn = UMT5Attention(config)
        self.norm2 = T5RMSNorm(config.dim, config.eps)
        self.ffn = UMT5FeedForward(config)
        self.pos_embedding = RelativePositionBias(config.num_buckets, config.num_heads)

    def forward(self, x: Tensor, buckets: Tensor, key_is_pad: Tensor | None) -> Tensor:
        bias = self.pos_embedding(buckets).to(x.dtype)
        if key_is_pad is not None:
            bias = bias.masked_fill(key_is_pad, torch.finfo(x.dtype).min)  # (B, 1, 1, L) -> (B, N, L, L)
        x = _clamp_float16(x + self.attn(self.norm1(x), bias))
        return _clamp_float16(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """Token ids [B, L] (+ mask) -> hidden states [B, L, dim]; parameter names are Wan's `T5Encoder`'s."""

    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(UMT5Block(config) for _ in range(config.num_layers))
        self.norm = T5RMSNorm(config.dim, config.eps)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """ids int [B, L], mask [B, L] (nonzero = token, 0 = padding) -> [B, L, dim], padded rows not zeroed."""
        length = ids.shape[1]
        buckets = relative_position_buckets(
            length, length, self.config.num_buckets, self.config.max_distance, device=ids.device
        )
        key_is_pad = None if mask is None else (mask == 0)[:, None, None, :]  # (B, 1, 1, L)
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, buckets, key_is_pad)
        return self.norm(x)


def zero_padding_rows(hidden: Tensor, mask: Tensor) -> Tensor:
    """hidden [B, L, D] with rows at or past each prompt's length (count of mask > 0) set to 0, as the DiT reads it."""
    lengths = mask.gt(0).sum(dim=1)
    is_pad = torch.arange(hidden.shape[1], device=hidden.device)[None, :] >= lengths[:, None]
    return hidden.masked_fill(is_pad[..., None], 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint


def check_umt5_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Checks that `state` fits `model` exactly (`model` may live on the meta device).

    Raises:
        CheckpointError: naming `source`, listing every missing, unexpected and mis-shaped key with its shapes.
    """
    check_fits(model, state, source, "umT5 encoder")


def load_umt5(
    source: str | os.PathLike | Mapping[str, Tensor],
    config: UMT5Config = UMT5_PRESETS["umt5-xxl"],
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> UMT5Encoder:
    """A `UMT5Encoder` (eval, no grad) with the weights of Wan's `models_t5_umt5-xxl-enc-bf16.pth` layout.

    `source` is a `.pth` / `.pt` / `.safetensors` file or a state dict already in memory. The model is built on the
    meta device and takes the loaded tensors themselves, so the 11 GB of weights are never allocated twice.

    Raises:
        CheckpointError: the file is missing or unreadable, or its keys do not fit `config` (one error listing every
            missing, unexpected and mis-shaped key).
    """
    if isinstance(source, Mapping):
        state, name = dict(source), "umT5 state dict"
    else:
        state, name = read_checkpoint(source), str(source)
    with torch.device("meta"):
        model = UMT5Encoder(config)
    check_umt5_state_dict(model, state, name)
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer(Protocol):
    def __call__(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (ids int64 [B, text_len], mask int64 [B, text_len], 1 for tokens and 0 for padding)."""
        ...


def clean_prompt(text: str) -> str:
    """Wan's `clean='whitespace'`: HTML entities decoded (twice), runs of whitespace collapsed, ends stripped.

    Wan also runs `ftfy.fix_text`, which only repairs mis-decoded text (mojibake); a prompt arriving as a proper `str`
    is unchanged by it, so that dependency is left out.
    """
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


class UMT5Tokenizer:
    """google/umt5-xxl's SentencePiece tokenizer through `transformers.AutoTokenizer`, from a local folder only.

    Pads and truncates to `text_len` with an EOS token, as Wan's `HuggingfaceTokenizer(seq_len=512,
    clean='whitespace')`. `transformers` is imported here, not at module import: it is needed only for raw text.
    """

    def __init__(self, path: str | os.PathLike, text_len: int) -> None:
        check_positive("text_len", text_len)
        path = Path(path)
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise MissingDependency(
                "the umT5 tokenizer needs the 'transformers' package (and 'sentencepiece'), which is not installed: "
                "pip install transformers sentencepiece; or pass token ids to PromptEncoder.encode_ids, or load "
                "precomputed embeddings with framecast.models.text.load_prompt_embeds"
            ) from exc
        if not path.is_dir():
            raise CheckpointError(
                f"{path}: no tokenizer folder; pass the local google/umt5-xxl folder (Wan2.1's ships one as "
                "Wan2.1-T2V-1.3B/google/umt5-xxl), it is never downloaded"
            )
        self.text_len = text_len
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def __call__(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        tokens = self.tokenizer(
            [clean_prompt(prompt) for prompt in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return tokens["input_ids"], tokens["attention_mask"]


# ---------------------------------------------------------------------------------------------------------------------
# Prompt encoder


class Placement(enum.Enum):
    """Where the encoder's weights live between calls."""

    RESIDENT = "resident"  # kept on the compute device: fastest prompt switches
    OFFLOAD = "offload"  # on CPU between calls, moved to the device for each encode: frees ~11 GB (bf16) for the DiT


class PromptEncoder:
    """Prompts -> [B, text_len, dim] embeddings with padding rows zeroed, each prompt encoded once (LRU cache).

    The encoder runs on `device` in its own dtype; the embeddings come back on `device`. With `Placement.OFFLOAD` the
    weights wait on CPU and visit `device` only while a batch of new prompts is encoded.
    """

    def __init__(
        self,
        encoder: UMT5Encoder,
        tokenizer: Tokenizer | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        placement: Placement = Placement.RESIDENT,
        cache_size: int = 32,
    ) -> None:
        if not isinstance(placement, Placement):
            raise ConfigError(f"placement={placement!r} must be one of {[p.value for p in Placement]}")
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ConfigError(f"cache_size={cache_size!r} must be an integer >= 0 (0 turns the cache off)")
        self.config = encoder.config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.placement = placement
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()  # prompt -> [text_len, dim] on self.device
        home = torch.device("cpu") if placement is Placement.OFFLOAD else self.device
        self.encoder = encoder.to(device=home, dtype=dtype).eval().requires_grad_(False)

    @classmethod
    def from_files(
        cls,
        checkpoint: str | os.PathLike,
        tokenizer_dir: str | os.PathLike,
        config: UMT5Config = UMT5_PRESETS["umt5-xxl"],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        placement: Placement = Placement.RESIDENT,
        cache_size: int = 32,
    ) -> PromptEncoder:
        """Wan's encoder checkpoint (`load_umt5`) and its local tokenizer folder (`UMT5Tokenizer`), in one call.

        Raises:
            CheckpointError: as `load_umt5`, or `tokenizer_dir` is not a folder.
            MissingDependency: `transformers` is not installed.
        """
        tokenizer = UMT5Tokenizer(tokenizer_dir, config.text_len)  # first: a missing package fails before 11 GB load
        encoder = load_umt5(checkpoint, config, dtype=dtype)
        return cls(encoder, tokenizer, device=device, dtype=dtype, placement=placement, cache_size=cache_size)

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """[B, text_len, dim] on `device`; prompts seen recently come from the cache and are not re-encoded.

        Raises:
            ConfigError: no tokenizer was given (use `encode_ids`).
            ShapeError: `prompts` is empty or not a list of strings.
        """
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ShapeError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        if self.tokenizer is None:
            raise ConfigError("this PromptEncoder has no tokenizer; pass one, or call encode_ids with token ids")
        new = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        fresh: dict[str, Tensor] = {}
        if new:
            ids, mask = self.tokenizer(new)
            fresh = dict(zip(new, self.encode_ids(ids, mask)))
        rows = [fresh[p] if p in fresh else self._cache[p] for p in prompts]
        for prompt, row in zip(prompts, rows):
            self._remember(prompt, row)
        return torch.stack(rows)

    def encode_ids(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Pre-tokenised prompts: ids int [B, L], mask [B, L] (1 token, 0 padding) -> [B, L, dim] on `device`.

        Raises:
            ShapeError: ids is not 2-D integer, mask does not match it, or an id is outside [0, vocab_size).
        """
        if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ShapeError(f"ids must be an integer tensor [B, L], got {ids.dtype} {tuple(ids.shape)}")
        if mask.shape != ids.shape:
            raise ShapeError(f"mask has shape {tuple(mask.shape)}; expected the ids' {tuple(ids.shape)}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ShapeError(f"token ids span [{low}, {high}]; must be in [0, vocab_size={self.config.vocab_size})")
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self.placement is Placement.OFFLOAD:
            self.encoder.to(self.device)
        try:
            with torch.inference_mode():
                return zero_padding_rows(self.encoder(ids, mask), mask)
        finally:
            if self.placement is Placement.OFFLOAD:
                self.encoder.to("cpu")

    def clear_cache(self) -> None:
        self._cache.clear()

    def _remember(self, prompt: str, embedding: Tensor) -> None:
        """Stores or refreshes `prompt` as the most recently used entry; evicts the least recent past the limit."""
        if self.cache_size == 0:
            return
        self._cache[prompt] = embedding
        self._cache.move_to_end(prompt)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
