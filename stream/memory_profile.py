"""Memory profiles: what one stream holds on its device, estimated from the configs, and named setups that fit a budget.

    profile_by_name("24gb")                      -> MemoryProfile (printable, frozen)
    profile_by_name("24gb").estimate().describe() -> a table of every term, in bytes, and whether it fits 24 GiB
    generate_settings(profile_by_name("24gb"))   -> the `framecast generate` settings the profile stands for

An estimate is a list of named terms. *Held* terms stay on the device for the whole stream: weights, the KV cache,
the prompt's cross-attention K/V, the latent history kept for a recache, the decoder's streaming cache. *Transient*
terms live only during one call: a DiT forward, a decode, a prompt encode. Calls run one after another in one
process, so the peak is the held sum plus the largest transient. Weights and caches are exact (the tests compare
them byte for byte with real models after streaming); activations are estimates:

* the DiT forward: a per-token formula derived from `Block.forward` (see `dit_activation_bytes`); at small sizes on
  the CPU it equals the tensors PyTorch allocates (`TensorAccounting`), the tests allow 5 %;
* a decode and a prompt encode: the real decoder / umT5 code traced on the meta device at the profile's size
  (no memory, no compute), counting the tensors it would allocate.

Not counted: kernel workspaces (cuDNN, SDPA), the CUDA context (~0.3-0.5 GiB outside PyTorch's allocator) and the
caching allocator's rounding and fragmentation; `fits` keeps a margin for them.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from framecast.models.config import AttentionKind, DiTConfig, preset
from framecast.models.dit import parameter_count
from framecast.models.errors import ConfigError
from framecast.models.taehv import TAEHV, TAEHVConfig, TAEHVStream
from framecast.models.taehv import preset as taehv_preset
from framecast.models.umt5 import UMT5_PRESETS, Placement, UMT5Config, UMT5Encoder, zero_padding_rows
from framecast.models.vae import VAE_PRESETS, CausalConv3d, ResidualBlock, Upsample, VAEConfig, WanVAE, WanVAEStream
from framecast.stream.engine import CacheKind, EngineConfig
from framecast.stream.families import family

GiB = 2**30
VAE_SPATIAL = 8  # pixels per latent along height and width (Wan VAE and TAEHV alike)
PROFILE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TEXT_ENCODER_DTYPE = torch.bfloat16  # `generate` loads umT5 in bf16 whatever the DiT's dtype


class DecoderKind(enum.Enum):
    WAN_VAE = "wan-vae"  # the full Wan2.1 VAE decoder (73.3M parameters)
    TAEHV = "taehv"  # the tiny TAEHV decoder (9.8M parameters)


# ---------------------------------------------------------------------------------------------------------------------
# Counting the tensors a piece of code allocates


class TensorAccounting(TorchDispatchMode):
    """Counts the bytes of tensor storages allocated inside the `with` block that are alive at once (`peak_bytes`).

    Every op's outputs are looked at; a storage that is none of the op's inputs' (not a view, not in place) is new
    and counted until it is freed. Storages that existed before the block (weights, caches) are not counted. Works on
    any device, the meta device included; kernel-internal workspaces are invisible to it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._live:
                continue
            self._live.add(key)
            self.live_bytes += storage.nbytes()
            weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# The terms


def dit_weight_bytes(config: DiTConfig, dtype: torch.dtype) -> int:
    """Parameters (counted on the meta device) x bytes per value; the DiT has no buffers."""
    return parameter_count(config) * dtype.itemsize


