"""The websocket sink's frame messages: header layout, raw and JPEG pictures, malformed headers."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from framecast.models.errors import BadMessage, ShapeError
from framecast.stream.deadline import Action
from framecast.stream.producer import VideoFrame
from framecast.stream.sinks.websocket import (
    FRAME_HEADER, FrameFormat, FrameHeader, JpegEncoder, pack_frame, unpack_frame,
)


def gradient_frame(index: int = 5) -> VideoFrame:
    x = np.linspace(0, 255, 64, dtype=np.float32)
    rgb = np.stack(np.broadcast_arrays(x[None, :], x[:, None], np.full((64, 64), 128.0)), axis=-1).astype(np.uint8)
    return VideoFrame(index, index * 5625, 1.0, rgb, Action.GENERATE)


def test_raw_frames_round_trip_with_their_header() -> None:
    frame = gradient_frame()
    data = pack_frame(frame, FrameFormat.RGB, dropped=3)
    assert len(data) == FRAME_HEADER.size + 64 * 64 * 3 and FRAME_HEADER.size == 22
    header, payload = unpack_frame(data)
    assert header == FrameHeader(FrameFormat.RGB, 64, 64, 5, 5 * 5625, 3)
    assert np.array_equal(np.frombuffer(payload, np.uint8).reshape(64, 64, 3), frame.rgb)


def test_jpeg_frames_decode_close_to_the_original() -> None:
    frame = gradient_frame()
    encoder = JpegEncoder()
    header, payload = unpack_frame(pack_frame(frame, FrameFormat.JPEG, dropped=0, jpeg=encoder))
    assert header.format is FrameFormat.JPEG and (header.width, header.height) == (64, 64)
    assert payload[:2] == b"\xff\xd8"  # JPEG start of image
    decoded = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
    assert np.abs(decoded.astype(int) - frame.rgb).mean() < 6
    smaller = VideoFrame(6, 6 * 5625, 1.0, frame.rgb[:32, :48].copy(), Action.GENERATE)
    assert unpack_frame(pack_frame(smaller, FrameFormat.JPEG, 0, encoder))[0].width == 48  # a new size reopens


def test_malformed_frames_are_refused_with_the_reason() -> None:
    data = pack_frame(gradient_frame(), FrameFormat.RGB, dropped=0)
    with pytest.raises(BadMessage) as info:
        unpack_frame(data[:10])
    assert str(info.value) == "frame message is 10 bytes; the header alone is 22"
    with pytest.raises(BadMessage) as info:
        unpack_frame(bytes([2]) + data[1:])
    assert str(info.value) == "frame header version 2; expected 1"
    with pytest.raises(BadMessage) as info:
        unpack_frame(data[:1] + bytes([9]) + data[2:])
    assert str(info.value) == "frame format code 9; expected one of [0, 1]"
    with pytest.raises(BadMessage) as info:
        unpack_frame(data[:-1])
    assert str(info.value) == "raw frame of 12287 bytes; 64x64 RGB needs 12288"
    bad = VideoFrame(0, 0, 0.0, np.zeros((4, 4, 3), np.float32), Action.GENERATE)
    with pytest.raises(ShapeError, match=r"frame 0: expected uint8 \[H, W, 3\]"):
        pack_frame(bad, FrameFormat.RGB, 0)
