import glob
import platform

import av
import pytest
import torch
from safetensors.torch import load_file

from framecast.stream.cli import main


def test_generate_writes_the_requested_frames_and_latents(tmp_path, capsys) -> None:
    video, latents = tmp_path / "out.mp4", tmp_path / "latents.safetensors"
    code = main(["generate", "--preset", "tiny", "--frames", "20", "--height", "64", "--width", "96", "-o", str(video),
                 "--latents-out", str(latents), "--steps", "1000,500", "--dtype", "float32"])
    assert code == 0
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
    assert len(frames) == 20 and (frames[0].width, frames[0].height) == (96, 64)
    assert load_file(latents)["latents"].shape == (1, 6, 16, 8, 12)  # 1 + ceil(19 / 4) = 6 latent frames, 2 chunks
    assert "wrote 20 frames" in capsys.readouterr().out


def test_different_prompts_give_different_videos(tmp_path) -> None:
    outputs = []
    for prompt in ("a red fox", "a blue whale"):
        path = tmp_path / f"{prompt}.safetensors"
        argv = ["generate", "--preset", "tiny", "--prompt", prompt, "--frames", "1", "--latents-out", str(path),
                "--dtype", "float32"]
        assert main(argv) == 0
        outputs.append(load_file(path)["latents"])
    assert not (outputs[0] == outputs[1]).all()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--preset", "tiny", "--dtype", "float16", "--device", "cpu"], "float16 on the CPU"),
        (["--preset", "tiny", "--height", "100"], "multiples of 16"),
        (["--preset", "tiny", "--window-frames", "2"], "sink_frames=3 must be in"),
        (["--preset", "tiny", "--prompt", "!!!"], "has no words"),
    ],
)
def test_bad_arguments_give_one_clear_error(tmp_path, capsys, argv: list, message: str) -> None:
    assert main(["generate", "-o", str(tmp_path / "x.mp4"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_generate_with_a_checkpoint_uses_its_weights(tmp_path) -> None:
    import torch

    from framecast.models.config import preset
    from framecast.models.dit import CausalWanDiT
    from framecast.models.loading import save_dit

    outputs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        weights = tmp_path / f"dit{seed}.safetensors"
        save_dit(CausalWanDiT(preset("tiny")), weights)
        latents = tmp_path / f"latents{seed}.safetensors"
        argv = ["generate", "--weights", str(weights), "--frames", "1", "--latents-out", str(latents), "--dtype", "float32"]
        assert main(argv) == 0
        outputs.append(load_file(latents)["latents"])
    assert not torch.equal(outputs[0], outputs[1])


def test_generate_decodes_with_taehv(tmp_path) -> None:
    import torch

    from framecast.models.taehv import TAEHV, preset as taehv_preset

    torch.manual_seed(0)
    weights = tmp_path / "taehv.pth"
    torch.save(TAEHV(taehv_preset("tiny")).state_dict(), weights)
    video = tmp_path / "out.mp4"
    argv = ["generate", "--preset", "tiny", "--frames", "9", "--height", "32", "--width", "48", "-o", str(video),
            "--dtype", "float32", "--decoder", "taehv", "--decoder-weights", str(weights)]
    assert main(argv) == 0
    with av.open(str(video)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 9 and (frames[0].width, frames[0].height) == (48, 32)


def test_real_decoder_needs_weights(tmp_path, capsys) -> None:
    assert main(["generate", "--preset", "tiny", "-o", str(tmp_path / "x.mp4"), "--decoder", "taehv"]) == 2
    assert "needs --decoder-weights" in capsys.readouterr().err


def test_family_errors_name_what_is_missing(tmp_path, capsys) -> None:
    assert main(["generate", "--family", "self-forcing", "-o", str(tmp_path / "x.mp4")]) == 2
    assert "--family self-forcing needs --weights" in capsys.readouterr().err
    assert main(["generate", "--family", "self-forcing", "--weights", str(tmp_path), "-o", str(tmp_path / "x.mp4")]) == 2
    error = capsys.readouterr().err
    assert "self_forcing_dmd.pt" in error and "gdhe17/Self-Forcing" in error
    assert main(["generate", "--family", "self-forcng", "--weights", str(tmp_path), "-o", str(tmp_path / "x.mp4")]) == 2
    assert "did you mean self-forcing" in capsys.readouterr().err


def test_video_input_needs_the_wan_vae(tmp_path, capsys) -> None:
    argv = ["generate", "--preset", "tiny", "--input", str(tmp_path / "in.mp4"), "-o", str(tmp_path / "x.mp4")]
    assert main(argv) == 2
    assert "--input needs --decoder wan-vae" in capsys.readouterr().err


def test_serve_command_serves_the_page_and_metrics_on_loopback() -> None:
    import urllib.request

    from tests.serving import framecast_serve

    args = ("--preset", "tiny", "--height", "32", "--width", "32", "--dtype", "float32")
    with framecast_serve(*args, token="t0k") as served:
        with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/metrics", timeout=2) as response:
            assert "framecast_" in response.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/", timeout=2) as response:
            assert response.status == 200
    assert f"127.0.0.1:{served.port}" in served.output and "t0k" in served.output


NO_VIDEO_DEVICE = platform.system() == "Linux" and not glob.glob("/dev/video*")


@pytest.mark.skipif(not NO_VIDEO_DEVICE, reason="needs Linux without /dev/video* (no v4l2loopback device loaded)")
@pytest.mark.parametrize("command", [["vcam"], ["serve", "--vcam"]])
def test_without_a_virtual_camera_driver_vcam_says_how_to_load_one(capsys, command: list) -> None:
    assert main([*command, "--preset", "tiny", "--backend", "v4l2loopback", "--dtype", "float32"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("framecast: error: could not open any virtual camera device ('v4l2loopback' backend: No")
    assert "sudo modprobe v4l2loopback devices=1 exclusive_caps=1" in error


def test_camera_flags_without_vcam_are_refused(capsys) -> None:
    assert main(["serve", "--preset", "tiny", "--camera-device", "/dev/video3"]) == 2
    assert "--camera-device and --backend choose the virtual camera: add --vcam" in capsys.readouterr().err


def test_vcam_streams_the_model_to_the_camera(capsys) -> None:
    import pyvirtualcam

    from tests.stream.sinks.test_vcam import RecordingCamera

    pyvirtualcam.register_backend("framecast-cli-recording", RecordingCamera)
    RecordingCamera.opened.clear()
    try:
        argv = ["vcam", "--preset", "tiny", "--backend", "framecast-cli-recording", "--camera-device", "studio",
                "--seconds", "1.5", "--height", "32", "--width", "48", "--output-scale", "2", "--dtype", "float32",
                "--fps", "8"]
        assert main(argv) == 0
    finally:
        pyvirtualcam.camera.BACKENDS.pop("framecast-cli-recording")
    (camera,) = RecordingCamera.opened
    assert (camera.width, camera.height, camera.fps, camera.device()) == (96, 64, 8.0, "studio")
    assert camera.closed == 1 and len(camera.frames) >= 2
    assert all(frame.shape == (64 * 96 * 3,) for frame in camera.frames)
    out = capsys.readouterr().out
    assert "framecast: virtual camera studio (framecast-cli-recording): 96x64 at 8 fps" in out
    assert f"framecast: {len(camera.frames)} frames sent to the virtual camera" in out


def test_the_simulator_streams_the_world_under_the_first_prompt(capsys) -> None:
    import numpy as np
    import pyvirtualcam

    from framecast.models.world.ground_truth import read_setting
    from tests.stream.sinks.test_vcam import RecordingCamera

    pyvirtualcam.register_backend("framecast-cli-simulator", RecordingCamera)
    RecordingCamera.opened.clear()
    try:
        argv = ["vcam", "--simulator", "--prompt", "sand at dusk", "--backend", "framecast-cli-simulator",
                "--seconds", "1.5", "--fps", "16", "--latency-budget", "0.25"]
        assert main(argv) == 0
    finally:
        pyvirtualcam.camera.BACKENDS.pop("framecast-cli-simulator")
    (camera,) = RecordingCamera.opened
    assert len(camera.frames) >= 4
    setting = read_setting(np.asarray(camera.frames[-1]).reshape(128, 128, 3))
    assert (setting.terrain.value, setting.time.value) == ("sand", "dusk")


def test_the_simulator_refuses_prompts_outside_its_vocabulary(capsys) -> None:
    assert main(["vcam", "--simulator", "--prompt", "a purple lake", "--backend", "v4l2loopback"]) == 2
    assert "unknown word 'purple'" in capsys.readouterr().err


def test_generate_over_two_stage_processes_writes_exactly_the_one_process_latents(tmp_path) -> None:
    from safetensors.torch import load_file

    common = ["generate", "--preset", "tiny", "--frames", "17", "--height", "32", "--width", "32", "--dtype", "float32",
              "--seed", "3"]
    assert main([*common, "--latents-out", str(tmp_path / "one.safetensors")]) == 0
    assert main([*common, "--stages", "2", "--stage-devices", "cpu,cpu", "--backend", "gloo", "--latents-out",
                 str(tmp_path / "two.safetensors")]) == 0
    one, two = (load_file(str(tmp_path / f"{name}.safetensors"))["latents"] for name in ("one", "two"))
    assert one.shape == two.shape and torch.equal(one, two)


def test_generate_stages_refuses_what_it_cannot_split(tmp_path, capsys) -> None:
    assert main(["generate", "--preset", "tiny", "--stages", "0", "-o", str(tmp_path / "x.mp4")]) == 2
    assert "--stages=0 must be >= 1" in capsys.readouterr().err
    assert main(["vcam", "--stages", "2", "--simulator", "--backend", "v4l2loopback"]) == 2
    assert "--stages does not take --family, --input or --simulator" in capsys.readouterr().err
    # refused before any model is built
    assert main(["bench", "--preset", "tiny", "--stages", "2", "--device", "meta"]) == 2
    assert "--stages runs stage processes on the CPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stages", "2", "--stage-devices", "cpu"], "names 1 device(s) (cpu); --stages 2 needs one per stage"),
        (["--stages", "2", "--stage-devices", "cpu,tpu"], "--stage-devices entry 'tpu' is not a device"),
        (["--stages", "2", "--stage-devices", "cpu,meta"], "device kind 'meta' is not supported"),
        (["--stage-devices", "cpu"], "--stage-devices and --backend place the stage processes of --stages N"),
        (["--backend", "gloo"], "--stage-devices and --backend place the stage processes of --stages N"),
    ]
    + ([(["--stages", "2", "--backend", "nccl"], "--backend nccl needs CUDA, which this machine does not have"),
        (["--stages", "2", "--stage-devices", "cuda:0,cuda:1"], "'cuda:0': CUDA is not available")]
       if not torch.cuda.is_available() else
       [(["--stages", "2", "--stage-devices", "cpu,cpu", "--backend", "nccl"], "every --stage-devices entry must be")]),
)
def test_stage_placement_flags_are_checked_before_any_model_is_built(tmp_path, capsys, argv: list, message: str):
    for command in (["generate", "-o", str(tmp_path / "x.mp4")], ["bench"]):
        assert main([*command, "--preset", "tiny", "--device", "cpu", *argv]) == 2
        assert message in capsys.readouterr().err


def test_vcam_streams_a_model_split_over_two_stage_processes(capsys) -> None:
    import pyvirtualcam

    from tests.stream.sinks.test_vcam import RecordingCamera

    pyvirtualcam.register_backend("framecast-cli-stages", RecordingCamera)
    RecordingCamera.opened.clear()
    try:
        argv = ["vcam", "--preset", "tiny", "--stages", "2", "--backend", "framecast-cli-stages", "--seconds", "2.0",
                "--height", "32", "--width", "32", "--dtype", "float32", "--fps", "16", "--latency-budget", "0.5"]
        assert main(argv) == 0
    finally:
        pyvirtualcam.camera.BACKENDS.pop("framecast-cli-stages")
    (camera,) = RecordingCamera.opened
    assert camera.closed == 1 and len(camera.frames) >= 8


def test_bench_runs_a_two_stage_pipeline_under_the_deadline_scheduler(tmp_path) -> None:
    import json

    argv = ["bench", "--preset", "tiny", "--stages", "2", "--seconds", "1.5", "--dtype", "float32", "--height", "32",
            "--width", "32", "--json", str(tmp_path / "bench.json")]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "bench.json").read_text())
    assert summary["frames_at_sink"] >= 30 and summary["deadline"]["frames"] >= 30