def memory_bytes(config: DiTConfig, engine: EngineConfig, dtype: torch.dtype) -> int:
    """What `make_memory` allocates: the KV cache, or the linear-attention state (`Memory.nbytes`)."""
    batch, layers, heads, head_dim = engine.batch, config.num_layers, config.num_heads, config.head_dim
    if config.attention is AttentionKind.LINEAR:
        compute = 8 if dtype == torch.float64 else 4  # the state is summed in float32 at least
        per_layer = heads * head_dim * head_dim + heads * head_dim  # phi(k)^T v and the normalizer
        return (2 * layers + 1) * batch * per_layer * compute  # running and pending per layer, one empty of each
    tokens = config.tokens_per_frame(engine.latent_height, engine.latent_width)
    per_frame = layers * batch * tokens * heads * head_dim * dtype.itemsize  # keys or values of one frame
    rolling_sinks = engine.sinks_follow_window and engine.sink_frames > 0 and engine.cache is CacheKind.ROLLING
    return 2 * engine.window_frames * per_frame + (engine.sink_frames * per_frame if rolling_sinks else 0)


def text_context_bytes(config: DiTConfig, engine: EngineConfig, dtype: torch.dtype) -> int:
    """The prompt's cross-attention K and V of every layer (`TextContext`), computed once per prompt."""
    return 2 * config.num_layers * engine.batch * config.text_len * config.dim * dtype.itemsize


def latent_history_bytes(config: DiTConfig, engine: EngineConfig, dtype: torch.dtype) -> int:
    """The engine's ring of the newest clean latents and their action ids (int64), re-encoded on a recache."""
    frames = engine.batch * engine.window_frames
    return frames * config.in_dim * engine.latent_height * engine.latent_width * dtype.itemsize + frames * 8


def dit_activation_bytes(config: DiTConfig, engine: EngineConfig, dtype: torch.dtype) -> int:
    """Peak of the tensors one chunk's DiT forward allocates, from L = batch x chunk tokens, D = dim, F = ffn_dim.

    Derived from `Block.forward`, a = bytes of the dtype, c = bytes of the float32 (float64) compute of norms/RoPE:
    * FFN: 5 L*D*a live across it (the block input the caller holds, the patch embedding `forward` holds, the running
      residual, the self-attention output `y` kept until the FFN, the modulated FFN input) + 2 L*F*a (the first
      linear's output and its GELU);
    * self-attention, at the RoPE of k: 4 L*D*a (block input, embedding, modulated input, rotated q) + the normed k
      and its rotation temporaries, L*D*(a + 3c) when RoPE runs in a wider dtype than the model, L*D*3c otherwise;
      later q, k, v, the attention output and its projection (8 L*D*a) coexist with the held ones;
    * the memoised RoPE table of the chunk: cos and sin, (L / batch) * head_dim * c;
    * per latent frame in flight, 13 D*a: the time embedding (1), its 6-way projection (6) and a block's
      modulation plus it (6).
    The peak is the larger phase plus the table and the per-frame terms; the Wan 1.3B peaks in the FFN (F = 5.8 D).
    Softmax attention through the KV cache (SDPA's fused kernels keep no score matrix); linear attention's float32
    state updates are not modelled.
    """
    chunk_tokens = engine.chunk_frames * config.tokens_per_frame(engine.latent_height, engine.latent_width)
    tokens = engine.batch * chunk_tokens
    a = dtype.itemsize
    c = 8 if dtype == torch.float64 else 4
    ffn = (5 * config.dim + 2 * config.ffn_dim) * a
    rope_widened = a + 3 * c if a != c else 3 * c
    attention = config.dim * max(4 * a + rope_widened, 8 * a)
    frames = engine.batch * engine.chunk_frames
    rope_table = chunk_tokens * config.head_dim * c  # shared by the batch
    return tokens * max(ffn, attention) + rope_table + frames * 13 * config.dim * a


