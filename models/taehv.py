"""TAEHV: the tiny autoencoder decoder for Wan 2.1 latents (madebyollin/taehv, `taew2_1.pth` layout), streaming.

The decoder is a stack of 2-D convolutions applied to every latent frame, plus two kinds of temporal layer:

* `MemBlock`: mixes each frame with this block's input at the previous frame (zeros before the first frame);
* `TGrow`: a 1x1 conv that makes `stride` output frames from each input frame (strides (1, 2, 2): 4 frames per latent).

Module and parameter names (`decoder.{1,3,...,22}.*`) are those of the reference, so `taew2_1.pth` loads directly.

Frame counts. The network turns T latent frames into 4T raw frames (`OutputMode.RAW`, what Self-Forcing's copy of
`decode_video` returns, not clamped). Upstream's `decode_video` drops the first `frames_to_trim = 3` of them and clamps
to [0, 1] (`OutputMode.UPSTREAM`): 4T - 3 = 1 + 4(T - 1) frames, the same count as the Wan VAE rule, and aligned
with it. When streaming, only the first chunk of a stream loses those 3 frames: a first chunk of T latents gives
1 + 4(T - 1) frames, every later chunk of T latents gives 4T, so the concatenated stream equals one-shot decoding.

Streaming is exact: `TAEHVStream` carries each MemBlock's input at the last frame of a chunk into the next chunk (the
only state the network has), so any chunking, one latent at a time included, gives the one-shot result. This is NOT
what the Self-Forcing demo does: it re-decodes the previous 3-latent block with zero memory as warm-up context and
drops its frames, which is an approximation (2.6e-2 off by its third chunk on the parity fixture).
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from framecast.models.errors import CheckpointError, ConfigError, ShapeError
from framecast.models.loading import check_fits

# Indices in `decoder` (the reference's nn.Sequential) of the layers that carry weights, stage by stage.
_FIRST_CONV = 1
_FIRST_MEMBLOCK = 3  # runs at latent resolution: its carried frame tells the stream's batch and latent size
_TGROWS = (7, 13, 19)
_STAGE_CONVS = (8, 14, 20)  # 3x3 conv after each TGrow: widths[i] -> widths[i + 1], no bias
_LAST_CONV = 22
_ENCODER_PREFIX = "encoder."  # taew2_1.pth also holds the encoder; FrameCast only decodes


@dataclass(frozen=True)
class TAEHVConfig:
    """Sizes of a TAEHV decoder. `widths`: channels of the three stages and of the final conv input."""

    widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    latent_channels: int = 16
    image_channels: int = 3
    tgrow_strides: tuple[int, int, int] = (1, 2, 2)  # output frames per input frame of each TGrow
    frames_to_trim: int = 3  # upstream drops the first t_upscale - 1 frames so output aligns with the Wan VAE

    def __post_init__(self) -> None:
        for name in ("widths", "tgrow_strides"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # lists (JSON, fixtures) become tuples
        if len(self.widths) != 4 or not all(isinstance(w, int) and w > 0 for w in self.widths):
            raise ConfigError(f"widths={self.widths!r} must be four positive integers")
        if len(self.tgrow_strides) != 3 or not all(isinstance(s, int) and s > 0 for s in self.tgrow_strides):
            raise ConfigError(f"tgrow_strides={self.tgrow_strides!r} must be three positive integers")
        for name in ("latent_channels", "image_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.frames_to_trim, int) or not 0 <= self.frames_to_trim < self.t_upscale:
            raise ConfigError(f"frames_to_trim={self.frames_to_trim!r} must be in [0, t_upscale={self.t_upscale})")

    @property
    def t_upscale(self) -> int:
        """Output frames per latent frame."""
        return math.prod(self.tgrow_strides)

    @property
    def spatial_upscale(self) -> int:
        """Output pixels per latent pixel along each axis (one 2x upsample per stage)."""
        return 2 ** len(self.tgrow_strides)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], **overrides: object) -> TAEHVConfig:
        """Widths, latent and image channels read from the weight shapes; other fields default (or `overrides`).

        Raises:
            CheckpointError: a weight needed for the shapes is missing or not a 4-D conv weight.
        """
        def shape(key: str) -> tuple[int, ...]:
            if key not in state:
                raise CheckpointError(f"{key!r} is missing; it is needed to infer the TAEHV widths")
            if state[key].ndim != 4:
                raise CheckpointError(f"{key!r} has shape {tuple(state[key].shape)}, expected a 4-D conv weight")
            return tuple(state[key].shape)

        first = shape(f"decoder.{_FIRST_CONV}.weight")  # [widths[0], latent_channels, 3, 3]
        widths = (first[0], *(shape(f"decoder.{i}.weight")[0] for i in _STAGE_CONVS))
        sizes = dict(widths=widths, latent_channels=first[1], image_channels=shape(f"decoder.{_LAST_CONV}.weight")[0])
        return cls(**{**sizes, **overrides})


PRESETS: dict[str, TAEHVConfig] = {
    "taew2_1": TAEHVConfig(),  # 9.8 M parameters
    "tiny": TAEHVConfig(widths=(32, 24, 16, 8)),  # the parity fixture's widths
}


def preset(name: str) -> TAEHVConfig:
    """The named preset; raises ConfigError naming the valid presets."""
    if name not in PRESETS:
        raise ConfigError(f"unknown TAEHV preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


class OutputMode(enum.Enum):
    RAW = "raw"  # every decoded frame, not clamped (Self-Forcing's decode_video; its demo then maps to [-1, 1])
    UPSTREAM = "upstream"  # madebyollin/taehv decode_video: first frames_to_trim frames dropped, clamped to [0, 1]


def _conv3x3(channels_in: int, channels_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """Squash latents smoothly into (-3, 3)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual conv block that also sees its own input at the previous frame (`past`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv3x3(2 * channels, channels), nn.ReLU(), _conv3x3(channels, channels), nn.ReLU(),
            _conv3x3(channels, channels),
        )
        self.act = nn.ReLU()

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        return self.act(self.conv(torch.cat([x, past], dim=1)) + x)


