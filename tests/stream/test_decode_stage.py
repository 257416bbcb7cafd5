"""The decode stage: a real spawned decode process over real gloo, checked against the same decoder in this process."""

import logging
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
import torch

from framecast.models.errors import ConfigError
from framecast.stream.cli import main
from framecast.stream.decode_stage import (
    DecodeStageConfig, PreviewDecoderRecipe, StagedDecoder, WorldDecoderRecipe, check_device,
)
from framecast.stream.wire import StageFailed
from framecast.stream.worldmodel.recipe import AUTOENCODER_FILE, WEIGHTS_DIR

WORLD = WorldDecoderRecipe(str(WEIGHTS_DIR / AUTOENCODER_FILE), torch.float32)  # the shipped 128x128 decoder
PREVIEW = PreviewDecoderRecipe(channels=16)


def world_chunks(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 16, 16, 16, generator=generator) for _ in range(count)]  # (B, F, C, H, W)


def preview_chunks(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 16, 4, 4, generator=generator) for _ in range(count)]


def decode_processes() -> set[int]:
    return {process.pid for process in multiprocessing.active_children() if process.name.startswith("decode stage")}


@pytest.fixture(scope="module")
def world_stage():
    decoder = StagedDecoder(WORLD)
    try:
        yield decoder
    finally:
        decoder.close()


@pytest.fixture
def staged(world_stage: StagedDecoder):
    """The module's decode stage at the start of a new stream; what a test leaves in flight is drained after it."""
    world_stage.reset()
    yield world_stage
    while world_stage.in_flight:
        world_stage.result()


def test_frames_equal_the_in_process_decoders_over_several_chunks(staged: StagedDecoder) -> None:
    local = WORLD("cpu")
    for latents in world_chunks(4):
        frames = staged.decode(latents)
        assert frames.dtype == torch.uint8 and frames.shape == (1, 3, 128, 128, 3)
        assert torch.equal(frames, local.decode(latents))
    assert staged.is_remote and (staged.frames_per_latent, staged.first_latent_frames) == (1, 1)


def test_chunks_in_flight_come_back_first_in_first_out_and_a_reset_applies_in_order(staged: StagedDecoder) -> None:
    chunks = world_chunks(5, seed=1)
    for latents in chunks[:3]:
        staged.submit(latents)
    staged.reset()  # after chunk 2, before chunk 3
    for latents in chunks[3:]:
        staged.submit(latents)
    assert staged.in_flight == 5
    local = WORLD("cpu")
    expected = [local.decode(latents) for latents in chunks[:3]]
    local.reset()
    expected += [local.decode(latents) for latents in chunks[3:]]
    got = [staged.result() for _ in chunks]
    assert staged.in_flight == 0
    assert all(torch.equal(frames, want) for frames, want in zip(got, expected))
    continued = WORLD("cpu")
    for latents in chunks[:4]:
        without_reset = continued.decode(latents)
    assert not torch.equal(without_reset, got[3])  # the reset mattered: the decoder carries state


def test_result_without_a_chunk_in_flight_is_refused(staged: StagedDecoder) -> None:
    with pytest.raises(RuntimeError, match="no chunk in flight"):
        staged.result()


@pytest.mark.parametrize("recipe, chunks", [(WORLD, world_chunks(5, seed=2)), (PREVIEW, preview_chunks(5))],
                         ids=["world", "preview"])
def test_a_killed_decode_process_falls_back_without_losing_or_repeating_a_chunk(caplog, recipe, chunks) -> None:
    decoder = StagedDecoder(recipe)
    try:
        decoder.submit(chunks[0])
        got = [decoder.result()]  # decoded by the process
        process = decoder.stage.process
        os.kill(process.pid, signal.SIGSTOP)  # chunks 1 and 2 (and the reset) are sent but never decoded there
        decoder.submit(chunks[1])
        decoder.reset()
        decoder.submit(chunks[2])
        os.kill(process.pid, signal.SIGKILL)
        process.join(5.0)
        with caplog.at_level(logging.WARNING, logger="framecast.decode_stage"):
            decoder.submit(chunks[3])
            got += [decoder.result() for _ in range(3)]
        got.append(decoder.decode(chunks[4]))
        assert not decoder.is_remote and decoder.in_flight == 0
    finally:
        decoder.close()
    assert not process.is_alive()
    assert "exit code -9" in caplog.text and "3 chunk(s) in flight decoded again" in caplog.text

    def stream(decoder, first: int) -> list[torch.Tensor]:
        """The frames of chunks `first`, ..., with the reset after chunk 1."""
        frames = [decoder.decode(latents) for latents in chunks[first:2]]
        decoder.reset()
        return frames + [decoder.decode(latents) for latents in chunks[2:]]

    # a fresh decoder, fed the newest chunk whose frames came back, then every chunk after it once (reset in order)
    fresh = recipe("cpu")
    fresh.decode(chunks[0])
    expected = [recipe("cpu").decode(chunks[0])] + stream(fresh, first=1)
    assert len(got) == len(chunks) and all(torch.equal(frames, want) for frames, want in zip(got, expected))
    # both decoders' state is a function of the newest latent frame: the stream goes on as if nothing happened
    assert all(torch.equal(frames, want) for frames, want in zip(got, stream(recipe("cpu"), first=0)))
    if recipe is PREVIEW:  # the Wan frame rule: 1 + 4 (F - 1) frames after a reset, 4 F after
        assert [frames.shape[1] for frames in got] == [9, 12, 9, 12, 12]