def decoder_weight_bytes(decoder: VAEConfig | TAEHVConfig, dtype: torch.dtype) -> int:
    """Parameters of the decoder `generate` builds (the Wan VAE without its encoder, or TAEHV) x bytes per value."""
    with torch.device("meta"):
        model = WanVAE(decoder) if isinstance(decoder, VAEConfig) else TAEHV(decoder)
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def decoder_cache_bytes(decoder: VAEConfig | TAEHVConfig, engine: EngineConfig, dtype: torch.dtype) -> int:
    """The decoder's streaming state once a stream has run two latent frames or more.

    Wan VAE: every causal conv with a time kernel of k keeps its last k - 1 input frames (2 for 3-tap convs), at its
    own resolution and width. TAEHV: every MemBlock keeps its input at the last frame (3 blocks per stage).
    """
    batch, height, width = engine.batch, engine.latent_height, engine.latent_width
    if isinstance(decoder, TAEHVConfig):
        return sum(3 * batch * decoder.widths[stage] * (height << stage) * (width << stage) * dtype.itemsize
                   for stage in range(len(decoder.tgrow_strides)))
    with torch.device("meta"):
        model = WanVAE(decoder).decoder
    total = 0

    def kept(conv: CausalConv3d) -> int:
        return batch * conv.in_channels * conv.context_frames * height * width * dtype.itemsize

    for layer in (model.conv1, *model.middle, *model.upsamples, model.head[2]):
        if isinstance(layer, CausalConv3d):
            total += kept(layer)
        elif isinstance(layer, ResidualBlock):
            total += sum(kept(m) for m in layer.modules() if isinstance(m, CausalConv3d))
        elif isinstance(layer, Upsample):
            total += kept(layer.time_conv) if layer.time_conv is not None else 0  # before its 2x resample
            height, width = 2 * height, 2 * width
    return total


@functools.lru_cache(maxsize=16)
def decode_activation_bytes(decoder: VAEConfig | TAEHVConfig, engine: EngineConfig, dtype: torch.dtype) -> int:
    """Peak of the tensors one chunk's decode allocates in a running stream, traced on the meta device.

    The stream's first chunk is decoded untraced (it fills the caches); the second is traced. Not traced: the
    decoder interface's final uint8 conversion (a few frame-sized tensors).
    """
    batch, frames, height, width = engine.batch, engine.chunk_frames, engine.latent_height, engine.latent_width
    with torch.device("meta"), torch.inference_mode():
        if isinstance(decoder, TAEHVConfig):
            decode = TAEHVStream(TAEHV(decoder).to(dtype)).decode
            latents = torch.zeros(batch, frames, decoder.latent_channels, height, width, dtype=dtype)
        else:
            decode = WanVAEStream(WanVAE(decoder).to(dtype)).decode
            latents = torch.zeros(batch, decoder.z_dim, frames, height, width, dtype=dtype)  # (B, C, F, H, W)
        decode(latents)
        with TensorAccounting() as accounting:
            decode(latents)
    return accounting.peak_bytes


def text_encoder_weight_bytes(config: UMT5Config) -> int:
    with torch.device("meta"):
        model = UMT5Encoder(config)
    return sum(p.numel() for p in model.parameters()) * TEXT_ENCODER_DTYPE.itemsize


@functools.lru_cache(maxsize=8)
def encode_activation_bytes(config: UMT5Config, batch: int = 1) -> int:
    """Peak of the tensors one prompt encode allocates (`text_len` tokens), traced on the meta device."""
    with torch.device("meta"), torch.inference_mode():
        encoder = UMT5Encoder(config).to(TEXT_ENCODER_DTYPE)
        ids = torch.zeros(batch, config.text_len, dtype=torch.long)
        mask = torch.ones(batch, config.text_len, dtype=torch.long)
        with TensorAccounting() as accounting:
            zero_padding_rows(encoder(ids, mask), mask)
    return accounting.peak_bytes


# ---------------------------------------------------------------------------------------------------------------------
# Estimates


@dataclass(frozen=True)
class MemoryTerm:
    name: str
    bytes: int
    held: bool  # on the device for the whole stream; False: only during one call
    detail: str = ""


