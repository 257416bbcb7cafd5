"""The shared JPEG cache: one encode per frame for any number of viewers, real JPEGs, bounded, thread-safe."""

from __future__ import annotations

import asyncio
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import av
import numpy as np
import pytest
from PIL import Image

from framecast.models.errors import ConfigError, ShapeError
from framecast.stream.deadline import Action
from framecast.stream.producer import VideoFrame
from framecast.stream.sinks import jpeg as jpeg_module
from framecast.stream.sinks.jpeg import JpegEncoder, SharedJpeg, jpeg_of


def frame_of(index: int, height: int = 64, width: int = 64) -> VideoFrame:
    """A gradient picture that differs from frame to frame."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255) // max(width - 1, 1), (y * 255) // max(height - 1, 1),
                    np.full_like(x, (index * 37) % 256)], axis=-1).astype(np.uint8)
    return VideoFrame(index, index * 5625, 0.0, rgb, Action.GENERATE)


def decode_with_pil(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_twenty_concurrent_viewers_of_a_frame_cost_one_encode() -> None:
    cache = SharedJpeg()
    frame = frame_of(1, 512, 512)

    async def viewers() -> list[bytes]:
        return await asyncio.gather(*(cache.encode_async(frame) for _ in range(20)))

    results = asyncio.run(viewers())
    assert cache.encodes == 1
    assert all(result is results[0] for result in results)  # the very same bytes object, not 20 copies
    assert cache.encode(frame) is results[0] and cache.encodes == 1  # a late viewer gets it from the cache


def test_threads_asking_for_the_same_frame_at_once_wait_for_one_encode() -> None:
    cache = SharedJpeg()
    frame = frame_of(2, 512, 512)
    start = threading.Barrier(8)

    def viewer(_: int) -> bytes:
        start.wait()
        return cache.encode(frame)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(viewer, range(8)))
    assert cache.encodes == 1 and len({id(result) for result in results}) == 1


def test_the_bytes_are_a_jpeg_of_the_frame_at_its_size() -> None:
    frame = frame_of(3, height=96, width=160)
    data = SharedJpeg().encode(frame)
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"  # start and end of image
    decoded = decode_with_pil(data)
    assert decoded.shape == (96, 160, 3)
    assert np.abs(decoded.astype(int) - frame.rgb).mean() < 6
    (picture,) = av.CodecContext.create("mjpeg", "r").decode(av.Packet(data))
    assert (picture.width, picture.height) == (160, 96)


def test_the_cache_keeps_only_the_last_frames() -> None:
    cache = SharedJpeg(capacity=3)
    frames = [frame_of(i) for i in range(10)]
    for frame in frames:
        cache.encode(frame)
    assert len(cache) == 3 and cache.encodes == 10
    cache.encode(frames[-1])  # still cached
    assert cache.encodes == 10
    cache.encode(frames[0])  # evicted long ago: encoded again, and the cache stays at its bound
    assert cache.encodes == 11 and len(cache) == 3


def test_frames_are_keyed_by_identity_not_index() -> None:
    cache = SharedJpeg()
    a, b = frame_of(7), frame_of(7)
    b.rgb[:] = 255 - b.rgb  # same index, another picture (e.g. another session's frame 7)
    assert decode_with_pil(cache.encode(a)).mean() != pytest.approx(decode_with_pil(cache.encode(b)).mean(), abs=5)
    assert cache.encodes == 2


def test_many_threads_over_many_frames_encode_each_frame_once() -> None:
    cache = SharedJpeg(capacity=64)
    frames = [frame_of(i, 128, 128) for i in range(48)]
    orders = [list(range(48)) for _ in range(4)]
    for seed, order in enumerate(orders):
        np.random.default_rng(seed).shuffle(order)

    def viewer(order: list[int]) -> dict[int, bytes]:
        return {i: cache.encode(frames[i]) for i in order}

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(viewer, orders))
    assert cache.encodes == 48 and len(cache) == 48
    for i in range(48):
        assert len({id(result[i]) for result in results}) == 1


def test_a_failed_encode_reaches_every_waiter_and_is_not_cached() -> None:
    cache = SharedJpeg()
    bad = VideoFrame(0, 0, 0.0, np.zeros((8, 8, 3), np.float32), Action.GENERATE)

    async def viewers() -> list:
        return await asyncio.gather(*(cache.encode_async(bad) for _ in range(3)), return_exceptions=True)

    errors = asyncio.run(viewers())
    assert all(isinstance(error, ShapeError) for error in errors)
    assert "uint8 [H, W, 3]" in str(errors[0]) and len(cache) == 0 and cache.encodes == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="capacity=0 must be an integer >= 1"):
        SharedJpeg(capacity=0)
    with pytest.raises(ConfigError, match=r"quality=1 must be an integer in \[2, 31\]"):
        SharedJpeg(quality=1)


def test_the_process_cache_and_the_old_import_path() -> None:
    from framecast.stream.sinks.websocket import JpegEncoder as ReExported

    assert ReExported is JpegEncoder
    frame = frame_of(9)
    before = jpeg_module.SHARED.encodes
    assert jpeg_of(frame) is jpeg_of(frame) and jpeg_module.SHARED.encodes == before + 1


def test_a_viewer_that_leaves_mid_encode_does_not_cancel_it_for_the_others() -> None:
    cache = SharedJpeg()
    frame = frame_of(4, 1024, 1024)

    async def viewers() -> bytes:
        leaving = asyncio.create_task(cache.encode_async(frame))  # the first: it starts the encode
        staying = asyncio.create_task(cache.encode_async(frame))
        await asyncio.sleep(0)  # both are waiting on the one encode now
        leaving.cancel()
        return await staying

    data = asyncio.run(viewers())
    assert decode_with_pil(data).shape == (1024, 1024, 3) and cache.encodes == 1
    assert cache.encode(frame) is data  # cached for later viewers too