class TGrow(nn.Module):
    """1x1 conv making `stride` frames of each frame: output channels [j*c, (j+1)*c) become frame t*stride + j."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        frames, channels, height, width = x.shape  # frames = B*T, batch-major
        return self.conv(x).reshape(frames * self.stride, channels, height, width)  # (B*T*stride, C, H, W)


class TAEHVMemory:
    """What a stream carries between chunks: each MemBlock's input at the last frame decoded (None: none yet)."""

    def __init__(self) -> None:
        self.previous: dict[int, Tensor] = {}

    def reset(self) -> None:
        self.previous.clear()

    def past_frames(self, index: int, x: Tensor) -> Tensor:
        """The previous frame of every frame in `x` (B, T, C, H, W) for MemBlock `index`; remembers x's last frame."""
        previous = self.previous.get(index)
        if previous is None:
            previous = torch.zeros_like(x[:, :1])  # empty memory at the start of a stream
        self.previous[index] = x[:, -1:].clone()  # a copy, so the whole chunk's activations can be freed
        return torch.cat([previous, x[:, :-1]], dim=1)


class TAEHV(nn.Module):
    """The TAEHV decoder network (`decoder` has the reference's layout and indices)."""

    def __init__(self, config: TAEHVConfig = TAEHVConfig()) -> None:
        super().__init__()
        self.config = config
        widths, strides = config.widths, config.tgrow_strides
        layers: list[nn.Module] = [SoftClamp(), _conv3x3(config.latent_channels, widths[0]), nn.ReLU()]
        for stage, stride in enumerate(strides):
            width = widths[stage]
            layers += [MemBlock(width), MemBlock(width), MemBlock(width), nn.Upsample(scale_factor=2)]
            layers += [TGrow(width, stride), _conv3x3(width, widths[stage + 1], bias=False)]
        layers += [nn.ReLU(), _conv3x3(widths[3], config.image_channels)]
        self.decoder = nn.Sequential(*layers)

    def check_latents(self, latents: Tensor) -> None:
        """Raises ShapeError unless latents are [B, F >= 1, latent_channels, H, W] floats."""
        expected = f"[B, F, {self.config.latent_channels}, H, W]"
        if latents.ndim != 5 or latents.shape[2] != self.config.latent_channels:
            raise ShapeError(f"latents have shape {tuple(latents.shape)}; expected {expected}")
        if latents.shape[1] == 0 or not latents.is_floating_point():
            raise ShapeError(f"latents have shape {tuple(latents.shape)}, dtype {latents.dtype}; expected {expected}, "
                             f"F >= 1, floating point")

    def decode_chunk(self, latents: Tensor, memory: TAEHVMemory) -> Tensor:
        """Raw frames of a chunk, parallel over its frames; `memory` carries MemBlock inputs across chunks.

        latents [B, T, C, H, W] -> [B, T * t_upscale, image_channels, H * 8, W * 8], not clamped.
        """
        self.check_latents(latents)
        batch = latents.shape[0]
        x = latents.flatten(0, 1)  # (B*T, C, H, W), batch-major
        for index, layer in enumerate(self.decoder):
            if isinstance(layer, MemBlock):
                frames = x.unflatten(0, (batch, -1))  # (B, T', C, H, W)
                x = layer(x, memory.past_frames(index, frames).flatten(0, 1))
            else:
                x = layer(x)
        return x.unflatten(0, (batch, -1))  # (B, T*t_upscale, 3, H', W')

    def decode_video(self, latents: Tensor, mode: OutputMode = OutputMode.RAW) -> Tensor:
        """One-shot decode of a whole sequence [B, T, C, H, W] -> frames [B, F', 3, H', W'] (see OutputMode).

        Differentiable, unlike TAEHVStream.decode. Raises ShapeError for latents of the wrong shape.
        """
        frames = self.decode_chunk(latents, TAEHVMemory())
        if mode is OutputMode.RAW:
            return frames
        return frames[:, self.config.frames_to_trim:].clamp(0, 1)


