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


# live input (stream/live_input.py)
import glob  # noqa: E402
import io  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from PIL import Image  # noqa: E402

from framecast.models.errors import BadMessage, ConfigError, ShapeError  # noqa: E402
from framecast.stream.live_input import (  # noqa: E402
    MID_GRAY, FrameFeed, InputKind, InputSpec, LiveFrames, LiveFramesConfig, decode_ingest_frame, file_pictures,
    open_webcam, pack_ingest_frame, parse_input, webcam_pictures,
)


def numbered(count: int, size: int = 8) -> list[np.ndarray]:
    """Frames whose pixels all hold their own number (frame i is i everywhere)."""
    return [np.full((size, size, 3), i, np.uint8) for i in range(count)]


def live(capacity: int = 64, max_wait_s: float = 0.0, size: int = 8) -> LiveFrames:
    return LiveFrames(LiveFramesConfig(width=size, height=size, capacity_frames=capacity, max_wait_s=max_wait_s))


def test_live_frames_feed_the_latent_source_in_the_vae_grouping() -> None:
    torch.manual_seed(0)
    vae = WanVAE(VAE_PRESETS["tiny"], encoder=True).double().eval()
    frames = live(size=16)
    source = LatentSource(WanVAEEncodeStream(vae), frames, chunk_frames=2)
    sent = [np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8) for i in range(5 + 8)]
    chunks = []
    for group in (sent[:5], sent[5:]):  # input at the stream's rate: exactly one group per chunk
        for frame in group:
            frames.put(frame)
        assert source.group_frames == len(group)  # 1 + 4(2-1) = 5 first, then 4 * 2 = 8
        chunks.append(next(iter(source)))
    video = torch.from_numpy(np.stack(sent)).permute(3, 0, 1, 2).unsqueeze(0).double() / 127.5 - 1
    with torch.no_grad():
        whole = vae.encode(video).transpose(1, 2)
    torch.testing.assert_close(torch.cat(chunks, dim=1), whole, rtol=0, atol=1e-12)
    assert (frames.dropped, frames.repeated, frames.stalls) == (0, 0, 0)


def test_a_faster_input_is_thinned_evenly_to_the_newest_and_drops_are_counted() -> None:
    frames = live()
    for frame in numbered(30):
        frames.put(frame)
    group = frames.take(12)
    picked = group[:, 0, 0, 0].tolist()
    assert picked[-1] == 29 and picked[0] == 0 and picked == sorted(set(picked))  # evenly from oldest to newest
    assert max(np.diff(picked)) - min(np.diff(picked)) <= 1
    assert (frames.received, frames.dropped, frames.repeated) == (30, 18, 0)


def test_past_capacity_the_oldest_frames_are_dropped() -> None:
    frames = live(capacity=8)
    for frame in numbered(20):
        frames.put(frame)
    assert frames.take(8)[:, 0, 0, 0].tolist() == list(range(12, 20))
    assert frames.dropped == 12


def test_a_slower_input_has_frames_repeated_and_a_stalled_one_repeats_the_last() -> None:
    frames = live(max_wait_s=0.05)
    assert (frames.take(4) == MID_GRAY).all()  # nothing yet: mid-gray, after waiting at most max_wait_s
    for frame in numbered(3):
        frames.put(frame)
    picked = frames.take(9)[:, 0, 0, 0].tolist()
    assert picked == sorted(picked) and set(picked) == {0, 1, 2} and picked[-1] == 2
    start = time.monotonic()
    assert frames.take(4)[:, 0, 0, 0].tolist() == [2, 2, 2, 2]  # stalled: the last frame again
    assert 0.04 <= time.monotonic() - start < 1.0
    assert (frames.repeated, frames.stalls, frames.dropped) == (4 + 6 + 4, 2, 0)


def test_discarded_frames_are_counted_and_the_newest_is_what_a_stall_repeats() -> None:
    frames = live()
    for frame in numbered(5):
        frames.put(frame)
    frames.discard()
    assert frames.take(3)[:, 0, 0, 0].tolist() == [4, 4, 4]
    assert (frames.dropped, frames.stalls) == (4, 1)


