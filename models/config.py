"""Size and shape of the causal Wan DiT: one frozen dataclass, named presets.

Nothing downstream hard-codes a width, a layer count or tokens per frame: it asks the config.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
from dataclasses import dataclass

from framecast.models.errors import ConfigError


class AttentionKind(enum.Enum):
    """How self-attention reaches past frames."""

    SOFTMAX = "softmax"  # Wan's attention; past frames through a KV cache
    LINEAR = "linear"  # ReLU-kernel linear attention (SANA-Video style); past frames through a constant-size state


ROPE_TABLE_FRAMES = 1024  # Wan's RoPE tables hold 1024 positions per axis


def check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


@dataclass(frozen=True)
class DiTConfig:
    """Constructor arguments of the causal Wan2.1 DiT (the reference's `CausalWanModel` names)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    freq_dim: int = 256  # width of the sinusoidal timestep embedding
    text_dim: int = 4096  # width of the text encoder's output (umT5-XXL)
    text_len: int = 512  # text tokens the DiT attends to
    in_dim: int = 16  # latent channels in
    out_dim: int = 16  # latent channels out
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, height, width) per token
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True  # norm3 before cross-attention (affine LayerNorm)
    attention: AttentionKind = AttentionKind.SOFTMAX
    num_actions: int = 0  # > 0 adds a per-frame action embedding to the time conditioning

    def __post_init__(self) -> None:
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "freq_dim", "text_dim", "text_len", "in_dim", "out_dim"):
            check_positive(name, getattr(self, name))
        if not isinstance(self.num_actions, int) or self.num_actions < 0:
            raise ConfigError(f"num_actions={self.num_actions!r} must be an integer >= 0")
        if len(self.patch_size) != 3 or any(not isinstance(p, int) or p < 1 for p in self.patch_size):
            raise ConfigError(f"patch_size={self.patch_size!r} must be three positive integers (frames, height, width)")
        if self.patch_size[0] != 1:
            raise ConfigError(f"patch_size={self.patch_size!r}: the causal DiT needs 1 frame per token (patch_size[0] == 1)")
        if self.dim % self.num_heads:
            raise ConfigError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ConfigError(f"head_dim={self.head_dim} (dim/num_heads) must be even and >= 6 for 3-D RoPE")
        if self.freq_dim % 2:
            raise ConfigError(f"freq_dim={self.freq_dim} must be even")
        if not isinstance(self.attention, AttentionKind):
            raise ConfigError(f"attention={self.attention!r} must be one of {[k.value for k in AttentionKind]}")
        if not 0 < self.eps < 1:
            raise ConfigError(f"eps={self.eps!r} must be in (0, 1)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Complex RoPE pairs per head given to (frame, height, width), as the reference splits them."""
        pairs = self.head_dim // 2
        return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3

    @property
    def patch_channels(self) -> int:
        """Values the head predicts per token: out_dim times the patch volume."""
        frames, height, width = self.patch_size
        return self.out_dim * frames * height * width

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        """Tokens one latent frame of the given size becomes; raises ConfigError if the patch does not tile it."""
        _, patch_h, patch_w = self.patch_size
        if latent_height % patch_h or latent_width % patch_w or latent_height < 1 or latent_width < 1:
            raise ConfigError(
                f"latent size {latent_height}x{latent_width} must be a positive multiple of the patch {patch_h}x{patch_w}"
            )
        grid_h, grid_w = latent_height // patch_h, latent_width // patch_w
        if max(grid_h, grid_w) > ROPE_TABLE_FRAMES:
            raise ConfigError(f"latent grid {grid_h}x{grid_w} exceeds the RoPE table ({ROPE_TABLE_FRAMES} per axis)")
        return grid_h * grid_w

    def replace(self, **changes: object) -> DiTConfig:
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown DiTConfig field(s) {unknown}; fields: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, DiTConfig] = {
    # Wan2.1 T2V 1.3B: Self-Forcing, CausVid, LongLive, StreamDiffusionV2, Rolling Forcing (1,418,996,800 params)
    "wan2.1-t2v-1.3b": DiTConfig(),
    # Wan2.1 T2V 14B
    "wan2.1-t2v-14b": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # a mid-size model for CPU benchmarks (20.4M params)
    "small": DiTConfig(dim=384, ffn_dim=1536, num_heads=6, num_layers=8, text_dim=256, text_len=64),
    # the embedded world model (stream/worldmodel): 3.95M params, 8x8 tokens per 128x128 frame, 5 action ids
    "world": DiTConfig(dim=192, ffn_dim=768, num_heads=3, num_layers=6, text_dim=64, text_len=8, num_actions=5),
    # the parity fixtures' size: 2 layers of width 64 (0.16M params)
    "tiny": DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=16),
}


def preset(name: str, **overrides: object) -> DiTConfig:
    """The named preset, optionally with fields changed; raises ConfigError naming the valid presets."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; presets: {', '.join(PRESETS)}")
    config = PRESETS[name]
    return config.replace(**overrides) if overrides else config
