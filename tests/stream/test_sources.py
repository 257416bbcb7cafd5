import numpy as np
import pytest
import torch

from framecast.models.errors import CheckpointError
from framecast.models.vae import VAE_PRESETS, WanVAE, WanVAEEncodeStream
from framecast.stream.sinks.file import VideoFileSink
from framecast.stream.sources import LatentSource, video_file_frames


def test_latent_source_encodes_chunks_like_one_shot_encoding(tmp_path) -> None:
    torch.manual_seed(0)
    vae = WanVAE(VAE_PRESETS["tiny"], encoder=True).double().eval()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (16, 24, 3), dtype=np.uint8) for _ in range(1 + 4 * 5)]  # 6 latent frames
    chunks = list(LatentSource(WanVAEEncodeStream(vae), iter(frames), chunk_frames=3))
    assert [tuple(c.shape) for c in chunks] == [(1, 3, 16, 2, 3)] * 2
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).unsqueeze(0).double() / 127.5 - 1
    with torch.no_grad():
        whole = vae.encode(video).transpose(1, 2)
    torch.testing.assert_close(torch.cat(chunks, dim=1), whole, rtol=0, atol=1e-12)


def test_source_ends_with_its_input_and_reads_real_files(tmp_path) -> None:
    path = tmp_path / "in.mp4"
    sink = VideoFileSink(path, fps=16)
    sink.write(np.full((10, 32, 32, 3), 128, np.uint8))
    sink.close()
    frames = list(video_file_frames(path, 24, 16))
    assert len(frames) == 10 and frames[0].shape == (16, 24, 3)
    torch.manual_seed(0)
    vae = WanVAE(VAE_PRESETS["tiny"], encoder=True).eval()
    chunks = list(LatentSource(WanVAEEncodeStream(vae), iter(frames), chunk_frames=3))
    assert len(chunks) == 1  # 9 frames make the first chunk; 1 frame left is not a chunk


def test_unreadable_video_names_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(CheckpointError, match="cannot read input video .*bad.mp4"):
        next(video_file_frames(bad, 16, 16))