def test_bench_decodes_in_a_decode_stage_process(tmp_path) -> None:
    import json

    argv = ["bench", "--preset", "tiny", "--decode-device", "cpu", "--seconds", "1.0", "--dtype", "float32",
            "--height", "32", "--width", "32", "--json", str(tmp_path / "bench.json")]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "bench.json").read_text())
    assert summary["frames_at_sink"] >= 16 and summary["deadline"]["frames"] >= 16


def test_stream_batch_over_two_stages_writes_exactly_the_one_process_latents(tmp_path) -> None:
    """--stream-batch: one stream's steps in flight at once; the same latents in one process and over 2 stages, and
    not those of the chunk sampler."""
    from safetensors.torch import load_file

    common = ["generate", "--preset", "tiny", "--frames", "17", "--height", "32", "--width", "32", "--dtype", "float32",
              "--seed", "3"]
    for name, extra in (("chunk", []), ("one", ["--stream-batch"]), ("two", ["--stream-batch", "--stages", "2"])):
        assert main([*common, *extra, "--latents-out", str(tmp_path / f"{name}.safetensors")]) == 0
    chunk, one, two = (load_file(str(tmp_path / f"{name}.safetensors"))["latents"] for name in ("chunk", "one", "two"))
    assert one.shape == two.shape == chunk.shape and torch.equal(one, two) and not torch.equal(one, chunk)


def test_bench_with_stream_batch_degrades_by_frames_only(tmp_path) -> None:
    import json

    argv = ["bench", "--preset", "tiny", "--stream-batch", "--seconds", "1.0", "--dtype", "float32", "--height", "32",
            "--width", "32", "--load", "2", "--json", str(tmp_path / "bench.json")]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "bench.json").read_text())
    assert summary["frames_at_sink"] >= 8 and summary["degradations"]["fewer_steps"] == 0


def test_memory_profile_sets_the_family_and_refuses_a_clash(tmp_path, capsys) -> None:
    """--memory-profile 24gb names the self-forcing family (whose weights are then asked for), and refuses a flag it
    sets given with another value; an unknown profile lists the known ones."""
    out = ["generate", "-o", str(tmp_path / "x.mp4"), "--memory-profile"]
    assert main([*out, "24gb"]) == 2
    assert "self-forcing" in capsys.readouterr().err
    assert main([*out, "24gb", "--height", "64"]) == 2
    assert "drop --height 64" in capsys.readouterr().err
    assert main([*out, "48gb"]) == 2
    assert "24gb" in capsys.readouterr().err
    assert main([*out, "24gb", "--stream-batch"]) == 2
    assert "does not go with --stream-batch" in capsys.readouterr().err
