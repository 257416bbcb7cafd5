"""Packets: the header describes the packet exactly (flags, memory operations, dtypes and shapes)."""

from __future__ import annotations

import pytest
import torch

from framecast.models.errors import ShapeError
from framecast.stream.wire import Begin, Kind, Packet


def test_header_round_trips_every_field() -> None:
    packet = Packet(
        lane=3, text=torch.zeros(2, 7, 5, dtype=torch.float64),
        tensors=(torch.zeros(2, 3, 16, 4, 6, dtype=torch.bfloat16), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64)),
        reset=True, begin=Begin.CHUNK, frames=3, commit=False, output=True, actions=True,
    )
    fields, shapes = Packet.layout(packet.header())
    assert fields == dict(kind=Kind.CALL, lane=3, reset=True, commit=False, output=True, actions=True,
                          begin=Begin.CHUNK, frames=3, has_text=True)
    assert shapes == [(torch.float64, (2, 7, 5)), (torch.bfloat16, (2, 3, 16, 4, 6)), (torch.float32, (2, 3)),
                      (torch.int64, (2, 3))]
    fields, shapes = Packet.layout(Packet(lane=0, begin=Begin.RECACHE, commit=True, kind=Kind.STOP).header())
    assert (fields["kind"], fields["begin"], fields["commit"], fields["has_text"], shapes) == (Kind.STOP, Begin.RECACHE, True, False, [])


def test_header_refuses_what_it_cannot_describe() -> None:
    with pytest.raises(ShapeError, match="7 dims; packets carry at most 6"):
        Packet(lane=0, tensors=(torch.zeros((1,) * 7),)).header()
    with pytest.raises(ShapeError, match="at most 7 tensors, not 8"):
        Packet(lane=0, tensors=tuple(torch.zeros(1) for _ in range(8))).header()
