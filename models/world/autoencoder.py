"""The world autoencoder: 128x128 RGB frames <-> 16x16x16 latents, with a fast streaming decoder.

Compression is spatial only: x8 along each axis and one latent frame per video frame (`frames_per_latent = 1`); the
Wan-style x4 temporal rule is not implemented yet. The encoder works frame by frame. The decoder is a stack of 2-D
convolutions applied to every latent frame plus one temporal layer at latent resolution, `MemBlock` (as in TAEHV):
it mixes each frame with its own input at the previous frame (zeros before the stream's first frame). That input is
the only state the decoder has, so `WorldDecoder` carries it between chunks and any chunking of a stream decodes to
exactly the one-shot result.

The decoder never convolves at full resolution: its last conv runs at 64x64 and a pixel shuffle makes the 2x2 pixel
blocks, which keeps decoding cheap on a CPU (see `autoencoder_report.md` in `weights/` for measured speeds).

Latents are normalised: `encode` returns (z - latent_mean) / latent_std per channel, statistics measured on world
frames after training and stored with the weights, so the DiT sees roughly unit-scale latents.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from framecast.models.errors import CheckpointError, ConfigError, ShapeError

IMAGE_CHANNELS = 3
PIXEL_SHUFFLE = 2  # the decoder's last conv runs at half resolution and emits 2x2 pixel blocks


@dataclass(frozen=True)
class WorldAutoencoderConfig:
    """Sizes of the world autoencoder. Widths are conv channels at 1/2, 1/4 and 1/8 resolution (encoder) and at
    1/8, 1/4 and 1/2 resolution (decoder)."""

    latent_channels: int = 16  # the DiT's in_dim
    image_size: int = 128  # frames are image_size x image_size RGB
    encoder_widths: tuple[int, int, int] = (32, 64, 64)
    decoder_widths: tuple[int, int, int] = (64, 48, 32)

    def __post_init__(self) -> None:
        for name in ("encoder_widths", "decoder_widths"):
            value = tuple(getattr(self, name))  # lists (JSON) become tuples
            object.__setattr__(self, name, value)
            if len(value) != 3 or not all(isinstance(w, int) and w > 0 for w in value):
                raise ConfigError(f"{name}={value!r} must be three positive integers")
        if not isinstance(self.latent_channels, int) or self.latent_channels <= 0:
            raise ConfigError(f"latent_channels={self.latent_channels!r} must be a positive integer")
        if not isinstance(self.image_size, int) or self.image_size <= 0 or self.image_size % self.spatial_downscale:
            raise ConfigError(
                f"image_size={self.image_size!r} must be a positive multiple of spatial_downscale={self.spatial_downscale}"
            )

    @property
    def spatial_downscale(self) -> int:
        """Pixels per latent pixel along each axis."""
        return 8

    @property
    def frames_per_latent(self) -> int:
        """Video frames per latent frame (no temporal compression)."""
        return 1

    @property
    def latent_size(self) -> int:
        return self.image_size // self.spatial_downscale


PRESETS: dict[str, WorldAutoencoderConfig] = {
    "world-128": WorldAutoencoderConfig(),  # 0.44 M parameters (decoder 0.21 M)
    "tiny": WorldAutoencoderConfig(encoder_widths=(8, 8, 8), decoder_widths=(8, 8, 8)),
}


def preset(name: str) -> WorldAutoencoderConfig:
    """The named preset; raises ConfigError naming the valid presets."""
    if name not in PRESETS:
        raise ConfigError(f"unknown world autoencoder preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def _conv3x3(channels_in: int, channels_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1)


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv3x3(channels, channels), nn.SiLU(), _conv3x3(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.conv(x) + x)


class MemBlock(nn.Module):
    """Residual conv block that also sees its own input at the previous frame (`past`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv3x3(2 * channels, channels), nn.SiLU(), _conv3x3(channels, channels))

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        return F.silu(self.conv(torch.cat([x, past], dim=1)) + x)