@dataclass(frozen=True)
class MemoryEstimate:
    """Named terms in bytes; `peak_bytes` = held terms + the largest transient one."""

    title: str
    terms: tuple[MemoryTerm, ...]

    @property
    def held_bytes(self) -> int:
        return sum(t.bytes for t in self.terms if t.held)

    @property
    def largest_transient(self) -> MemoryTerm | None:
        transients = [t for t in self.terms if not t.held]
        return max(transients, key=lambda t: t.bytes) if transients else None

    @property
    def peak_bytes(self) -> int:
        largest = self.largest_transient
        return self.held_bytes + (largest.bytes if largest else 0)

    def term(self, name: str) -> MemoryTerm:
        for term in self.terms:
            if term.name == name:
                return term
        raise KeyError(f"no term {name!r}; terms: {[t.name for t in self.terms]}")

    def fits(self, budget_bytes: int, margin: float = 0.10) -> bool:
        """True when the peak fits in `budget_bytes` less `margin` (a fraction kept for what is not counted:
        the CUDA context, kernel workspaces, allocator rounding and fragmentation)."""
        if not 0 <= margin < 1:
            raise ConfigError(f"margin={margin!r} must be a fraction in [0, 1)")
        return self.peak_bytes <= budget_bytes * (1 - margin)

    def describe(self, budget_bytes: int | None = None, margin: float = 0.10) -> str:
        """A Markdown table of every term, the peak, and (with a budget) whether it fits."""
        rows = [(t.name, "held" if t.held else "per call", f"{t.bytes / GiB:.3f}", f"{t.bytes:,}", t.detail)
                for t in self.terms]
        largest = self.largest_transient
        rows.append(("held total", "", f"{self.held_bytes / GiB:.3f}", f"{self.held_bytes:,}", ""))
        rows.append(("**peak**", "", f"**{self.peak_bytes / GiB:.3f}**", f"{self.peak_bytes:,}",
                     f"held + {largest.name}" if largest else "held"))
        header = ("term", "when", "GiB", "bytes", "what")
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in (header, *rows)]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        out = [self.title, "", *lines]
        if budget_bytes is not None:
            verdict = "fits" if self.fits(budget_bytes, margin) else "does NOT fit"
            out += ["", f"{verdict} {budget_bytes / GiB:g} GiB with a {margin:.0%} margin "
                        f"(peak {self.peak_bytes / GiB:.2f} GiB of {budget_bytes * (1 - margin) / GiB:.2f} GiB usable)"]
        return "\n".join(out)


@dataclass(frozen=True)
class StreamSetup:
    """Everything one stream puts on its device, as configs: what the estimator reads (tests build tiny ones)."""

    dit: DiTConfig
    engine: EngineConfig
    dtype: torch.dtype  # the DiT's, its caches' and the decoder's
    decoder: VAEConfig | TAEHVConfig
    text_encoder: UMT5Config | None = None  # None: precomputed prompt embeddings, no encoder
    text_encoder_placement: Placement = Placement.OFFLOAD

    def __post_init__(self) -> None:
        if self.engine.rolling_chunks > 1 or self.engine.stream_batch:
            raise ConfigError("the memory estimate covers the chunk sampler only (rolling_chunks=1, stream_batch=False); "
                              "the rolling-window and stream-batch samplers keep more memory")
        if not isinstance(self.text_encoder_placement, Placement):
            raise ConfigError(f"text_encoder_placement={self.text_encoder_placement!r} must be one of "
                              f"{[p.value for p in Placement]}")

    def estimate(self, title: str = "memory estimate") -> MemoryEstimate:
        dit, engine, dtype = self.dit, self.engine, self.dtype
        tokens = dit.tokens_per_frame(engine.latent_height, engine.latent_width)
        memory_what = ("linear-attention state" if dit.attention is AttentionKind.LINEAR else
                       f"{engine.window_frames} frames x {tokens} tokens x {dit.num_layers} layers, K and V"
                       + (" + the sinks' own keys" if engine.sinks_follow_window and engine.sink_frames else ""))
        decoder = "Wan VAE" if isinstance(self.decoder, VAEConfig) else "TAEHV"
        decoder_weights = decoder_weight_bytes(self.decoder, dtype)
        terms = [
            MemoryTerm("DiT weights", dit_weight_bytes(dit, dtype), True,
                       f"{parameter_count(dit):,} params x {dtype.itemsize} B"),
            MemoryTerm("KV cache", memory_bytes(dit, engine, dtype), True, memory_what),
            MemoryTerm("text cross-attention K/V", text_context_bytes(dit, engine, dtype), True,
                       f"{dit.text_len} tokens x {dit.num_layers} layers"),
            MemoryTerm("latent history", latent_history_bytes(dit, engine, dtype), True,
                       f"{engine.window_frames} clean latent frames for a recache"),
            MemoryTerm(f"{decoder} weights", decoder_weights, True,
                       f"{decoder_weights // dtype.itemsize:,} params x {dtype.itemsize} B"),
            MemoryTerm(f"{decoder} streaming cache", decoder_cache_bytes(self.decoder, engine, dtype), True,
                       "last input frames of each causal conv" if decoder == "Wan VAE" else
                       "last input frame of each MemBlock"),
            MemoryTerm("DiT call activations", dit_activation_bytes(dit, engine, dtype), False,
                       f"{engine.chunk_frames * tokens * engine.batch} tokens, formula"),
            MemoryTerm("decode call activations", decode_activation_bytes(self.decoder, engine, dtype), False,
                       f"{engine.chunk_frames} latent frames, traced on meta"),
        ]
        if self.text_encoder is not None:
            weights = text_encoder_weight_bytes(self.text_encoder)
            encode = encode_activation_bytes(self.text_encoder, engine.batch)
            if self.text_encoder_placement is Placement.RESIDENT:
                terms.append(MemoryTerm("umT5 weights", weights, True, "resident on the device"))
                terms.append(MemoryTerm("prompt encode activations", encode, False,
                                        f"{self.text_encoder.text_len} tokens, traced on meta"))
            else:
                terms.append(MemoryTerm("prompt encode (offloaded umT5 visits)", weights + encode, False,
                                        "weights on the CPU between prompts, on the device while encoding"))
        return MemoryEstimate(title, tuple(terms))


