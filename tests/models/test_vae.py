"""Wan VAE: decoder fixture replay (float64 bit-exact, float32), streaming equivalence, interface, loading, errors;
encoder streaming and frame rule."""

from __future__ import annotations

import pytest
import torch

from framecast.models.errors import CheckpointError, ConfigError, ShapeError
from framecast.models.vae import (
    VAE_PRESETS,
    WAN21_LATENT_MEAN,
    WAN21_LATENT_STD,
    VAEConfig,
    WanVAE,
    WanVAEDecoder,
    WanVAEEncodeStream,
    WanVAEStream,
    load_wan_vae,
    vae_preset,
)
from tests.conftest import load_fixture

FIXTURE = "wan_vae_tiny_float64.pt"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the tiny model's convs are too small to split: on a busy 2-core machine 2 threads ran 10x slower than 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fixture() -> dict:
    return load_fixture(FIXTURE)


@pytest.fixture(scope="module")
def model(fixture: dict) -> WanVAE:
    return load_wan_vae(fixture["state_dict"], vae_preset("tiny"))


@pytest.fixture(scope="module")
def whole(fixture: dict, model: WanVAE) -> torch.Tensor:
    """One-shot float64 decode of the fixture's latents."""
    with torch.inference_mode():
        return model.decode(fixture["z"])


def decode_in_chunks(model: WanVAE, z: torch.Tensor, size: int) -> torch.Tensor:
    stream = WanVAEStream(model)
    with torch.inference_mode():
        return torch.cat([stream.decode(z[:, :, i : i + size]) for i in range(0, z.shape[2], size)], dim=2)


# ---------------------------------------------------------------------------------------------------------------------
# Fixture replay


def test_fixture_matches_the_tiny_preset_and_wan21_statistics(fixture: dict) -> None:
    config = vae_preset("tiny")
    assert (fixture["dim"], fixture["z_dim"]) == (config.dim, config.z_dim)
    assert torch.equal(fixture["mean"], torch.tensor(WAN21_LATENT_MEAN, dtype=torch.float64))
    assert torch.equal(fixture["std"], torch.tensor(WAN21_LATENT_STD, dtype=torch.float64))


def test_one_shot_decode_is_bit_exact_in_float64(fixture: dict, whole: torch.Tensor) -> None:
    # the float32 rounding before each 2x upsample is replicated, so 1e-10 (measured: 0.0), not 1e-6
    pixels = whole
    assert pixels.shape == fixture["decode_full"].shape == (1, 3, 25, 32, 48)
    torch.testing.assert_close(pixels, fixture["decode_full"], rtol=0, atol=1e-10)


