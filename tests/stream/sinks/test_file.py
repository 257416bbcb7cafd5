import av
import numpy as np
import pytest

from framecast.models.errors import SessionClosed, ShapeError
from framecast.stream.sinks.file import VideoFileSink


def test_frames_round_trip_with_pts_on_the_frame_rate(tmp_path) -> None:
    sink = VideoFileSink(tmp_path / "v.mp4", fps=16)
    gradient = np.broadcast_to(np.linspace(0, 255, 64, dtype=np.uint8)[None, None, :, None], (8, 32, 64, 3)).copy()
    sink.write(gradient)
    sink.close()
    sink.close()  # idempotent
    with av.open(str(tmp_path / "v.mp4")) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 8
    assert [float(f.time) for f in frames] == pytest.approx([i / 16 for i in range(8)])
    assert np.abs(frames[3].to_ndarray(format="rgb24").astype(int) - gradient[3]).mean() < 4


def test_bad_frames_and_writes_after_close_raise(tmp_path) -> None:
    sink = VideoFileSink(tmp_path / "v.mp4", fps=16)
    with pytest.raises(ShapeError, match=r"uint8 \[N, H, W, 3\]"):
        sink.write(np.zeros((2, 16, 16, 3), dtype=np.float32))
    sink.write(np.zeros((1, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(ShapeError, match="differs from the stream"):
        sink.write(np.zeros((1, 32, 16, 3), dtype=np.uint8))
    sink.close()
    with pytest.raises(SessionClosed, match="closed"):
        sink.write(np.zeros((1, 16, 16, 3), dtype=np.uint8))
