"""Moving a layer between stages mid-stream, in one process: every memory policy keeps every number."""

from __future__ import annotations

import pytest
import torch

from framecast.models.config import AttentionKind, preset
from framecast.models.errors import ConfigError
from framecast.stream.engine import CacheKind, EngineConfig, StreamEngine
from framecast.stream.lane import AWAIT, Lane
from framecast.stream.migration import give_layer, pack, take_layer, unpack
from framecast.stream.model_source import RandomDiT
from framecast.stream.stage import Stage, stage_specs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


CASES = {
    "rolling": dict(window_frames=9, sink_frames=3),
    "sinks-follow": dict(window_frames=9, sink_frames=3, sinks_follow_window=True),
    "full": dict(cache=CacheKind.FULL, window_frames=24),
    "linear": dict(window_frames=9, sink_frames=3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layers_moving_inside_chunks_keep_the_stream_exact(case: str) -> None:
    attention = AttentionKind.LINEAR if case == "linear" else AttentionKind.SOFTMAX
    model = RandomDiT(preset("tiny", num_layers=3, attention=attention), torch.float64, seed=1)
    config = EngineConfig(latent_height=2, latent_width=4, context_noise=50, **CASES[case])
    prompt = torch.randn(1, 5, model.config.text_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    engine = StreamEngine(model(), config, prompt)
    expected = [engine.next_chunk().latents for _ in range(7)]

    stages = [Stage(model(), spec, config, lanes=1) for spec in stage_specs((range(0, 1), range(1, 3)))]
    lane = Lane(0, model.config, config, prompt, torch.float64)
    moves = {5: (1, 0), 11: (1, 1), 19: (1, 0), 26: (1, 1)}  # packet number -> (layer, destination stage)
    packets, got = 0, []
    for _ in range(7):
        program, value, output = lane.chunk_program(), None, None
        try:
            while True:
                packet = program.send(value)
                if packet is AWAIT:
                    value = output
                    continue
                for stage in stages:
                    packet = stage.run(packet)
                value, output = None, packet.tensors[0] if packet.output else None
                packets += 1
                if packets in moves:
                    layer, destination = moves[packets]
                    source = 1 - destination
                    take_layer(stages[destination], layer, give_layer(stages[source], layer))
        except StopIteration as stop:
            got.append(stop.value.latents)
    assert [stage.spec.layers for stage in stages] == [range(0, 1), range(1, 3)]
    for index, (a, b) in enumerate(zip(expected, got)):
        assert torch.equal(a, b), f"{case}: chunk {index} differs"


def test_a_stage_gives_only_an_end_layer_and_keeps_one() -> None:
    model = RandomDiT(preset("tiny", num_layers=3), torch.float32)
    config = EngineConfig(latent_height=2, latent_width=2)
    first, second = (Stage(model(), spec, config, lanes=2) for spec in stage_specs((range(0, 1), range(1, 3))))
    with pytest.raises(ConfigError, match=r"stage 0 \(layers range\(0, 1\)\) cannot give layer 0"):
        give_layer(first, 0)
    blob = give_layer(second, 2)
    with pytest.raises(ConfigError, match="cannot take layer 2: not adjacent"):
        take_layer(first, 2, blob)
    with pytest.raises(ConfigError, match="layer blob of 12 bytes"):
        take_layer(first, 1, torch.zeros(12, dtype=torch.uint8))


def test_pack_round_trips_mixed_dtypes() -> None:
    parts = [torch.randn(3, 5).to(torch.bfloat16), torch.arange(7), torch.randn(2, dtype=torch.float64)]
    back = unpack(pack(parts), [torch.empty_like(p) for p in parts])
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(parts, back))
    assert pack(parts).numel() == 32 + 56 + 16  # each part padded to 8 bytes
