"""Layer splits: the balanced split is the best contiguous split; sizes are checked; measured costs are real."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from framecast.models.config import preset
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import ConfigError
from framecast.stream.engine import EngineConfig
from framecast.stream.layer_split import (
    LayerCosts, balanced_split, even_split, measure_layer_seconds, move_layer, rebalance_move, split_from_sizes,
)


def brute_force_best(costs: LayerCosts, stages: int) -> float:
    layers = len(costs.blocks)
    best = float("inf")
    for cuts in itertools.combinations(range(1, layers), stages - 1):
        bounds = (0, *cuts, layers)
        split = tuple(range(a, b) for a, b in zip(bounds, bounds[1:]))
        best = min(best, max(costs.stage_seconds(split)))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_balanced_split_is_the_best_contiguous_split(seed: int) -> None:
    rng = random.Random(seed)
    layers = rng.randint(1, 9)
    stages = rng.randint(1, layers)
    costs = LayerCosts(rng.uniform(0, 3), tuple(rng.uniform(0.1, 2) for _ in range(layers)), rng.uniform(0, 3))
    split = balanced_split(costs, stages)
    assert len(split) == stages and split[0].start == 0 and split[-1].stop == layers
    assert all(len(r) >= 1 and a.stop == b.start for r, (a, b) in zip(split, zip(split, split[1:] + (range(layers, layers),))))
    assert max(costs.stage_seconds(split)) == pytest.approx(brute_force_best(costs, stages))


def test_a_heavy_embedding_moves_layers_off_the_first_stage() -> None:
    costs = LayerCosts(embed=4.0, blocks=(1.0,) * 8, head=0.0)
    assert balanced_split(costs, 2) == (range(0, 2), range(2, 8))
    assert even_split(8, 2) == (range(0, 4), range(4, 8))
    assert even_split(7, 3) == (range(0, 3), range(3, 5), range(5, 7))


@pytest.mark.parametrize("sizes", [(2, 2), (0, 3), (4,), (1, 1, 2)])
def test_split_sizes_must_cover_the_layers(sizes) -> None:
    with pytest.raises(ConfigError, match="add up to num_layers=3"):
        split_from_sizes(sizes, 3)


def test_measured_costs_cover_every_layer() -> None:
    torch.manual_seed(0)
    dit = CausalWanDiT(preset("tiny", num_layers=3))
    costs = measure_layer_seconds(dit, EngineConfig(latent_height=4, latent_width=4, window_frames=6, sink_frames=0), repeats=2)
    assert len(costs.blocks) == 3 and all(seconds > 0 for seconds in costs.blocks) and costs.embed > 0 and costs.head > 0


def test_rebalance_moves_a_layer_off_the_slowest_stage_only_when_it_helps() -> None:
    split = (range(0, 2), range(2, 8))
    assert rebalance_move([2.0, 6.0], split) == (2, 0)  # 1 s per layer on stage 1: 3 s / 5 s beats 6 s
    assert rebalance_move([5.0, 6.0], split) is None  # 6 s -> 6 s on stage 0: no better
    assert rebalance_move([1.0, 1.1], split) is None
    assert rebalance_move([3.0, 1.0, 1.0], (range(0, 3), range(3, 4), range(4, 5))) == (2, 1)
    assert rebalance_move([1.0, 3.0], (range(0, 7), range(7, 8))) is None  # a stage keeps at least one layer
    assert move_layer(split, 2, 0) == (range(0, 3), range(3, 8))
    assert move_layer(split, 1, 1) == (range(0, 1), range(1, 8))
    with pytest.raises(ConfigError, match="layer 4 cannot move to stage 0"):
        move_layer(split, 4, 0)