# ---------------------------------------------------------------------------------------------------------------------
# Named profiles


@dataclass(frozen=True)
class MemoryProfile:
    """A named setup of one Wan-size stream: model, precision, where the text encoder lives, which decoder, size."""

    name: str
    family: str = "self-forcing"  # the family whose DiT and stream settings (chunk, steps, window, sinks) it uses
    dtype: str = "bfloat16"  # the DiT's, its caches' and the decoder's
    text_encoder: Placement | None = Placement.OFFLOAD  # None: precomputed prompt embeddings, no encoder
    decoder: DecoderKind = DecoderKind.TAEHV
    window_frames: int | None = None  # None: the family's
    sink_frames: int | None = None  # None: the family's
    batch: int = 1
    height: int = 480
    width: int = 832
    budget_gib: float | None = None  # the device memory it is meant to fit
    note: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in PROFILE_DTYPES:
            raise ConfigError(f"{self.name}: dtype={self.dtype!r} must be one of {list(PROFILE_DTYPES)}")
        if self.text_encoder is not None and not isinstance(self.text_encoder, Placement):
            raise ConfigError(f"{self.name}: text_encoder={self.text_encoder!r} must be None (precomputed embeddings) "
                              f"or one of {[p.value for p in Placement]}")
        if not isinstance(self.decoder, DecoderKind):
            raise ConfigError(f"{self.name}: decoder={self.decoder!r} must be one of {[d.value for d in DecoderKind]}")
        step = 2 * VAE_SPATIAL  # a latent pixel is 8 px and a DiT patch 2x2 latents
        if min(self.height, self.width) < step or self.height % step or self.width % step:
            raise ConfigError(f"{self.name}: {self.width}x{self.height} px must be positive multiples of {step}")
        self.setup()  # the family exists, and its settings with these changes are a valid stream

    def engine_config(self) -> EngineConfig:
        changes = {name: getattr(self, name) for name in ("window_frames", "sink_frames") if getattr(self, name) is not None}
        return family(self.family).engine_config(self.height // VAE_SPATIAL, self.width // VAE_SPATIAL,
                                                 batch=self.batch, **changes)

    def setup(self) -> StreamSetup:
        decoder = VAE_PRESETS["wan2.1"] if self.decoder is DecoderKind.WAN_VAE else taehv_preset("taew2_1")
        text_encoder = None if self.text_encoder is None else UMT5_PRESETS["umt5-xxl"]
        return StreamSetup(preset(family(self.family).dit_preset), self.engine_config(), PROFILE_DTYPES[self.dtype],
                           decoder, text_encoder, self.text_encoder or Placement.OFFLOAD)

    def estimate(self) -> MemoryEstimate:
        engine = self.engine_config()
        text = "precomputed prompt embeddings" if self.text_encoder is None else f"umT5 {self.text_encoder.value}"
        title = (f"memory profile `{self.name}`: {family(self.family).dit_preset} ({self.family}) at "
                 f"{self.width}x{self.height}, {self.dtype}, batch {self.batch}, window {engine.window_frames} frames "
                 f"({engine.sink_frames} sinks), chunk {engine.chunk_frames}, {text}, "
                 f"{self.decoder.value} decoder")
        return self.setup().estimate(title)

    def describe(self) -> str:
        budget = None if self.budget_gib is None else int(self.budget_gib * GiB)
        return self.estimate().describe(budget)