class Encoder(nn.Module):
    """Frames [N, 3, S, S] in [0, 1] -> raw latents [N, C, S/8, S/8], frame by frame."""

    def __init__(self, config: WorldAutoencoderConfig) -> None:
        super().__init__()
        w0, w1, w2 = config.encoder_widths
        self.layers = nn.Sequential(
            nn.PixelUnshuffle(PIXEL_SHUFFLE),  # (N, 12, S/2, S/2): no conv at full resolution
            _conv3x3(IMAGE_CHANNELS * PIXEL_SHUFFLE**2, w0), nn.SiLU(), ResBlock(w0),
            _conv3x3(w0, w1, stride=2), nn.SiLU(), ResBlock(w1),
            _conv3x3(w1, w2, stride=2), nn.SiLU(), ResBlock(w2),
            _conv3x3(w2, config.latent_channels),
        )

    def forward(self, frames: Tensor) -> Tensor:
        return self.layers(frames * 2 - 1)


class Decoder(nn.Module):
    """Raw latents [B, T, C, s, s] -> frames [B, T, 3, 8s, 8s] (about [0, 1], not clamped), one frame per latent."""

    def __init__(self, config: WorldAutoencoderConfig) -> None:
        super().__init__()
        d0, d1, d2 = config.decoder_widths
        self.stem = nn.Sequential(_conv3x3(config.latent_channels, d0), nn.SiLU())
        self.memory = MemBlock(d0)
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), _conv3x3(d0, d1), nn.SiLU(), ResBlock(d1),
            nn.Upsample(scale_factor=2, mode="nearest"), _conv3x3(d1, d2), nn.SiLU(),
            _conv3x3(d2, IMAGE_CHANNELS * PIXEL_SHUFFLE**2), nn.PixelShuffle(PIXEL_SHUFFLE),
        )

    def forward(self, latents: Tensor, past: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Decode a chunk. `past`: the MemBlock input at the frame before the chunk [B, d0, s, s] (None: stream
        start, zeros). Returns the frames and the MemBlock input at the chunk's last frame (the next chunk's `past`)."""
        batch, frames = latents.shape[:2]
        x = self.stem(latents.flatten(0, 1)).unflatten(0, (batch, frames))  # (B, T, d0, s, s)
        first = torch.zeros_like(x[:, :1]) if past is None else past.unsqueeze(1).to(x.dtype)
        previous = torch.cat([first, x[:, :-1]], dim=1)  # each frame's input one frame earlier
        mixed = self.memory(x.flatten(0, 1), previous.flatten(0, 1))
        video = self.up(mixed)  # (B*T, 3, 8s, 8s)
        return video.unflatten(0, (batch, frames)), x[:, -1]


class WorldAutoencoder(nn.Module):
    """Encoder, decoder and the latent statistics (buffers, saved with the weights)."""

    def __init__(self, config: WorldAutoencoderConfig = WorldAutoencoderConfig()) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.register_buffer("latent_mean", torch.zeros(config.latent_channels))
        self.register_buffer("latent_std", torch.ones(config.latent_channels))
        self._init_weights()

    def _init_weights(self) -> None:
        # PyTorch's default conv init shrinks activations ~3x per layer; with no norm layers that stalls training
        # (grey, colourless reconstructions), so use He init, and start every residual branch at zero (identity)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, (ResBlock, MemBlock)):
                nn.init.zeros_(module.conv[-1].weight)

    def check_frames(self, frames: Tensor) -> None:
        size = self.config.image_size
        if frames.ndim != 5 or tuple(frames.shape[2:]) != (IMAGE_CHANNELS, size, size):
            raise ShapeError(f"frames have shape {tuple(frames.shape)}; expected [B, T, 3, {size}, {size}]")

    def check_latents(self, latents: Tensor) -> None:
        config = self.config
        want = (config.latent_channels, config.latent_size, config.latent_size)
        if latents.ndim != 5 or tuple(latents.shape[2:]) != want:
            raise ShapeError(f"latents have shape {tuple(latents.shape)}; expected [B, F, {', '.join(map(str, want))}]")

    def encode_raw(self, frames: Tensor) -> Tensor:
        """frames [B, T, 3, S, S] float in [0, 1] -> raw (unnormalised) latents [B, T, C, S/8, S/8]."""
        self.check_frames(frames)
        return self.encoder(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])

    def normalise(self, raw: Tensor) -> Tensor:
        return (raw - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def denormalise(self, latents: Tensor) -> Tensor:
        return latents * self.latent_std[:, None, None] + self.latent_mean[:, None, None]

    def encode(self, frames: Tensor) -> Tensor:
        """frames [B, T, 3, S, S] float in [0, 1] -> normalised latents [B, T, C, S/8, S/8]."""
        return self.normalise(self.encode_raw(frames))

    def decode(self, latents: Tensor, past: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Normalised latents [B, F, C, s, s] -> (frames [B, F, 3, 8s, 8s] about [0, 1], carried state)."""
        self.check_latents(latents)
        return self.decoder(self.denormalise(latents), past)

    def forward(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruct a clip from its first frame (no carried state): (frames, raw latents). Any size that is a
        multiple of 8 works here (training uses crops); `encode` and `decode` check for the configured size."""
        if frames.ndim != 5 or frames.shape[2] != IMAGE_CHANNELS or frames.shape[-1] % 8 or frames.shape[-2] % 8:
            raise ShapeError(f"frames have shape {tuple(frames.shape)}; expected [B, T, 3, H, W], H and W multiples of 8")
        raw = self.encoder(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])
        return self.decoder(raw)[0], raw


def frames_to_tensor(frames) -> Tensor:
    """uint8 frames [..., H, W, 3] (numpy or tensor) -> float32 [..., 3, H, W] in [0, 1]."""
    return torch.as_tensor(frames).movedim(-1, -3).float() / 255


def tensor_to_frames(video: Tensor) -> Tensor:
    """float [..., 3, H, W] about [0, 1] -> uint8 [..., H, W, 3] on the CPU, clamped and rounded."""
    return (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).cpu()


class WorldDecoder:
    """Our decoder interface over the world autoencoder: streaming, one video frame per latent frame.

    `decode` carries the decoder's only state (the MemBlock input at the last frame) into the next call, so decoding
    a stream chunk by chunk equals decoding it in one call; `reset` starts a new stream.
    """

    frames_per_latent = 1  # video frames per latent frame (the deadline scheduler's frame accounting)
    first_latent_frames = 1

    def __init__(self, model: WorldAutoencoder, dtype: torch.dtype = torch.float32) -> None:
        if dtype not in (torch.float32, torch.bfloat16, torch.float64):
            raise ConfigError(f"dtype={dtype} must be float32, bfloat16 or float64 (float16 is very slow on CPUs)")
        self.model = model.to(dtype).eval()
        self.dtype = dtype
        self._past: Tensor | None = None

    def reset(self) -> None:
        self._past = None

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, F, C, H, W] -> uint8 frames [B, F, 8H, 8W, 3] on the CPU.

        Raises:
            ShapeError: latents of the wrong rank or size, or a batch or size that differs from the stream's.
        """
        self.model.check_latents(latents)
        if self._past is not None and self._past.shape[0] != latents.shape[0]:
            raise ShapeError(f"latents have batch {latents.shape[0]}; this stream has batch {self._past.shape[0]}")
        video, self._past = self.model.decode(latents.to(self.dtype), self._past)
        return tensor_to_frames(video)


def save_autoencoder(model: WorldAutoencoder, path: str | os.PathLike) -> None:
    """Weights and latent statistics as safetensors; the config rides in the file's metadata."""
    from safetensors.torch import save_file

    state = {key: value.detach().float().contiguous().cpu() for key, value in model.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(asdict(model.config))})


def load_autoencoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> WorldAutoencoder:
    """A model from a `save_autoencoder` file.

    Raises:
        CheckpointError: no config in the metadata, or missing, unexpected or mis-shaped keys (all listed).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "config" not in metadata:
        raise CheckpointError(f"{path}: no 'config' in the safetensors metadata; not a world autoencoder file")
    model = WorldAutoencoder(WorldAutoencoderConfig(**json.loads(metadata["config"])))
    state = load_file(str(path))
    want = model.state_dict()
    problems = [f"missing {key!r}" for key in want if key not in state]
    problems += [f"unexpected {key!r}" for key in state if key not in want]
    problems += [
        f"{key!r} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}"
        for key, value in want.items() if key in state and state[key].shape != value.shape
    ]
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    model.load_state_dict(state)
    return model.to(dtype).eval()