class TAEHVStream:
    """Exact streaming decode: chunks of a stream, decoded in turn, concatenate to the one-shot result."""

    def __init__(self, model: TAEHV, mode: OutputMode = OutputMode.UPSTREAM) -> None:
        self.model, self.mode = model, mode
        self.memory = TAEHVMemory()
        self._frames_to_trim = self._stream_trim()

    def _stream_trim(self) -> int:
        return self.model.config.frames_to_trim if self.mode is OutputMode.UPSTREAM else 0

    def reset(self) -> None:
        """Start a new stream."""
        self.memory.reset()
        self._frames_to_trim = self._stream_trim()

    @torch.no_grad()  # the carried memory must not hold autograd graphs of past chunks
    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, T, C, H, W] -> frames [B, F', 3, H*8, W*8] in the model's dtype.

        RAW: F' = 4T, not clamped. UPSTREAM: clamped to [0, 1]; F' = 1 + 4(T - 1) on the first chunk of a stream
        (its first frames_to_trim frames are dropped), 4T after (4 = t_upscale, 3 = frames_to_trim for taew2_1).

        Raises:
            ShapeError: latents of the wrong shape, or whose batch or latent size differ from the stream's so far.
        """
        carried = self._carried_size()
        if carried is not None and latents.ndim == 5 and (latents.shape[0], *latents.shape[3:]) != carried:
            raise ShapeError(f"latents have shape {tuple(latents.shape)}; this stream carries batch {carried[0]} "
                             f"at latent size {carried[1]}x{carried[2]} (call reset() to start a new stream)")
        frames = self.model.decode_chunk(latents, self.memory)
        if self.mode is OutputMode.RAW:
            return frames
        trimmed = frames[:, self._frames_to_trim:]
        self._frames_to_trim = max(0, self._frames_to_trim - frames.shape[1])
        return trimmed.clamp(0, 1)

    def _carried_size(self) -> tuple[int, int, int] | None:
        """(batch, latent height, latent width) of the stream in progress; None before its first chunk."""
        first = self.memory.previous.get(_FIRST_MEMBLOCK)
        return None if first is None else (first.shape[0], *first.shape[3:])


class TAEHVDecoder:
    """Our decoder interface over TAEHV: latents to uint8 RGB frames, streaming with the MemBlock state carried."""

    def __init__(self, model: TAEHV) -> None:
        self.model = model
        self.channels = model.config.latent_channels
        self._stream = TAEHVStream(model, OutputMode.UPSTREAM)

    def reset(self) -> None:
        self._stream.reset()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, F, C, H, W] -> uint8 frames [B, F', 8H, 8W, 3] on the CPU.

        F' = 1 + 4(F - 1) on the first chunk after construction or reset() (the Wan VAE rule), 4F after.

        Raises:
            ShapeError: see TAEHVStream.decode.
        """
        parameter = next(self.model.parameters())
        self.model.check_latents(latents)
        frames = self._stream.decode(latents.detach().to(parameter.device, parameter.dtype))
        return (frames * 255).round().to(torch.uint8).cpu().permute(0, 1, 3, 4, 2)  # (B, F', H', W', 3)


def _adapt_tgrow_weights(state: Mapping[str, Tensor], config: TAEHVConfig) -> dict[str, Tensor]:
    """Drop encoder weights; trim TGrow weights trained with a larger stride to the configured one.

    A checkpoint TGrow of stride k > s keeps its last s*c output channels (its last output frames), as upstream's
    `patch_tgrow_layers` does when temporal upsampling is disabled.
    """
    state = {key: value for key, value in state.items() if not key.startswith(_ENCODER_PREFIX)}
    for index, stage in zip(_TGROWS, range(3)):
        key, rows = f"decoder.{index}.conv.weight", config.widths[stage] * config.tgrow_strides[stage]
        weight = state.get(key)
        if weight is not None and weight.ndim == 4 and weight.shape[0] > rows and weight.shape[0] % rows == 0:
            state[key] = weight[-rows:]
    return state


def check_state_dict(model: TAEHV, state: Mapping[str, Tensor], source: str = "state dict") -> None:
    """Raises one CheckpointError listing every missing, unexpected and mis-shaped key, or returns None."""
    check_fits(model, state, source, f"TAEHV {model.config}")


def load_taehv(source: str | os.PathLike | Mapping[str, Tensor], config: TAEHVConfig | None = None,
               dtype: torch.dtype | None = None) -> TAEHV:
    """A TAEHV decoder from `taew2_1.pth` (a path) or a state dict with reference key names.

    `config`: None infers widths and channels from the weights (strides and trim take the taew2_1 defaults).
    `dtype`: None keeps the checkpoint's dtype.

    Raises:
        CheckpointError: the file is missing or unreadable, or keys are missing, unexpected or mis-shaped (all listed).
    """
    name = str(source) if isinstance(source, (str, os.PathLike)) else "state dict"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint file")
        try:
            source = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file; one CheckpointError names the path
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    state = {key.removeprefix("_orig_mod."): value for key, value in source.items()}  # torch.compile wrapper
    config = config or TAEHVConfig.from_state_dict(state)
    state = _adapt_tgrow_weights(state, config)
    model = TAEHV(config)
    check_state_dict(model, state, name)
    model.load_state_dict(state)
    return model.to(dtype or state[f"decoder.{_FIRST_CONV}.weight"].dtype).eval()

