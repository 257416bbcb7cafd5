"""TAEHV decoder: parity with the reference (taehv_tiny_float64.pt), exact streaming, frame counts, loading, errors."""

from __future__ import annotations

import pytest
import torch

from framecast.models.errors import CheckpointError, ConfigError, ShapeError
from framecast.models.taehv import (
    PRESETS,
    TAEHV,
    OutputMode,
    TAEHVConfig,
    TAEHVDecoder,
    TAEHVStream,
    load_taehv,
    preset,
)
from tests.conftest import load_fixture

FIXTURE = "taehv_tiny_float64.pt"
CHUNKINGS = [[1] * 9, [3, 3, 3], [2, 3, 4], [4, 5], [1, 8], [9]]


@pytest.fixture(scope="module")
def fixture() -> dict:
    return load_fixture(FIXTURE)


@pytest.fixture(scope="module")
def model(fixture: dict) -> TAEHV:
    return load_taehv(fixture["state_dict"])


@pytest.fixture(scope="module")
def random_model() -> TAEHV:
    """The tiny preset with random weights, for contracts that need no reference data."""
    torch.manual_seed(0)
    return TAEHV(preset("tiny")).double().eval()


def stream_decode(model: TAEHV, latents: torch.Tensor, sizes: list[int], mode: OutputMode) -> torch.Tensor:
    stream = TAEHVStream(model, mode)
    with torch.no_grad():
        return torch.cat([stream.decode(chunk) for chunk in latents.split(sizes, dim=1)], dim=1)


# Config


def test_config_is_inferred_from_the_weights(fixture: dict, model: TAEHV) -> None:
    assert model.config == PRESETS["tiny"] == TAEHVConfig(widths=tuple(fixture["config"]["n_f"]))
    assert preset("taew2_1").widths == tuple(fixture["config"]["n_f_real_taew2_1"])
    assert (model.config.t_upscale, model.config.spatial_upscale) == (4, 8)
    assert model.config.frames_to_trim == fixture["config"]["frames_to_trim"]


def test_taew2_1_preset_has_the_real_parameter_count() -> None:
    assert sum(p.numel() for p in TAEHV(preset("taew2_1")).parameters()) == 9_844_611  # "9.8 M" upstream


def test_bad_config_values_raise_config_error_naming_the_range() -> None:
    with pytest.raises(ConfigError, match=r"frames_to_trim=4 must be in \[0, t_upscale=4\)"):
        TAEHVConfig(frames_to_trim=4)
    with pytest.raises(ConfigError, match="widths"):
        TAEHVConfig(widths=(8, 8, 8))
    with pytest.raises(ConfigError, match="unknown TAEHV preset 'taew2_2'; presets: taew2_1, tiny"):
        preset("taew2_2")


# Parity with the reference (float64)


def test_parallel_decode_matches_reference(fixture: dict, model: TAEHV) -> None:
    with torch.no_grad():
        frames = model.decode_video(fixture["latents"])
    assert frames.shape == fixture["decode_parallel"].shape == (2, 36, 3, 16, 24)
    assert (frames - fixture["decode_parallel"]).abs().max() <= 1e-10


def test_upstream_decode_trims_and_clamps_like_reference(fixture: dict, model: TAEHV) -> None:
    with torch.no_grad():
        frames = model.decode_video(fixture["latents"], OutputMode.UPSTREAM)
    assert frames.shape == fixture["decode_upstream"].shape == (2, 33, 3, 16, 24)  # 1 + 4 * (9 - 1)
    assert (frames - fixture["decode_upstream"]).abs().max() <= 1e-10


@pytest.mark.parametrize("sizes", CHUNKINGS, ids=lambda sizes: "+".join(map(str, sizes)))
def test_chunked_streaming_equals_one_shot(fixture: dict, model: TAEHV, sizes: list[int]) -> None:
    raw = stream_decode(model, fixture["latents"], sizes, OutputMode.RAW)
    assert (raw - fixture["decode_parallel"]).abs().max() <= 1e-10
    upstream = stream_decode(model, fixture["latents"], sizes, OutputMode.UPSTREAM)
    assert (upstream - fixture["decode_upstream"]).abs().max() <= 1e-10