def test_a_hung_decode_process_times_out_and_decoding_goes_on_here(caplog) -> None:
    decoder = StagedDecoder(PREVIEW, DecodeStageConfig(decode_timeout_s=0.5, first_decode_timeout_s=0.5))
    chunks = preview_chunks(2, seed=3)
    process = decoder.stage.process
    try:
        os.kill(process.pid, signal.SIGSTOP)
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="framecast.decode_stage"):
            got = [decoder.decode(latents) for latents in chunks]
        assert time.monotonic() - start < 5.0  # the 0.5 s timeout, not the default 10 s, on a loaded machine
        assert not decoder.is_remote and "no answer in time" in caplog.text
    finally:
        decoder.close()
    local = PREVIEW("cpu")
    assert all(torch.equal(frames, local.decode(latents)) for frames, latents in zip(got, chunks))
    assert not process.is_alive()


def test_a_decoder_that_cannot_be_built_fails_the_start_naming_the_exit() -> None:
    before = decode_processes()
    with pytest.raises(StageFailed, match=r"decode stage on cpu did not start: the decode process died \(exit code 2"):
        StagedDecoder(WorldDecoderRecipe("/nonexistent/world_autoencoder.safetensors"))
    assert decode_processes() <= before


@pytest.mark.parametrize(
    "text, message",
    [("gpu", "'gpu' is not a device"), ("meta", "device kind 'meta' is not supported")]
    + ([("cuda:1", "CUDA is not available")] if not torch.cuda.is_available() else []),
)
def test_devices_are_checked_naming_the_device(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_device(text, "decode device")
    with pytest.raises(ConfigError, match=message):
        DecodeStageConfig(device=text)


def test_generate_with_a_decode_device_writes_the_in_process_frames(tmp_path, monkeypatch, capsys) -> None:
    from framecast.stream.sinks.file import VideoFileSink

    written: list[np.ndarray] = []
    write = VideoFileSink.write

    def recording_write(sink: VideoFileSink, frames: np.ndarray) -> None:
        written.append(np.array(frames))  # the mp4's bytes vary run to run (x264 threads); the frames must not
        write(sink, frames)

    monkeypatch.setattr(VideoFileSink, "write", recording_write)
    before = decode_processes()
    common = ["generate", "--preset", "tiny", "--frames", "33", "--height", "32", "--width", "32", "--steps", "1000",
              "--dtype", "float32", "--seed", "4"]
    videos = []
    for extra in ([], ["--decode-device", "cpu"]):
        written.clear()
        assert main([*common, *extra, "-o", str(tmp_path / f"{len(videos)}.mp4")]) == 0
        videos.append(np.concatenate(written))
    assert videos[0].shape == (33, 32, 32, 3) and np.array_equal(videos[0], videos[1])
    assert "decoded in PreviewDecoderRecipe in a decode process on cpu" in capsys.readouterr().out
    assert decode_processes() <= before  # the decode process is gone


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--preset", "tiny", "--decode-device", "gpu"], "--decode-device 'gpu' is not a device"),
        (["generate", "--decode-device", "cpu"], "`generate` decodes the world model in this process"),
        (["vcam", "--simulator", "--decode-device", "cpu"], "takes no --weights/--family/--decode-device"),
    ],
)
def test_bad_decode_devices_give_one_clear_error(tmp_path, capsys, argv: list, message: str) -> None:
    before = decode_processes()
    assert main([*argv, *(["-o", str(tmp_path / "x.mp4")] if argv[0] == "generate" else [])]) == 2
    assert message in capsys.readouterr().err
    assert decode_processes() <= before
