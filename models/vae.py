"""The Wan2.1 video VAE (the reference's `WanVAE_`), streaming: decoder first, encoder optional.

Latents go in chunks of any length; pixels come out as soon as their latent frame arrives. Every causal 3-D conv keeps
the last frames of its input (2 for a 3-tap time kernel) in a `FeatureCache`, so decoding a stream chunk by chunk equals decoding
it in one call, bit for bit. Frame rule: the first latent frame of a stream gives 1 video frame, every later one
`temporal_scale` (4). Parameter names follow the reference (`conv2.*`, `decoder.*`), so the decoder part of the real
`Wan2.1_VAE.pth` loads as is. The encoder (optional, `encoder=True`) streams the same way: video in chunks of
`temporal_scale` frames (plus a lone first frame at the stream start), latents out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from framecast.models.errors import CheckpointError, ConfigError, ShapeError
from framecast.models.loading import check_fits

# Per-channel statistics of Wan2.1 latents (the reference `WanVAE` wrapper's `mean` / `std`); the DiT works on
# normalised latents (z - mean) / std.
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

ENCODER_KEY_PREFIXES = ("encoder.", "conv1.")  # encoder side of a full VAE checkpoint; a decoder-only model skips them


# ---------------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class VAEConfig:
    """Constructor arguments of the reference `WanVAE_` (its names, `temperal` spelling included), plus latent stats."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()  # spatial scales (1.0 = latent size) that get attention after each res block
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # per encoder stage; the decoder reverses it
    latent_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN21_LATENT_STD

    def __post_init__(self) -> None:
        for name in ("dim", "z_dim", "num_res_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if len(self.dim_mult) < 2 or any(not isinstance(m, int) or m < 1 for m in self.dim_mult):
            raise ConfigError(f"dim_mult={self.dim_mult!r} must be at least 2 positive integers")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ConfigError(
                f"temperal_downsample={self.temperal_downsample!r} must have len(dim_mult) - 1 = "
                f"{len(self.dim_mult) - 1} entries"
            )
        if any(self.dim * m % 2 for m in self.dim_mult):
            raise ConfigError(f"dim * dim_mult = {[self.dim * m for m in self.dim_mult]} must all be even")
        for name in ("latent_mean", "latent_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ConfigError(f"{name} has {len(getattr(self, name))} entries; expected z_dim={self.z_dim}")
        if any(not s > 0 for s in self.latent_std):
            raise ConfigError(f"latent_std={self.latent_std!r} must all be > 0")

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        return self.temperal_downsample[::-1]

    @property
    def spatial_scale(self) -> int:
        """Pixels per latent along height and width."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_scale(self) -> int:
        """Video frames per latent frame after the first."""
        return 2 ** sum(self.temperal_downsample)

    def video_frames(self, latent_frames: int, *, at_start: bool = True) -> int:
        """Video frames decoded from `latent_frames` latent frames (the first of a stream gives 1)."""
        if latent_frames == 0:
            return 0
        return self.temporal_scale * latent_frames - (self.temporal_scale - 1 if at_start else 0)


VAE_PRESETS: dict[str, VAEConfig] = {
    "wan2.1": VAEConfig(),  # Wan2.1_VAE.pth (Wan2.1 T2V 1.3B / 14B, Self-Forcing, CausVid, LongLive)
    "tiny": VAEConfig(dim=8),  # the parity fixture's size
}


def vae_preset(name: str) -> VAEConfig:
    """The named preset; raises ConfigError naming the valid presets."""
    if name not in VAE_PRESETS:
        raise ConfigError(f"unknown VAE preset {name!r}; valid presets: {sorted(VAE_PRESETS)}")
    return VAE_PRESETS[name]


# ---------------------------------------------------------------------------------------------------------------------
# Streaming state


class FeatureCache:
    """The time context of one stream: per layer with time context (by slot), the last input frames it saw.

    A conv's slot starts empty, which reads as zero frames: that is the conv's causal zero padding at the stream start.
    `latent_frames` counts latent frames decoded (or encoded) so far; the temporal up- and downsamplers follow the
    first frame rule with it.
    """

    def __init__(self, slots: int) -> None:
        self._frames: list[Tensor | None] = [None] * slots
        self.latent_frames = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the frames the cache holds (a stream's decoder state, flat however long it runs)."""
        return sum(t.nbytes for t in self._frames if t is not None)

    def exchange(self, slot: int, frames: Tensor) -> Tensor | None:
        """Stores `frames` in the slot; returns what it held before (None at the stream start)."""
        previous, self._frames[slot] = self._frames[slot], frames
        return previous

    def extend(self, slot: int, x: Tensor, context_frames: int) -> Tensor:
        """`x` [B, C, T, H, W] with the slot's previous `context_frames` input frames in front; keeps the new last."""
        past = self._frames[slot]
        if past is None:
            past = x.new_zeros(x.shape[0], x.shape[1], context_frames, *x.shape[3:])
        extended = torch.cat([past, x], dim=2)
        self._frames[slot] = extended[:, :, -context_frames:].clone()  # clone: hold 2 frames, not the whole chunk
        return extended


# ---------------------------------------------------------------------------------------------------------------------
# Layers


class CausalConv3d(nn.Conv3d):
    """A 3-D conv causal in time: output frame t sees input frames up to t, with the time context from the cache.

    Height and width are zero-padded to keep their size ("same"); time gets `kernel - 1` frames of context in front.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int]) -> None:
        super().__init__(in_channels, out_channels, kernel_size)  # no built-in padding: we pad, as the reference does
        frames, height, width = kernel_size
        self.context_frames = frames - 1
        self.spatial_padding = (width // 2, width // 2, height // 2, height // 2)
        self.slot = -1  # this conv's FeatureCache slot; WanVAE assigns it

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        if self.context_frames:
            assert cache is not None, "a causal conv with time context needs a FeatureCache"
            x = cache.extend(self.slot, x, self.context_frames)
        return super().forward(F.pad(x, self.spatial_padding))


class RMSNorm(nn.Module):
    """The reference's RMS_norm: L2-normalise over channels, times sqrt(C) and a per-channel gain."""

    def __init__(self, channels: int, spatial_dims: int) -> None:
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, *(1,) * spatial_dims))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """norm -> SiLU -> causal conv -> norm -> SiLU -> causal conv, plus a 1x1x1 shortcut if the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # index 5 is the reference's Dropout (0 at inference); Identity keeps the checkpoint's indices
        self.residual = nn.Sequential(
            RMSNorm(in_channels, 3), nn.SiLU(), CausalConv3d(in_channels, out_channels, (3, 3, 3)),
            RMSNorm(out_channels, 3), nn.SiLU(), nn.Identity(), CausalConv3d(out_channels, out_channels, (3, 3, 3)),
        )  # fmt: skip
        self.shortcut = CausalConv3d(in_channels, out_channels, (1, 1, 1)) if in_channels != out_channels else None

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        norm1, act1, conv1, norm2, act2, _, conv2 = self.residual
        shortcut = x if self.shortcut is None else self.shortcut(x)
        h = conv1(act1(norm1(x)), cache)
        h = conv2(act2(norm2(h)), cache)
        return h + shortcut


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame (no time context)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = RMSNorm(channels, 2)
        self.to_qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        batch, channels, frames, height, width = x.shape
        images = x.transpose(1, 2).reshape(batch * frames, channels, height, width)  # (B*T, C, H, W)
        qkv = self.to_qkv(self.norm(images)).reshape(batch * frames, 1, channels * 3, height * width)
        q, k, v = qkv.transpose(2, 3).contiguous().chunk(3, dim=-1)  # each (B*T, 1, H*W, C)
        attended = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)  # (B*T, C, H*W)
        out = self.proj(attended.reshape(batch * frames, channels, height, width))
        return x + out.reshape(batch, frames, channels, height, width).transpose(1, 2)


class NearestUpsample2x(nn.Module):
    """2x nearest upsampling of height and width, computed in float32 and cast back as the reference does.

    The float32 round trip changes float64 values (by ~1e-8 relative); it is kept so float64 replays are bit-exact.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest").to(x.dtype)


