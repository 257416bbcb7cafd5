"""Memory profiles: the estimate against real models streamed on the CPU, and the named profiles against their budgets.

Weights and caches must equal the real tensors' bytes exactly after a few chunks; activations must be within
ACTIVATION_TOLERANCE of the tensors a real DiT call, decode and prompt encode allocate (`TensorAccounting`).
"""

from __future__ import annotations

import argparse

import pytest
import torch

from framecast.models.config import AttentionKind, preset
from framecast.models.errors import ConfigError
from framecast.models.taehv import preset as taehv_preset
from framecast.models.umt5 import Placement, umt5_preset
from framecast.models.vae import vae_preset
from framecast.stream.engine import CacheKind, EngineConfig
from framecast.stream.memory_profile import (
    GiB,
    PROFILES,
    DecoderKind,
    GenerateSettings,
    MemoryProfile,
    StreamSetup,
    TensorAccounting,
    generate_settings,
    measure_stream,
    profile_by_name,
)

ACTIVATION_TOLERANCE = 0.05  # the formula and the meta traces are exact on this CPU; 5 % leaves room for SDPA backends
ACTIVATIONS = ("DiT call activations", "decode call activations", "prompt encode activations",
               "prompt encode (offloaded umT5 visits)")
TINY_STREAM = EngineConfig(latent_height=8, latent_width=12, window_frames=6, sink_frames=1, denoising_steps=(1000, 500))


def check_against_real(setup: StreamSetup, chunks: int = 3) -> None:
    estimate, measured = setup.estimate(), measure_stream(setup, chunks)
    assert {t.name for t in estimate.terms} == set(measured)
    for term in estimate.terms:
        real = measured[term.name]
        if term.name in ACTIVATIONS:
            assert abs(term.bytes - real) <= ACTIVATION_TOLERANCE * real, (term.name, term.bytes, real)
        else:
            assert term.bytes == real, (term.name, term.bytes, real)