PROFILES: dict[str, MemoryProfile] = {
    profile.name: profile
    for profile in (
        MemoryProfile(
            name="24gb", budget_gib=24,
            note="the 1.3B model streaming at 832x480 on a 24 GB card: bf16, umT5 on the CPU between prompts, TAEHV",
        ),
        MemoryProfile(
            name="24gb-vae", decoder=DecoderKind.WAN_VAE, budget_gib=24,
            note="as 24gb with the full Wan VAE decoder (slower, sharper)",
        ),
        MemoryProfile(
            name="12gb", text_encoder=None, budget_gib=12,
            note="as 24gb with precomputed prompt embeddings (--prompt-embeds): no text encoder on the device",
        ),
        MemoryProfile(
            name="full", text_encoder=Placement.RESIDENT, decoder=DecoderKind.WAN_VAE,
            note="everything resident on the device, the full Wan VAE decoder: the fastest prompt switches",
        ),
    )
}


def profile_by_name(name: str) -> MemoryProfile:
    """The named profile; raises ConfigError naming the known ones."""
    if name not in PROFILES:
        close = difflib.get_close_matches(name, PROFILES, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown memory profile {name!r}{hint}; profiles: {', '.join(PROFILES)}")
    return PROFILES[name]


# ---------------------------------------------------------------------------------------------------------------------
# What `framecast generate` needs


@dataclass(frozen=True)
class GenerateSettings:
    """A profile as `framecast generate` arguments (attribute names are generate's argparse destinations)."""

    family: str
    dtype: str
    decoder: str
    height: int
    width: int
    window_frames: int
    sink_frames: int
    text_encoder_placement: Placement | None  # no flag for it yet: PromptEncoder(placement=...); None: --prompt-embeds

    def cli_args(self) -> list[str]:
        """The equivalent command-line flags (the text encoder placement has none)."""
        return ["--family", self.family, "--dtype", self.dtype, "--decoder", self.decoder, "--height", str(self.height),
                "--width", str(self.width), "--window-frames", str(self.window_frames),
                "--sink-frames", str(self.sink_frames)]

    def fill_unset(self, args: object) -> list[str]:
        """Sets every field on `args` (an argparse Namespace) whose value there is None or missing; explicit flags
        win. Returns the names it set."""
        filled = []
        for field in dataclasses.fields(self):
            if getattr(args, field.name, None) is None:
                setattr(args, field.name, getattr(self, field.name))
                filled.append(field.name)
        return filled


def generate_settings(profile: MemoryProfile) -> GenerateSettings:
    engine = profile.engine_config()
    return GenerateSettings(
        family=profile.family, dtype=profile.dtype, decoder=profile.decoder.value, height=profile.height,
        width=profile.width, window_frames=engine.window_frames, sink_frames=engine.sink_frames,
        text_encoder_placement=profile.text_encoder,
    )



# ---------------------------------------------------------------------------------------------------------------------
# The same terms measured on real models


def measure_stream(setup: StreamSetup, chunks: int = 3, device: torch.device | str = "cpu", seed: int = 0) -> dict[str, int]:
    """Every term of `setup.estimate()` measured on real models with random weights after streaming `chunks` chunks.

    Weights and caches are the real tensors' bytes; activations are the peak of the tensors one more DiT call, one
    more decode and one prompt encode allocate (`TensorAccounting`). Keys are the estimate's term names.
    """
    from framecast.stream.engine import StreamEngine
    from framecast.stream.model_source import RandomDiT

    if chunks < 2:
        raise ConfigError(f"chunks={chunks} must be >= 2: the decoder's streaming cache is full from the 2nd latent frame")
    dit_config, engine_config, dtype = setup.dit, setup.engine, setup.dtype
    generator = torch.Generator().manual_seed(seed)
    dit = RandomDiT(dit_config, dtype, seed)(device)
    prompt = torch.randn(1, dit_config.text_len, dit_config.text_dim, generator=generator)
    engine = StreamEngine(dit, engine_config, prompt)
    torch.manual_seed(seed)
    if isinstance(setup.decoder, VAEConfig):
        decoder_name, vae = "Wan VAE", WanVAE(setup.decoder).to(device, dtype).eval().requires_grad_(False)
        vae_cache = vae.new_cache()

        def decode(latents: Tensor) -> Tensor:
            return vae.decode_frames(latents.transpose(1, 2), vae_cache)

        def cache_bytes() -> int:
            return vae_cache.nbytes

        decoder_model: torch.nn.Module = vae
    else:
        decoder_name, taehv = "TAEHV", TAEHV(setup.decoder).to(device, dtype).eval().requires_grad_(False)
        taehv_stream = TAEHVStream(taehv)
        decode = taehv_stream.decode

        def cache_bytes() -> int:
            return sum(t.nbytes for t in taehv_stream.memory.previous.values())

        decoder_model = taehv
    with torch.inference_mode():
        for _ in range(chunks):
            decode(engine.next_chunk().latents)
        text = dit.encode_text(prompt.to(device, dtype).expand(engine_config.batch, -1, -1))  # as the engine holds it
        measured = {
            "DiT weights": sum(p.numel() * p.element_size() for p in dit.parameters()),
            "KV cache": engine.memory.nbytes,
            "text cross-attention K/V": sum(t.nbytes for t in (*text.keys, *text.values)),
            "latent history": engine.history.latents.nbytes + engine.history.actions.nbytes,
            f"{decoder_name} weights": sum(p.numel() * p.element_size() for p in decoder_model.parameters()),
            f"{decoder_name} streaming cache": cache_bytes(),
        }
        latents = torch.randn(engine.chunk_shape, generator=generator).to(device, dtype)
        timesteps = torch.full(engine.chunk_shape[:2], 500.0, device=device)
        engine.memory.begin_chunk(engine_config.chunk_frames)
        with TensorAccounting() as accounting:
            dit(latents, timesteps, text, engine.memory)
        engine.memory.commit()
        measured["DiT call activations"] = accounting.peak_bytes
        with TensorAccounting() as accounting:
            decode(latents)
        measured["decode call activations"] = accounting.peak_bytes
        if setup.text_encoder is not None:
            encoder = UMT5Encoder(setup.text_encoder).to(device, TEXT_ENCODER_DTYPE).eval().requires_grad_(False)
            weights = sum(p.numel() * p.element_size() for p in encoder.parameters())
            ids = torch.randint(setup.text_encoder.vocab_size, (engine_config.batch, setup.text_encoder.text_len),
                                generator=generator).to(device)
            mask = torch.ones_like(ids)
            with TensorAccounting() as accounting:
                zero_padding_rows(encoder(ids, mask), mask)
            if setup.text_encoder_placement is Placement.RESIDENT:
                measured["umT5 weights"] = weights
                measured["prompt encode activations"] = accounting.peak_bytes
            else:
                measured["prompt encode (offloaded umT5 visits)"] = weights + accounting.peak_bytes
    return measured