class Upsample(nn.Module):
    """Doubles height and width (halving channels); with `temporal`, also doubles frames after a stream's first.

    The time conv predicts two frames per input frame (2C channels, interleaved in time). It skips the stream's first
    latent frame, so that frame stays 1 frame, and starts from zero context on the second.
    """

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(NearestUpsample2x(), nn.Conv2d(channels, channels // 2, 3, padding=1))
        self.time_conv = CausalConv3d(channels, channels * 2, (3, 1, 1)) if temporal else None

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        batch, channels, frames, height, width = x.shape
        if self.time_conv is not None and cache.latent_frames > 0:
            pairs = self.time_conv(x, cache).reshape(batch, 2, channels, frames, height, width)
            x = torch.stack((pairs[:, 0], pairs[:, 1]), dim=3).reshape(batch, channels, frames * 2, height, width)
            frames *= 2
        images = x.transpose(1, 2).reshape(batch * frames, channels, height, width)  # (B*T, C, H, W)
        images = self.resample(images)
        return images.reshape(batch, frames, *images.shape[1:]).transpose(1, 2)


class Downsample(nn.Module):
    """Halves height and width; with `temporal`, also halves frames after a stream's first (stride-2 time conv).

    The stream's first chunk (one frame) passes the time conv untouched; later chunks are convolved with the last frame
    of the chunk before in front, so 2k frames give k.
    """

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        # pad right and bottom only, as the reference: output pixel i then covers input pixels 2i..2i+2
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(channels, channels, 3, stride=2))
        self.time_conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1)) if temporal else None
        self.slot = -1  # this layer's FeatureCache slot (the last frame it saw); WanVAE assigns it

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        batch, channels, frames, height, width = x.shape
        images = self.resample(x.transpose(1, 2).reshape(batch * frames, channels, height, width))  # (B*T, C, H, W)
        x = images.reshape(batch, frames, *images.shape[1:]).transpose(1, 2)
        if self.time_conv is not None:
            previous = cache.exchange(self.slot, x[:, :, -1:].clone())
            if previous is not None:
                x = self.time_conv(torch.cat([previous, x], dim=2))
        return x