def test_a_take_waits_for_the_next_frame_and_close_wakes_it() -> None:
    frames = live(max_wait_s=5.0)
    threading.Timer(0.05, frames.put, [np.full((8, 8, 3), 7, np.uint8)]).start()
    start = time.monotonic()
    assert frames.take(2)[:, 0, 0, 0].tolist() == [7, 7]
    assert time.monotonic() - start < 2.0  # it came when the frame did, not after max_wait_s
    threading.Timer(0.05, frames.close).start()
    assert frames.take(2) is None


def test_frames_are_resized_to_the_model_size_and_must_be_rgb() -> None:
    frames = live(size=16)
    frames.put(np.full((48, 64, 3), 200, np.uint8))
    group = frames.take(1)
    assert group.shape == (1, 16, 16, 3) and (group == 200).all()
    with pytest.raises(ShapeError, match="input frames must be uint8"):
        frames.put(np.zeros((8, 8), np.uint8))
    with pytest.raises(ConfigError, match="capacity_frames=0 must be an integer >= 1"):
        LiveFramesConfig(width=8, height=8, capacity_frames=0)


def test_ingest_messages_decode_raw_rgb_and_jpeg() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    assert np.array_equal(decode_ingest_frame(pack_ingest_frame(rgb), 24, 16), rgb)
    assert decode_ingest_frame(pack_ingest_frame(rgb), 12, 8).shape == (8, 12, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 48, 3), (10, 200, 60), np.uint8)).save(buffer, format="JPEG", quality=95)
    picture = decode_ingest_frame(pack_ingest_frame(jpeg=buffer.getvalue(), size=(48, 32)), 24, 16)
    assert picture.shape == (16, 24, 3) and np.abs(picture.astype(int) - (10, 200, 60)).max() <= 3
    with pytest.raises(BadMessage, match="JPEG frame has no start-of-frame marker"):
        decode_ingest_frame(pack_ingest_frame(jpeg=b"", size=(8, 8)), 8, 8)


def test_input_argument_parsing() -> None:
    assert parse_input("ws") == InputSpec(InputKind.WEBSOCKET)
    assert parse_input("webcam") == InputSpec(InputKind.WEBCAM)
    assert parse_input("webcam:/dev/video2") == InputSpec(InputKind.WEBCAM, "/dev/video2")
    assert parse_input("clips/in.mp4") == InputSpec(InputKind.FILE, "clips/in.mp4")
    with pytest.raises(ConfigError, match="names no device"):
        parse_input("webcam:")


@pytest.mark.skipif(bool(glob.glob("/dev/video63")), reason="/dev/video63 exists here")
def test_a_missing_webcam_names_the_device_and_the_capture_formats() -> None:
    with pytest.raises(ConfigError) as error:
        open_webcam("/dev/video63")
    message = str(error.value)
    assert "cannot open webcam '/dev/video63'" in message
    assert all(name in message for name in ("v4l2", "avfoundation", "dshow"))


@pytest.mark.skipif(not glob.glob("/dev/video*"), reason="no /dev/video* capture device here")
def test_a_real_webcam_feeds_frames() -> None:
    frames = live(max_wait_s=5.0, size=32)
    feed = FrameFeed(frames, webcam_pictures(sorted(glob.glob("/dev/video*"))[0]), name="webcam", paced=False,
                     loop=False)
    feed.start()
    try:
        group = frames.take(1)
    finally:
        feed.close()
    assert feed.failure is None and frames.received >= 1 and group.shape == (1, 32, 32, 3)


def test_a_file_plays_at_its_own_rate_and_loops(tmp_path) -> None:
    path = tmp_path / "in.mp4"
    sink = VideoFileSink(path, fps=50)
    sink.write(np.stack(numbered(10, size=16)) * 20)  # 0.2 s
    sink.close()
    frames = live(capacity=256, size=16)
    feed = FrameFeed(frames, file_pictures(str(path)), name=str(path), paced=True, loop=True)
    feed.start()
    time.sleep(0.5)
    feed.close()
    assert feed.failure is None
    assert 15 <= frames.received <= 32  # 50 fps for ~0.5 s: looped past the file's 10 frames, not faster than 50 fps