def test_streaming_chunks_of_3_match_the_reference_cached_decode(fixture: dict, model: WanVAE) -> None:
    chunked = decode_in_chunks(model, fixture["z"], 3)
    torch.testing.assert_close(chunked, fixture["decode_stream_chunks3"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_any_chunking_equals_one_shot_exactly(fixture: dict, model: WanVAE, whole: torch.Tensor, size: int) -> None:
    assert torch.equal(decode_in_chunks(model, fixture["z"], size), whole)


def test_uneven_chunking_equals_one_shot_exactly(fixture: dict, model: WanVAE, whole: torch.Tensor) -> None:
    z, stream = fixture["z"], WanVAEStream(model)
    with torch.inference_mode():
        parts = [stream.decode(z[:, :, a:b]) for a, b in [(0, 2), (2, 3), (3, 7)]]
    assert [p.shape[2] for p in parts] == [5, 4, 16]  # 1 + 4, then 4 per latent frame
    assert torch.equal(torch.cat(parts, dim=2), whole)
    assert stream.latent_frames == 7


def test_a_batch_decodes_like_its_samples(fixture: dict, model: WanVAE, whole: torch.Tensor) -> None:
    z = torch.cat([fixture["z"], fixture["z"].flip(-1)])
    with torch.inference_mode():
        batch = model.decode(z)
        second = model.decode(z[1:])
    torch.testing.assert_close(batch, torch.cat([whole, second]), rtol=0, atol=1e-12)


def test_float32_stays_close_to_the_float64_reference(fixture: dict) -> None:
    model32 = load_wan_vae(fixture["state_dict"], vae_preset("tiny"), dtype=torch.float32)
    with torch.inference_mode():
        pixels = model32.decode(fixture["z"].float())
    assert pixels.dtype == torch.float32
    torch.testing.assert_close(pixels.double(), fixture["decode_full"], rtol=0, atol=1e-5)  # measured 2.7e-6


def test_reset_starts_a_new_stream(fixture: dict, model: WanVAE) -> None:
    z, stream = fixture["z"], WanVAEStream(model)
    with torch.inference_mode():
        first = stream.decode(z[:, :, :3])
        stream.decode(z[:, :, 3:])
        stream.reset()
        again = stream.decode(z[:, :, :3])
    assert torch.equal(first, again)


def test_the_cache_holds_as_many_bytes_after_many_chunks_as_after_two(fixture: dict, model: WanVAE) -> None:
    z, cache = fixture["z"], model.new_cache()
    assert cache.nbytes == 0
    sizes = []
    with torch.inference_mode():
        for _ in range(4):
            model.decode_frames(z[:, :, :3], cache)
            sizes.append(cache.nbytes)
    assert sizes[0] > 0 and sizes[1] == sizes[2] == sizes[3]


# ---------------------------------------------------------------------------------------------------------------------
# Decoder interface


def test_decoder_interface_gives_clamped_uint8_frames_in_the_dit_layout(fixture: dict, model: WanVAE) -> None:
    latents = fixture["z"].transpose(1, 2)  # (B, F, C, H, W), the DiT's layout
    decoder = WanVAEDecoder(model)
    chunked = [decoder.decode(latents[:, i : i + 2]) for i in range(0, 7, 2)]
    assert [c.shape[1] for c in chunked] == [5, 8, 8, 4]
    frames = torch.cat(chunked, dim=1)
    assert frames.shape == (1, 25, 32, 48, 3) and frames.dtype == torch.uint8
    expected = ((fixture["decode_full"].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    assert torch.equal(frames, expected)

    decoder.reset()
    assert torch.equal(decoder.decode(latents[:, :1]), expected[:, :1])


def test_decoder_interface_casts_latents_to_the_model_dtype(fixture: dict, model: WanVAE) -> None:
    frames = WanVAEDecoder(model).decode(fixture["z"].transpose(1, 2).float()[:, :2])
    assert frames.shape == (1, 5, 32, 48, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Errors


def test_wrong_channels_raise_shape_error_naming_both_shapes(model: WanVAE) -> None:
    with pytest.raises(ShapeError, match=r"\(1, 2, 8, 4, 6\).*\[B, F, 16, H, W\]"):
        WanVAEDecoder(model).decode(torch.zeros(1, 2, 8, 4, 6, dtype=torch.float64))
    with pytest.raises(ShapeError, match=r"\(1, 16, 4, 6\).*\[B, C, T, H, W\]".replace("C", "16")):
        WanVAEStream(model).decode(torch.zeros(1, 16, 4, 6, dtype=torch.float64))
    with pytest.raises(ShapeError, match=r"at least 1 frame"):
        WanVAEStream(model).decode(torch.zeros(1, 16, 0, 4, 6, dtype=torch.float64))


def test_a_chunk_of_another_size_mid_stream_raises_shape_error(fixture: dict, model: WanVAE) -> None:
    stream = WanVAEStream(model)
    with torch.inference_mode():
        stream.decode(fixture["z"][:, :, :1])
        with pytest.raises(ShapeError, match=r"\(1, 16, 1, 4, 8\).*expects \[1, 16, T, 4, 6\]"):
            stream.decode(torch.zeros(1, 16, 1, 4, 8, dtype=torch.float64))


def test_loader_lists_every_missing_unexpected_and_misshaped_key(fixture: dict) -> None:
    state = dict(fixture["state_dict"])
    del state["decoder.head.2.bias"]
    state["decoder.extra.weight"] = torch.zeros(2)
    state["conv2.weight"] = torch.zeros(16, 16, 3, 1, 1)
    with pytest.raises(CheckpointError) as error:
        load_wan_vae(state, vae_preset("tiny"))
    message = str(error.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in message
    assert "missing     decoder.head.2.bias [3]" in message
    assert "unexpected  decoder.extra.weight [2]" in message
    assert "mis-shaped  conv2.weight: checkpoint [16, 16, 3, 1, 1], model [16, 16, 1, 1, 1]" in message


def test_loader_sets_encoder_keys_aside_and_reads_files(fixture: dict, tmp_path) -> None:
    state = dict(fixture["state_dict"])
    state["encoder.conv1.weight"] = torch.zeros(8, 3, 3, 3, 3, dtype=torch.float64)
    path = tmp_path / "vae.pth"
    torch.save(state, path)
    model = load_wan_vae(path, vae_preset("tiny"))
    assert set(model.state_dict()) == {k for k in fixture["state_dict"] if not k.startswith("conv1.")}
    with pytest.raises(CheckpointError, match="does not fit"):
        load_wan_vae(path)  # the real preset: every shape differs


def test_real_preset_has_the_reference_parameter_names_and_sizes() -> None:
    with torch.device("meta"):
        model = WanVAE(VAE_PRESETS["wan2.1"])
    state = model.state_dict()
    assert state["decoder.conv1.weight"].shape == (384, 16, 3, 3, 3)
    assert state["decoder.upsamples.3.time_conv.weight"].shape == (768, 384, 3, 1, 1)
    assert state["decoder.head.2.weight"].shape == (3, 96, 3, 3, 3)
    # both counts checked against the reference WanVAE_(dim=96, z_dim=16) built from Self-Forcing's wan/modules/vae.py
    assert sum(t.numel() for t in state.values()) == 73_295_603
    with torch.device("meta"):
        full = WanVAE(VAE_PRESETS["wan2.1"], encoder=True).state_dict()
    assert len(full) == 194
    assert full["encoder.downsamples.5.time_conv.weight"].shape == (192, 192, 3, 1, 1)
    assert full["conv1.weight"].shape == (32, 32, 1, 1, 1)


def test_unknown_preset_and_bad_config_raise_config_error() -> None:
    with pytest.raises(ConfigError, match=r"'huge'.*\['tiny', 'wan2.1'\]"):
        vae_preset("huge")
    with pytest.raises(ConfigError, match=r"temperal_downsample=\(True,\) must have len\(dim_mult\) - 1 = 3"):
        VAEConfig(temperal_downsample=(True,))
    with pytest.raises(ConfigError, match=r"latent_mean has 2 entries; expected z_dim=16"):
        VAEConfig(latent_mean=(0.0, 1.0))
    with pytest.raises(ConfigError, match=r"dim=0 must be a positive integer"):
        VAEConfig(dim=0)


def test_config_frame_rule() -> None:
    config = VAE_PRESETS["wan2.1"]
    assert (config.spatial_scale, config.temporal_scale) == (8, 4)
    assert config.video_frames(21) == 81 and config.video_frames(3, at_start=False) == 12


# ---------------------------------------------------------------------------------------------------------------------
# Encoder (no parity fixture: checked by hand against the reference, 0.0 at dim 8 and 1e-16 at dim 96 in float64)


@pytest.fixture(scope="module")
def autoencoder() -> WanVAE:
    torch.manual_seed(0)
    model = WanVAE(vae_preset("tiny"), encoder=True).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.1)
    return model


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    return torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize("chunks", [[9], [1, 4, 4], [1, 8], [5, 4]])
def test_streaming_encode_equals_one_shot_exactly(autoencoder: WanVAE, video: torch.Tensor, chunks: list[int]) -> None:
    stream, start, parts = WanVAEEncodeStream(autoencoder), 0, []
    with torch.inference_mode():
        whole = autoencoder.encode(video)
        for size in chunks:
            parts.append(stream.encode(video[:, :, start : start + size]))
            start += size
    assert whole.shape == (1, 16, 3, 4, 6)
    assert torch.equal(torch.cat(parts, dim=2), whole)


def test_encode_then_decode_keeps_the_frame_count(autoencoder: WanVAE, video: torch.Tensor) -> None:
    with torch.inference_mode():
        assert autoencoder.decode(autoencoder.encode(video)).shape == video.shape


def test_encoder_frame_rule_and_shape_errors(autoencoder: WanVAE, video: torch.Tensor) -> None:
    stream = WanVAEEncodeStream(autoencoder)
    with pytest.raises(ShapeError, match=r"T=4 frames must be 1 \+ 4k at the stream start"):
        stream.encode(video[:, :, :4])
    with pytest.raises(ShapeError, match=r"\(1, 3, 1, 30, 48\).*H, W multiples of 8"):
        stream.encode(video[:, :, :1, :30])
    with torch.inference_mode():
        stream.encode(video[:, :, :1])
    with pytest.raises(ShapeError, match=r"T=3 frames must be a multiple of 4 after the stream start"):
        stream.encode(video[:, :, 1:4])
    with pytest.raises(ShapeError, match=r"expects \[1, 3, T, 32, 48\]"):
        stream.encode(video[:, :, 1:5, :16])


def test_decoder_only_model_has_no_encoder_stream(model: WanVAE, fixture: dict) -> None:
    with pytest.raises(ConfigError, match="without its encoder"):
        WanVAEEncodeStream(model)
    with pytest.raises(CheckpointError, match=r"does not fit the Wan VAE \(\d+ missing, 0 unexpected"):
        load_wan_vae(fixture["state_dict"], vae_preset("tiny"), encoder=True)  # the fixture holds no encoder.*