class Encoder3d(nn.Module):
    """conv1 -> downsampling stages -> middle (res, attention, res) -> head; one chunk of frames per call."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(3, widths[0], (3, 3, 3))

        layers: list[nn.Module] = []
        scale = 1.0  # the reference's attention-scale bookkeeping
        stages = len(widths) - 1
        for stage, (in_width, out_width) in enumerate(zip(widths[:-1], widths[1:])):
            for _ in range(config.num_res_blocks):
                layers.append(ResidualBlock(in_width, out_width))
                if scale in config.attn_scales:
                    layers.append(AttentionBlock(out_width))
                in_width = out_width
            if stage != stages - 1:
                layers.append(Downsample(out_width, temporal=config.temperal_downsample[stage]))
                scale /= 2.0
        self.downsamples = nn.Sequential(*layers)
        top = widths[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.head = nn.Sequential(RMSNorm(top, 3), nn.SiLU(), CausalConv3d(top, config.z_dim * 2, (3, 3, 3)))

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """Video [B, 3, T, H, W] (T = 1 at the stream start, else temporal_scale) -> [B, 2 z_dim, 1, H/s, W/s]."""
        x = self.conv1(x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        norm, act, conv = self.head
        x = conv(act(norm(x)), cache)
        cache.latent_frames += 1
        return x


class Decoder3d(nn.Module):
    """conv1 -> middle (res, attention, res) -> upsampling stages -> head; one latent frame per call."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.dim * m for m in (config.dim_mult[-1], *config.dim_mult[::-1])]
        top = widths[0]
        self.conv1 = CausalConv3d(config.z_dim, top, (3, 3, 3))
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))

        layers: list[nn.Module] = []
        scale = 1.0 / 2 ** (len(config.dim_mult) - 2)  # the reference's attention-scale bookkeeping
        stages = len(widths) - 1
        for stage, (in_width, out_width) in enumerate(zip(widths[:-1], widths[1:])):
            if stage > 0:
                in_width //= 2  # the previous stage's Upsample halved the channels
            for _ in range(config.num_res_blocks + 1):
                layers.append(ResidualBlock(in_width, out_width))
                if scale in config.attn_scales:
                    layers.append(AttentionBlock(out_width))
                in_width = out_width
            if stage != stages - 1:
                layers.append(Upsample(out_width, temporal=config.temperal_upsample[stage]))
                scale *= 2.0
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(widths[-1], 3), nn.SiLU(), CausalConv3d(widths[-1], 3, (3, 3, 3)))

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """One latent frame [B, z_dim, 1, H, W] -> pixels [B, 3, 1 or temporal_scale, H*s, W*s]; advances `cache`."""
        x = self.conv1(x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        norm, act, conv = self.head
        x = conv(act(norm(x)), cache)
        cache.latent_frames += 1
        return x


# ---------------------------------------------------------------------------------------------------------------------
# Model


def _number_cache_slots(root: nn.Module) -> int:
    """Gives every layer under `root` that carries time context its own FeatureCache slot; returns the count."""
    layers = [
        m
        for m in root.modules()
        if (isinstance(m, CausalConv3d) and m.context_frames) or (isinstance(m, Downsample) and m.time_conv is not None)
    ]
    for slot, layer in enumerate(layers):
        layer.slot = slot
    return len(layers)


class WanVAE(nn.Module):
    """Wan2.1's video VAE: normalised latents [B, z_dim, T, H, W] <-> pixels in [-1, 1] [B, 3, T', 8H, 8W].

    Parameter names are the reference `WanVAE_`'s. The encoder side (`encoder.*`, `conv1.*`) exists only with
    `encoder=True`; a decoder-only model holds `conv2.*` and `decoder.*`.
    """

    def __init__(self, config: VAEConfig, *, encoder: bool = False) -> None:
        super().__init__()
        self.config = config
        if encoder:
            self.encoder = Encoder3d(config)
            self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, (1, 1, 1))  # -> (mean, log variance)
            self.encoder_cache_slots = _number_cache_slots(self.encoder)
        self.has_encoder = encoder
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, (1, 1, 1))
        self.decoder = Decoder3d(config)
        self.cache_slots = _number_cache_slots(self.decoder)
        self._scales: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def new_cache(self) -> FeatureCache:
        """An empty decoder stream."""
        return FeatureCache(self.cache_slots)

    def new_encoder_cache(self) -> FeatureCache:
        """An empty encoder stream."""
        if not self.has_encoder:
            raise ConfigError("this WanVAE was built without its encoder (encoder=False)")
        return FeatureCache(self.encoder_cache_slots)

    def _latent_scale(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, 1/std) shaped [1, z_dim, 1, 1, 1], as the reference's `scale`, in `like`'s dtype and device."""
        key = (like.dtype, like.device)
        if key not in self._scales:  # built once per dtype and device: no host-to-device copy per chunk
            mean = torch.tensor(self.config.latent_mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
            std = torch.tensor(self.config.latent_std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
            self._scales[key] = (mean, 1.0 / std)
        return self._scales[key]

    def denormalize(self, z: Tensor) -> Tensor:
        """z * std + mean, written as the reference's z / (1/std) + mean so float64 replays are bit-exact."""
        mean, inv_std = self._latent_scale(z)
        return z / inv_std + mean

    def normalize(self, latents: Tensor) -> Tensor:
        """(latents - mean) / std, written as the reference's (latents - mean) * (1/std)."""
        mean, inv_std = self._latent_scale(latents)
        return (latents - mean) * inv_std

    def encode_frames(self, video: Tensor, cache: FeatureCache) -> Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] -> normalised latent means [B, z_dim, T', H/s, W/s], continuing `cache`.

        At the stream start T = 1 + 4k gives 1 + k latent frames (the first frame alone, then groups of 4), later
        T = 4k gives k; WanVAEEncodeStream checks this. The posterior mean is returned (no sampling).
        """
        step = self.config.temporal_scale
        frames = video.shape[2]
        starts = [0, *range(1, frames, step)] if cache.latent_frames == 0 else [*range(0, frames, step)]
        ends = [*starts[1:], frames]
        # conv1 per latent frame: a 1x1x1 conv's rounding can depend on the frame count, and chunking must not matter
        moments = torch.cat([self.conv1(self.encoder(video[:, :, a:b], cache)) for a, b in zip(starts, ends)], dim=2)
        mean, _log_var = moments.chunk(2, dim=1)
        return self.normalize(mean)

    def encode(self, video: Tensor) -> Tensor:
        """One-shot encode of a whole stream (the reference `WanVAE_.encode`): T = 1 + 4k frames."""
        return self.encode_frames(video, self.new_encoder_cache())

    def decode_frames(self, z: Tensor, cache: FeatureCache) -> Tensor:
        """Normalised latents [B, z_dim, T, H, W] -> pixels [B, 3, T', H*s, W*s], unclamped, continuing `cache`.

        T' = 1 + 4(T-1) at the stream start, 4T after. The decoder runs one latent frame at a time, as the reference
        does, so any chunking of a stream gives the same result bit for bit.
        """
        z = self.denormalize(z)
        # conv2 per frame too: a 1x1x1 conv's rounding can depend on the frame count, and chunking must not matter
        return torch.cat([self.decoder(self.conv2(z[:, :, t : t + 1]), cache) for t in range(z.shape[2])], dim=2)

    def decode(self, z: Tensor) -> Tensor:
        """One-shot decode of a whole stream (the reference `WanVAE_.decode`), unclamped."""
        return self.decode_frames(z, self.new_cache())


def _check_video(video: Tensor, config: VAEConfig, at_start: bool) -> None:
    step, scale = config.temporal_scale, config.spatial_scale
    frames = video.shape[2] if video.ndim == 5 else 0
    frame_rule = (frames - 1) % step == 0 if at_start else frames % step == 0
    if video.ndim != 5 or video.shape[1] != 3 or video.shape[3] % scale or video.shape[4] % scale or not frames:
        raise ShapeError(
            f"video has shape {tuple(video.shape)}; expected [B, 3, T, H, W] with H, W multiples of {scale}"
        )
    if not frame_rule:
        rule = f"1 + {step}k at the stream start" if at_start else f"a multiple of {step} after the stream start"
        raise ShapeError(f"video has shape {tuple(video.shape)}: T={frames} frames must be {rule}")


def _check_latents(z: Tensor, config: VAEConfig, layout: str, channel_dim: int) -> None:
    expected, frame_dim = layout.replace("C", str(config.z_dim)), 2 if channel_dim == 1 else 1
    if z.ndim != 5 or z.shape[channel_dim] != config.z_dim or z.shape[frame_dim] < 1:
        raise ShapeError(f"latents have shape {tuple(z.shape)}; expected {expected} with at least 1 frame")


class WanVAEStream:
    """Decodes one stream of normalised latent chunks [B, z_dim, T, H, W] (any T >= 1) with the time context carried.

    Chunk by chunk equals `WanVAE.decode` of the concatenated stream exactly. `reset()` starts a new stream.
    """

    def __init__(self, model: WanVAE) -> None:
        self.model = model
        self.reset()

    def reset(self) -> None:
        self._cache = self.model.new_cache()
        self._geometry: tuple[int, int, int] | None = None  # (B, H, W) of the stream, fixed by its first chunk

    @property
    def latent_frames(self) -> int:
        """Latent frames decoded since the last reset."""
        return self._cache.latent_frames

    def decode(self, z: Tensor) -> Tensor:
        """Pixels [B, 3, T', H*s, W*s], unclamped (the reference's `cached_decode`).

        Raises:
            ShapeError: `z` is not [B, z_dim, T>=1, H, W], or its B, H, W differ from the stream's first chunk.
        """
        _check_latents(z, self.model.config, "[B, C, T, H, W]", channel_dim=1)
        batch, _, _, height, width = z.shape
        if self._geometry is None:
            self._geometry = (batch, height, width)
        elif self._geometry != (batch, height, width):
            b, h, w = self._geometry
            channels = self.model.config.z_dim
            raise ShapeError(
                f"latents have shape {tuple(z.shape)}; this stream expects [{b}, {channels}, T, {h}, {w}]"
                " (call reset() to start a stream of another size)"
            )
        return self.model.decode_frames(z, self._cache)


class WanVAEEncodeStream:
    """Encodes one stream of video chunks [B, 3, T, H, W] in [-1, 1] to normalised latents, time context carried.

    The first chunk has 1 + 4k frames, later ones 4k; chunk by chunk equals `WanVAE.encode` of the whole stream.
    """

    def __init__(self, model: WanVAE) -> None:
        self.model = model
        self.reset()

    def reset(self) -> None:
        self._cache = self.model.new_encoder_cache()
        self._geometry: tuple[int, int, int] | None = None  # (B, H, W) of the stream, fixed by its first chunk

    def encode(self, video: Tensor) -> Tensor:
        """Latents [B, z_dim, T', H/8, W/8].

        Raises:
            ShapeError: `video` breaks the frame rule, is not [B, 3, T, H, W] with H, W multiples of the spatial
                scale, or its B, H, W differ from the stream's first chunk.
        """
        _check_video(video, self.model.config, at_start=self._cache.latent_frames == 0)
        batch, _, _, height, width = video.shape
        if self._geometry is None:
            self._geometry = (batch, height, width)
        elif self._geometry != (batch, height, width):
            b, h, w = self._geometry
            raise ShapeError(
                f"video has shape {tuple(video.shape)}; this stream expects [{b}, 3, T, {h}, {w}]"
                " (call reset() to start a stream of another size)"
            )
        return self.model.encode_frames(video, self._cache)


class WanVAEDecoder:
    """Our decoder interface over the Wan VAE: latents [B, F, C, H, W] (the DiT's layout) -> uint8 [B, F', 8H, 8W, 3].

    Streaming: F' = 1 + 4(F-1) for the first chunk after construction or `reset()`, 4F after. Output is on the CPU.
    """

    def __init__(self, model: WanVAE) -> None:
        self.model = model
        self._stream = WanVAEStream(model)

    def reset(self) -> None:
        self._stream.reset()

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        """Raises ShapeError if `latents` is not [B, F>=1, z_dim, H, W] or its B, H, W change mid-stream."""
        _check_latents(latents, self.model.config, "[B, F, C, H, W]", channel_dim=2)
        weight = self.model.conv2.weight
        z = latents.transpose(1, 2).to(device=weight.device, dtype=weight.dtype)  # (B, C, F, H, W)
        pixels = self._stream.decode(z).clamp(-1, 1)  # (B, 3, F', H', W'), clamped as the reference wrapper does
        frames = ((pixels + 1) * 127.5).round().to(torch.uint8)  # [-1, 1] -> [0, 255]
        return frames.permute(0, 2, 3, 4, 1).cpu()  # (B, F', H', W', 3)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def check_vae_state(model: WanVAE, state: Mapping[str, Tensor], source: str = "state dict") -> None:
    """Checks that `state` fits `model` exactly; `model` may live on the meta device.

    Raises:
        CheckpointError: naming `source`, listing every missing, unexpected and mis-shaped key with its shapes.
    """
    check_fits(model, state, source, "Wan VAE" if model.has_encoder else "Wan VAE decoder")


def load_wan_vae(
    checkpoint: str | os.PathLike | Mapping[str, Tensor],
    config: VAEConfig = VAE_PRESETS["wan2.1"],
    *,
    encoder: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> WanVAE:
    """A `WanVAE` in eval mode from a reference state dict or a file holding one (e.g. `Wan2.1_VAE.pth`).

    Without `encoder`, encoder-side keys (`encoder.*`, `conv1.*`) are set aside. The model is built on the meta device
    and takes the checkpoint's tensors, so weights are allocated once; `dtype` converts them afterwards (default: as
    stored).

    Raises:
        CheckpointError: the file holds no state dict, or it does not fit `config` (every bad key listed at once).
    """
    if isinstance(checkpoint, Mapping):
        state, source = checkpoint, "state dict"
    else:
        source = os.fspath(checkpoint)
        state = torch.load(source, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"{source}: expected a state dict of tensors, found {type(state).__name__}")
    if not encoder:
        state = {key: t for key, t in state.items() if not key.startswith(ENCODER_KEY_PREFIXES)}
    with torch.device("meta"):
        model = WanVAE(config, encoder=encoder)
    check_vae_state(model, state, source)
    model.load_state_dict(dict(state), assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
