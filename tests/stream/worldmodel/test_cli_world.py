import shutil
from pathlib import Path

import av
import pytest
import torch

from framecast.models.config import preset
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import CheckpointError
from framecast.models.loading import save_dit
from framecast.models.world.text_encoder import WorldTextEncoder, save_text_encoder
from framecast.stream.cli import main
from framecast.stream.worldmodel.bundle import WorldModel
from framecast.stream.worldmodel.recipe import AUTOENCODER_FILE, STUDENT_FILE, TEXT_ENCODER_FILE, WEIGHTS_DIR


@pytest.fixture(scope="module")
def random_world(tmp_path_factory) -> Path:
    """A world model folder with random DiT and text-encoder weights and the shipped autoencoder."""
    folder = tmp_path_factory.mktemp("random-world")
    torch.manual_seed(0)
    save_dit(CausalWanDiT(preset("world")).to(torch.bfloat16), folder / STUDENT_FILE)
    save_text_encoder(WorldTextEncoder(), folder / TEXT_ENCODER_FILE)
    shutil.copy(WEIGHTS_DIR / AUTOENCODER_FILE, folder / AUTOENCODER_FILE)
    return folder


@pytest.fixture
def one_thread():
    """One torch thread: two threads on a busy 2-core machine make a chunk ~100x slower (threads wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def error_of(argv: list, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", [["generate", "-o", "x.mp4"], ["bench"], ["serve"], ["vcam"]])
def test_the_world_model_refuses_other_frame_sizes_naming_128(tmp_path, capsys, command: list) -> None:
    error = error_of([*command, "--height", "64", "--world-weights", str(tmp_path)], capsys)
    assert "the world model makes 128x128 frames; --height/--width 64x128" in error


@pytest.mark.parametrize("flags, named", [
    (["--chunk-frames", "3"], "--chunk-frames"),
    (["--decoder", "preview"], "--decoder"),
    (["--latents-out", "latents.safetensors"], "--latents-out"),
    (["--window-frames", "12", "--shift", "3"], "--shift, --window-frames"),
])
def test_wan_only_flags_are_refused_by_name(tmp_path, capsys, flags: list, named: str) -> None:
    error = error_of(["generate", "--world-weights", str(tmp_path), "-o", str(tmp_path / "x.mp4"), *flags], capsys)
    assert f"error: {named}: the world model streams with its trained settings" in error


def test_bad_actions_are_refused_before_loading(tmp_path, capsys) -> None:
    error = error_of(["generate", "--world-weights", str(tmp_path), "-o", str(tmp_path / "x.mp4"),
                      "--actions", "right:2,fly"], capsys)
    assert "--actions part 'fly' must be KEY or KEY:FRAMES" in error and "none, up, down, left, right" in error


def test_bad_switch_is_refused_before_loading(tmp_path, capsys) -> None:
    error = error_of(["generate", "--world-weights", str(tmp_path), "-o", str(tmp_path / "x.mp4"),
                      "--switch", "at night"], capsys)
    assert "--switch 'at night' must be FRAME:PROMPT" in error


def test_stages_are_refused_for_the_world_model(tmp_path, capsys) -> None:
    error = error_of(["generate", "--world-weights", str(tmp_path), "-o", str(tmp_path / "x.mp4"), "--stages", "2"],
                     capsys)
    assert "--stages splits Wan-size models; the world model runs in one process" in error


@pytest.mark.parametrize("flag", ["--prompt", "--switch"])
def test_an_unknown_prompt_word_exits_2_naming_it(tmp_path, capsys, flag: str) -> None:
    text = "a purple circle" if flag == "--prompt" else "3:a purple circle"
    error = error_of(["generate", "--world-weights", str(tmp_path), "-o", str(tmp_path / "x.mp4"), flag, text], capsys)
    assert "unknown word 'purple'" in error and "vocabulary:" in error


def test_serve_refuses_an_unknown_prompt_word_before_loading(tmp_path, capsys) -> None:
    error = error_of(["serve", "--world-weights", str(tmp_path), "--prompt", "a purple circle"], capsys)
    assert "unknown word 'purple'" in error


def test_world_flags_are_refused_with_another_model(tmp_path, capsys) -> None:
    error = error_of(["generate", "--preset", "tiny", "-o", str(tmp_path / "x.mp4"), "--actions", "up"], capsys)
    assert "--actions, --switch, --world-dit and --world-weights are the world model's" in error


def test_missing_world_files_name_the_file_and_how_to_train_them(tmp_path, capsys) -> None:
    error = error_of(["generate", "--world-weights", str(tmp_path), "-o", str(tmp_path / "x.mp4")], capsys)
    assert f"world model files missing: {tmp_path / STUDENT_FILE}" in error and "framecast train world" in error
    assert not (tmp_path / "x.mp4").exists()


def test_loading_a_folder_without_the_text_encoder_names_it(random_world, tmp_path) -> None:
    for name in (STUDENT_FILE, AUTOENCODER_FILE):
        shutil.copy(random_world / name, tmp_path / name)
    with pytest.raises(CheckpointError) as error:
        WorldModel.load(tmp_path)
    message = str(error.value)
    assert str(tmp_path / TEXT_ENCODER_FILE) in message and "framecast train world" in message
    assert STUDENT_FILE not in message and AUTOENCODER_FILE not in message


def test_generate_streams_a_random_world_model_with_switches_and_actions(random_world, tmp_path, capsys,
                                                                         one_thread) -> None:
    video = tmp_path / "world.mp4"
    argv = ["generate", "--world-weights", str(random_world), "--frames", "7", "--switch", "3:at night",
            "--actions", "right:2,up", "-o", str(video)]
    assert main(argv) == 0
    with av.open(str(video)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 7 and {(f.width, f.height) for f in frames} == {(128, 128)}
    out = capsys.readouterr().out
    assert f"wrote 7 frames (128x128, 30 fps, world student, 3 steps) to {video}" in out
