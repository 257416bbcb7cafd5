"""Packets: the header describes the packet exactly (flags, memory operations, dtypes and shapes)."""

from __future__ import annotations

import threading

import pytest
import torch

from framecast.models.errors import ShapeError
from framecast.stream.wire import Begin, Group, Kind, Packet, free_port, open_group


def test_header_round_trips_every_field() -> None:
    packet = Packet(
        lane=3, text=torch.zeros(2, 7, 5, dtype=torch.float64),
        tensors=(torch.zeros(2, 3, 16, 4, 6, dtype=torch.bfloat16), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64)),
        reset=True, begin=Begin.CHUNK, frames=3, commit=False, output=True, actions=True, busy_us=(5, 7_000_000_000),
    )
    fields, shapes = Packet.layout(packet.header())
    assert fields == dict(kind=Kind.CALL, lane=3, reset=True, commit=False, output=True, actions=True,
                          begin=Begin.CHUNK, frames=3, has_text=True, busy_us=(5, 7_000_000_000, 0, 0, 0, 0, 0, 0))
    assert shapes == [(torch.float64, (2, 7, 5)), (torch.bfloat16, (2, 3, 16, 4, 6)), (torch.float32, (2, 3)),
                      (torch.int64, (2, 3))]
    fields, shapes = Packet.layout(Packet(lane=0, begin=Begin.RECACHE, commit=True, kind=Kind.STOP).header())
    assert (fields["kind"], fields["begin"], fields["commit"], fields["has_text"], shapes) == (Kind.STOP, Begin.RECACHE, True, False, [])


def test_header_refuses_what_it_cannot_describe() -> None:
    with pytest.raises(ShapeError, match="7 dims; packets carry at most 6"):
        Packet(lane=0, tensors=(torch.zeros((1,) * 7),)).header()
    with pytest.raises(ShapeError, match="tensor of dtype torch.complex64"):
        Packet(lane=0, tensors=(torch.zeros(2, dtype=torch.complex64),)).header()
    with pytest.raises(ShapeError, match="at most 6 tensors, not 7"):
        Packet(lane=0, tensors=tuple(torch.zeros(1) for _ in range(7))).header()


def test_packets_cross_a_gloo_group_in_frames() -> None:
    """Two ranks of a real gloo group in one process; small frames so that packets span several of them."""
    port = free_port()
    groups: dict[int, Group] = {}

    def join(rank: int) -> None:
        groups[rank] = open_group("gloo", "127.0.0.1", port, rank, 2, start_timeout_s=20, idle_timeout_s=20, frame_bytes=1024)

    threads = [threading.Thread(target=join, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert set(groups) == {0, 1}
    generator = torch.Generator().manual_seed(0)
    packets = [
        Packet(lane=1, text=torch.randn(1, 7, 5, generator=generator, dtype=torch.float64),
               tensors=(torch.randn(1, 300, 3, generator=generator).to(torch.bfloat16), torch.arange(6).view(2, 3)),
               begin=Begin.CHUNK, frames=3, output=True),
        Packet(lane=0, tensors=(torch.randn(5, generator=generator),), commit=True),  # fits one frame
        Packet(lane=2, kind=Kind.STOP),
    ]
    for packet in packets:
        groups[0].isend(packet, 1)
    received = [groups[1].recv(0) for _ in packets]
    groups[0].flush()
    for sent, got in zip(packets, received):
        assert (got.lane, got.kind, got.begin, got.frames, got.output, got.commit) == (
            sent.lane, sent.kind, sent.begin, sent.frames, sent.output, sent.commit)
        assert (got.text is None) == (sent.text is None)
        if sent.text is not None:
            assert torch.equal(got.text, sent.text)
        assert len(got.tensors) == len(sent.tensors)
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got.tensors, sent.tensors))