@pytest.mark.parametrize("sizes", [[1] * 5, [2, 3], [4, 1]], ids=lambda sizes: "+".join(map(str, sizes)))
def test_chunked_streaming_equals_one_shot_without_fixtures(random_model: TAEHV, sizes: list[int]) -> None:
    latents = torch.randn(2, 5, 16, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = random_model.decode_video(latents, OutputMode.UPSTREAM)
    assert whole.shape == (2, 1 + 4 * 4, 3, 24, 16)
    assert (stream_decode(random_model, latents, sizes, OutputMode.UPSTREAM) - whole).abs().max() <= 1e-10


def test_float32_stays_close_to_the_float64_reference(fixture: dict) -> None:
    model = load_taehv(fixture["state_dict"], dtype=torch.float32)
    frames = stream_decode(model, fixture["latents"].float(), [2, 3, 4], OutputMode.RAW)
    assert frames.dtype == torch.float32
    assert (frames.double() - fixture["decode_parallel"]).abs().max() <= 1e-5


def test_self_forcing_demo_chunking_is_an_approximation_we_do_not_copy(fixture: dict, model: TAEHV) -> None:
    # The demo decodes latents [k-3, k+3) from empty memory and keeps the last 12 frames: exact only while the
    # warm-up reaches back to frame 0. Our stream carries the MemBlock state instead, and matches one-shot decoding.
    latents, demo = fixture["latents"][:1], fixture["demo_chunked_b0"]
    exact = fixture["decode_parallel"][:1, 3:]
    assert torch.equal(demo[:, :21], exact[:, :21])  # chunks 1-2: latents 0..5, warm-up from frame 0
    assert (demo[:, 21:] - exact[:, 21:]).abs().max() > 1e-2  # chunk 3: 3 latents of warm-up are not enough
    with torch.no_grad():
        rewarmed = model.decode_video(latents[:, 3:9])[:, 12:]  # the demo's rule, replayed with our model
    assert (rewarmed - demo[:, 21:]).abs().max() <= 1e-10
    ours = stream_decode(model, latents, [3, 3, 3], OutputMode.RAW)[:, 3:]
    assert (ours - exact).abs().max() <= 1e-10


# Our decoder interface


def test_decoder_interface_follows_the_wan_frame_rule_and_streams(fixture: dict, model: TAEHV) -> None:
    latents = fixture["latents"]
    decoder = TAEHVDecoder(model)
    first, second = decoder.decode(latents[:, :4]), decoder.decode(latents[:, 4:])
    assert first.shape == (2, 1 + 4 * 3, 16, 24, 3) and second.shape == (2, 4 * 5, 16, 24, 3)
    assert first.dtype == torch.uint8
    expected = (fixture["decode_upstream"] * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2)
    assert torch.equal(torch.cat([first, second], dim=1), expected)
    decoder.reset()
    assert torch.equal(decoder.decode(latents[:, :1]), expected[:, :1])  # a new stream trims again


def test_decoder_accepts_float32_latents_for_a_float64_model(fixture: dict, model: TAEHV) -> None:
    frames = TAEHVDecoder(model).decode(fixture["latents"][:, :2].float())
    assert frames.shape == (2, 5, 16, 24, 3)


# Errors


def test_wrong_channel_count_raises_shape_error_naming_shapes(random_model: TAEHV) -> None:
    model = random_model
    with pytest.raises(ShapeError, match=r"latents have shape \(1, 2, 8, 2, 3\); expected \[B, F, 16, H, W\]"):
        model.decode_video(torch.zeros(1, 2, 8, 2, 3, dtype=torch.float64))
    with pytest.raises(ShapeError, match=r"expected \[B, F, 16, H, W\]"):
        TAEHVDecoder(model).decode(torch.zeros(2, 16, 2, 3))


def test_stream_rejects_a_chunk_of_another_size_until_reset(random_model: TAEHV) -> None:
    stream = TAEHVStream(random_model)
    with torch.no_grad():
        stream.decode(torch.zeros(1, 1, 16, 2, 3, dtype=torch.float64))
        carried = r"shape \(1, 1, 16, 4, 3\); this stream carries batch 1 at latent size 2x3"
        with pytest.raises(ShapeError, match=carried):
            stream.decode(torch.zeros(1, 1, 16, 4, 3, dtype=torch.float64))
        stream.reset()
        assert stream.decode(torch.zeros(1, 1, 16, 4, 3, dtype=torch.float64)).shape == (1, 1, 3, 32, 24)


def test_bad_state_dict_gives_one_error_listing_every_bad_key(fixture: dict) -> None:
    state = dict(fixture["state_dict"])
    del state["decoder.3.conv.2.bias"]
    state["decoder.99.weight"] = torch.zeros(1)
    state["decoder.4.conv.0.weight"] = torch.zeros(32, 32, 3, 3, dtype=torch.float64)
    with pytest.raises(CheckpointError) as error:
        load_taehv(state)
    message = str(error.value)
    assert "(1 missing, 1 unexpected, 1 mis-shaped)" in message
    assert "missing     decoder.3.conv.2.bias [32]" in message
    assert "unexpected  decoder.99.weight [1]" in message
    assert "mis-shaped  decoder.4.conv.0.weight: checkpoint [32, 32, 3, 3], model [32, 64, 3, 3]" in message


def test_load_from_file_ignores_encoder_and_adapts_a_larger_tgrow_stride(fixture: dict, tmp_path) -> None:
    state = dict(fixture["state_dict"])
    state["encoder.0.weight"] = torch.zeros(64, 3, 3, 3)  # taew2_1.pth holds the encoder too
    last_frame = state["decoder.7.conv.weight"]
    state["decoder.7.conv.weight"] = torch.cat([torch.zeros_like(last_frame), last_frame])  # trained with stride 2
    path = tmp_path / "taew2_1_tiny.pth"
    torch.save(state, path)
    model = load_taehv(path)
    assert torch.equal(model.decoder[7].conv.weight, last_frame)  # upstream keeps the last output frame's channels
    with torch.no_grad():
        assert (model.decode_video(fixture["latents"]) - fixture["decode_parallel"]).abs().max() <= 1e-10


def test_missing_file_raises_checkpoint_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_taehv(tmp_path / "absent.pth")