@pytest.mark.parametrize("decoder", ["wan-vae", "taehv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("placement", [Placement.RESIDENT, Placement.OFFLOAD])
def test_every_term_matches_real_models_after_streaming(decoder: str, dtype: torch.dtype, placement: Placement) -> None:
    decoder_config = vae_preset("tiny") if decoder == "wan-vae" else taehv_preset("tiny")
    check_against_real(StreamSetup(preset("tiny"), TINY_STREAM, dtype, decoder_config, umt5_preset("tiny"), placement))


@pytest.mark.parametrize(
    "engine",
    [
        EngineConfig(latent_height=8, latent_width=16, window_frames=9, sink_frames=3, batch=2),  # batch, more sinks
        EngineConfig(latent_height=8, latent_width=12, window_frames=6, sink_frames=1, sinks_follow_window=True),
        EngineConfig(latent_height=8, latent_width=12, window_frames=12, sink_frames=0, cache=CacheKind.FULL),
    ],
    ids=["batch-2", "sinks-follow-window", "full-cache"],
)
def test_cache_variants_match_real_models(engine: EngineConfig) -> None:
    check_against_real(StreamSetup(preset("small"), engine, torch.bfloat16, taehv_preset("tiny")))


def test_linear_attention_state_matches_real_model() -> None:
    setup = StreamSetup(preset("tiny", attention=AttentionKind.LINEAR), TINY_STREAM, torch.float32, taehv_preset("tiny"))
    assert setup.estimate().term("KV cache").bytes == measure_stream(setup)["KV cache"]


def test_tensor_accounting_counts_new_storages_once_and_not_views_or_in_place_writes() -> None:
    base = torch.zeros(1000)  # existed before: never counted
    with TensorAccounting() as accounting:
        a = torch.ones(256)  # 1024 bytes
        view = a[:10]
        a.add_(1)
        base.add_(a.sum())
        b = a * 2  # 2048 live
        del a, view
        c = b + 1  # a freed: 2048 live again
    assert accounting.peak_bytes == 2048
    assert accounting.live_bytes == 2048 and c.numel() == 256


def test_24gb_profile_fits_24_gib_with_its_exact_weight_and_cache_terms() -> None:
    estimate = profile_by_name("24gb").estimate()
    assert estimate.fits(24 * GiB)
    assert estimate.term("DiT weights").bytes == 1_418_996_800 * 2  # bf16
    assert estimate.term("KV cache").bytes == 2 * 21 * 30 * 1560 * 12 * 128 * 2  # K and V, 21 frames, 30 layers
    assert estimate.term("TAEHV weights").bytes == 9_844_611 * 2
    visit = estimate.term("prompt encode (offloaded umT5 visits)")
    assert not visit.held and visit.bytes > 5_680_910_336 * 2  # weights on the device only while encoding
    assert estimate.peak_bytes == estimate.held_bytes + visit.bytes  # the encode visit is the largest call
    assert "fits 24 GiB" in profile_by_name("24gb").describe()


def test_full_profile_is_reported_as_it_is() -> None:
    full, small = profile_by_name("full").estimate(), profile_by_name("24gb").estimate()
    assert full.term("umT5 weights").held and full.term("Wan VAE streaming cache").held
    assert full.peak_bytes == full.held_bytes + full.largest_transient.bytes > small.peak_bytes
    # everything resident with the full VAE needs more than a 24 GB card, and fits a 32 GB one
    assert not full.fits(24 * GiB) and full.fits(32 * GiB)
    table = full.describe(24 * GiB)
    assert "does NOT fit 24 GiB" in table
    for term in full.terms:
        assert term.name in table


def test_precomputed_embeddings_profile_has_no_text_encoder_and_fits_12_gib() -> None:
    estimate = profile_by_name("12gb").estimate()
    assert not any("umT5" in t.name or "prompt encode" in t.name for t in estimate.terms)
    assert estimate.fits(12 * GiB)


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown memory profile '24gbb' \(did you mean 24gb.*profiles: 24gb, "):
        profile_by_name("24gbb")
    with pytest.raises(ConfigError, match="profiles: " + ", ".join(PROFILES)):
        profile_by_name("huge")


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(dtype="int8"), r"dtype='int8' must be one of \['bfloat16', 'float16', 'float32'\]"),
        (dict(height=500), r"832x500 px must be positive multiples of 16"),
        (dict(decoder="taehv"), r"decoder='taehv' must be one of \['wan-vae', 'taehv'\]"),
        (dict(family="rolling-forcing"), r"covers the chunk sampler only"),
        (dict(family="selfforcing"), r"unknown model family 'selfforcing'"),
        (dict(window_frames=4, sink_frames=3), r"sink_frames=3 must be in \[0, window_frames - chunk_frames = 1\]"),
    ],
)
def test_bad_profiles_raise_config_error(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MemoryProfile(name="bad", **changes)


def test_fits_rejects_a_bad_margin() -> None:
    with pytest.raises(ConfigError, match=r"margin=1.5 must be a fraction in \[0, 1\)"):
        profile_by_name("12gb").estimate().fits(24 * GiB, margin=1.5)


def test_generate_settings_of_the_24gb_profile() -> None:
    settings = generate_settings(profile_by_name("24gb"))
    assert settings == GenerateSettings(family="self-forcing", dtype="bfloat16", decoder="taehv", height=480,
                                        width=832, window_frames=21, sink_frames=0,
                                        text_encoder_placement=Placement.OFFLOAD)
    assert settings.cli_args()[:6] == ["--family", "self-forcing", "--dtype", "bfloat16", "--decoder", "taehv"]
    args = argparse.Namespace(family=None, dtype=None, decoder=None, height=None, width=None, window_frames=12,
                              sink_frames=None)
    filled = settings.fill_unset(args)
    assert args.window_frames == 12 and "window_frames" not in filled  # an explicit flag wins
    assert (args.decoder, args.height, args.text_encoder_placement) == ("taehv", 480, Placement.OFFLOAD)
    assert profile_by_name("full").decoder is DecoderKind.WAN_VAE
