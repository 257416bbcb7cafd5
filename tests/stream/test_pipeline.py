"""The pipeline-parallel orchestrator: bit-exact against StreamEngine over 2 and 3 gloo stage processes (prompt
switch and actions included), the same split in one process on random configs, and rebuild after a killed stage."""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import threading
import time

import pytest
import torch

from framecast.models.config import preset
from framecast.models.errors import ConfigError
from framecast.stream.engine import EngineConfig, StreamEngine, SwitchPolicy
from framecast.stream.executors import LocalExecutor
from framecast.stream.lane import Lane, run_on
from framecast.stream.model_source import RandomDiT
from framecast.stream.noise import GaussianNoise
from framecast.stream.pipeline import PipelineConfig, PipelineEngine
from tests.stream.test_engine import random_case

MODEL = RandomDiT(preset("tiny", num_layers=3, num_actions=4), torch.float64, seed=0, action_std=1.0)
CONFIG = EngineConfig(latent_height=2, latent_width=4, window_frames=9, sink_frames=3, context_noise=50)
CHUNKS = 6  # per lane
SWITCH_AFTER = 3  # lane 0 switches prompt (recache, after evictions) after this chunk; lane 1 changes its action


def prompt(seed: int, tokens: int = 5) -> torch.Tensor:
    return torch.randn(1, tokens, MODEL.config.text_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def reference_lanes() -> list[list[torch.Tensor]]:
    """Each lane as its own single-process StreamEngine (lane i draws noise from seed config.seed + i)."""
    lanes = []
    for lane in range(2):
        engine = StreamEngine(MODEL(), dataclasses.replace(CONFIG, seed=CONFIG.seed + lane), prompt(10 + lane))
        chunks = []
        for index, chunk in enumerate(itertools.islice(engine.chunks(), CHUNKS)):
            chunks.append(chunk.latents)
            if index == SWITCH_AFTER:
                engine.set_prompt(prompt(20, tokens=7), SwitchPolicy.RECACHE) if lane == 0 else engine.set_action([1, 3, 2])
        lanes.append(chunks)
    return lanes


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def expected() -> list[list[torch.Tensor]]:
    return reference_lanes()


@pytest.mark.parametrize("stages", [2, 3])
def test_pipeline_equals_single_process_engine_per_lane(stages: int, expected) -> None:
    """2 stages: layers also move between the stages mid-stream, back (stage 1 -> 0: the taker asks the giver
    downstream) and forth (0 -> 1: the layer rides on the packet), with their weights and both lanes' caches, inside
    chunks, around the prompt switch. 3 stages: a measured, balanced split, stage processes pinned to CPUs."""
    if stages == 2:
        pipeline = PipelineConfig(stages=2, layers_per_stage=(1, 2), rebalance=False, start_timeout_s=45, stage_timeout_s=20)
    else:
        pipeline = PipelineConfig(stages=3, pin_stages=True, start_timeout_s=45, stage_timeout_s=20)
    moves = {(0, 1): (1, 0), (1, 3): (1, 1)} if stages == 2 else {}
    with PipelineEngine(MODEL, CONFIG, [prompt(10), prompt(11)], pipeline) as engine:
        if stages == 3:
            assert [len(layers) for layers in engine.split] == [1, 1, 1]
            cpus = sorted(os.sched_getaffinity(0))
            assert [os.sched_getaffinity(p.pid) for p in engine.executor.processes] == [{cpus[i % len(cpus)]} for i in range(3)]
        got: list[list[torch.Tensor]] = [[], []]
        for item in engine.chunks():
            assert item.chunk.index == len(got[item.lane])  # in order, per lane
            got[item.lane].append(item.chunk.latents)
            if item.chunk.index == SWITCH_AFTER:
                if item.lane == 0:
                    engine.set_prompt(0, prompt(20, tokens=7), SwitchPolicy.RECACHE)
                else:
                    engine.set_action(1, [1, 3, 2])
            if (item.lane, item.chunk.index) in moves:
                engine.move_layer(*moves[item.lane, item.chunk.index])
            if min(len(chunks) for chunks in got) == CHUNKS:
                break
        assert not engine.rebuilds
        assert engine.migrations == list(moves.values())
        if stages == 2:
            assert engine.split == (range(0, 1), range(1, 3))
    for lane in range(2):
        for index in range(CHUNKS):
            assert torch.equal(got[lane][index], expected[lane][index]), f"lane {lane} chunk {index} differs"
    assert not torch.equal(expected[0][SWITCH_AFTER + 1], expected[1][SWITCH_AFTER + 1])


def test_unequal_stage_times_move_layers_while_running() -> None:
    """Split 1 + 3 of 4 equal layers: the measured stage times differ, so layers move until they no longer do."""
    model = RandomDiT(preset("tiny", num_layers=4, dim=192, ffn_dim=768, num_heads=2), torch.float32, seed=0)
    config = EngineConfig(latent_height=16, latent_width=16, window_frames=9, sink_frames=3)
    pipeline = PipelineConfig(stages=2, layers_per_stage=(1, 3), rebalance_window=8, start_timeout_s=45, stage_timeout_s=20)
    text = torch.randn(1, 5, model.config.text_dim)
    with PipelineEngine(model, config, [text], pipeline) as engine:
        for item in itertools.islice(engine.chunks(), 16):
            assert torch.isfinite(item.chunk.latents).all()
        assert engine.migrations and engine.migrations[0] == (1, 0)
        assert engine.split == (range(0, 2), range(2, 4))


def run_lane(lane: Lane, executor: LocalExecutor, chunks: int, controls, fewer) -> list[torch.Tensor]:
    out = []
    for index in range(chunks):
        lane.set_steps(fewer if index == 3 else None)
        out.append(run_on(lane.chunk_program(), executor).latents)
        controls(index)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_any_layer_split_in_one_process_equals_the_engine(seed: int) -> None:
    """The stage logic without transport, on the engine test's random configs (caches, linear attention, actions,
    batch 2, context noise), every split of the layers, a prompt switch of each policy, and a chunk with fewer
    steps."""
    dit, config, first = random_case(seed)
    layers = dit.config.num_layers
    policy = list(SwitchPolicy)[seed % 3]
    second = torch.randn_like(first)
    chunks = 5 if config.cache.value == "rolling" else min(5, config.window_frames // config.chunk_frames)

    def switch(target):
        return lambda index: target.set_prompt(second, policy) if index == 1 else None

    fewer = config.denoising_steps[:1] if len(config.denoising_steps) > 1 else None  # chunk 3: the first step only
    engine = StreamEngine(dit, config, first, noise=GaussianNoise(seed))
    expected = run_engine(engine, chunks, switch(engine), fewer)
    for cut in range(1, layers) if layers > 1 else [None]:
        split = (range(0, cut), range(cut, layers)) if cut else (range(layers),)
        lane = Lane(0, dit.config, config, first, dit.dtype, GaussianNoise(seed))
        got = run_lane(lane, LocalExecutor(dit, config, 1, split), chunks, switch(lane), fewer)
        for index, (a, b) in enumerate(zip(expected, got)):
            assert torch.equal(a, b), f"split {split} chunk {index} differs"


def run_engine(engine: StreamEngine, chunks: int, controls, fewer) -> list[torch.Tensor]:
    out = []
    for index in range(chunks):
        out.append(engine.next_chunk(steps=fewer if index == 3 else None).latents)
        controls(index)
    return out


def test_killed_stage_is_replaced_and_the_stream_goes_on_without_gap_or_repeat() -> None:
    pipeline = PipelineConfig(stages=2, start_timeout_s=45, stage_timeout_s=20)
    with PipelineEngine(MODEL, CONFIG, [prompt(10), prompt(11)], pipeline) as engine:
        victim = engine.executor.processes[1]
        killed_at: list[float] = []

        def kill() -> None:
            killed_at.append(time.monotonic())
            os.kill(victim.pid, signal.SIGKILL)

        seen: list[tuple[int, int, float]] = []
        for item in itertools.islice(engine.chunks(), 24):
            seen.append((item.lane, item.chunk.index, time.monotonic()))
            assert torch.isfinite(item.chunk.latents).all()
            if len(seen) == 7:
                threading.Timer(0.005, kill).start()  # mid-chunk: the stream is running when the stage dies
        assert killed_at and not victim.is_alive()
        assert len(engine.rebuilds) == 1 and engine.rebuilds[0].executor.startswith("local")
        rebuild = engine.rebuilds[0]
        assert rebuild.detected_at - killed_at[0] < 1.0, f"fault detected after {rebuild.detected_at - killed_at[0]:.2f} s"
        first_after = min(t for _, _, t in seen if t > rebuild.resumed_at)  # a chunk the rebuilt pipeline made
        assert first_after - killed_at[0] < 2.0, f"stream stalled {first_after - killed_at[0]:.2f} s"
        for lane in range(2):
            indices = [index for seen_lane, index, _ in seen if seen_lane == lane]
            assert indices == list(range(len(indices))), f"lane {lane}: {indices}"
        assert min(len([1 for s in seen if s[0] == lane]) for lane in range(2)) >= 10


def test_a_dead_stage_of_three_leaves_a_pipeline_of_two_warm_spares() -> None:
    pipeline = PipelineConfig(stages=3, start_timeout_s=45, stage_timeout_s=20, on_fault="fewer-stages", spares=2, standby=False)
    with PipelineEngine(MODEL, CONFIG, [prompt(10)], pipeline) as engine:
        stream = engine.chunks()
        first = [next(stream).chunk.index for _ in range(3)]
        busy = engine.stage_busy_seconds
        assert len(busy) == 3 and all(seconds > 0 for seconds in busy)
        spares = [process.pid for process, _ in engine.spare_pool._spares]
        killed = time.monotonic()
        os.kill(engine.executor.processes[2].pid, signal.SIGKILL)
        after = [next(stream).chunk.index]
        stall = time.monotonic() - killed
        after += [next(stream).chunk.index for _ in range(2)]
        assert first + after == list(range(6))
        assert len(engine.rebuilds) == 1 and engine.rebuilds[0].executor.startswith("pipeline of 2 stage processes")
        assert [process.pid for process in engine.executor.processes] == spares  # the warm spares took over
        assert [len(layers) for layers in engine.split] in ([1, 2], [2, 1])
        assert stall < 2.0, f"stream stalled {stall:.2f} s"
        assert len(engine.spare_pool) == 2  # refilled


def test_hung_stage_is_detected_by_its_timeout() -> None:
    pipeline = PipelineConfig(stages=2, start_timeout_s=45, stage_timeout_s=1.5, balance=False)
    with PipelineEngine(MODEL, CONFIG, [prompt(10)], pipeline) as engine:
        victim = engine.executor.processes[0]
        stream = engine.chunks()
        next(stream)
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            indices = [next(stream).chunk.index for _ in range(3)]
            stalled = time.monotonic() - start
        finally:
            if victim.is_alive():
                os.kill(victim.pid, signal.SIGKILL)
        assert indices == [1, 2, 3]
        assert len(engine.rebuilds) == 1 and "no answer in time" in engine.rebuilds[0].error
        assert 1.5 <= stalled < 1.5 + 5


def test_pipeline_config_errors_name_the_value() -> None:
    with pytest.raises(ConfigError, match=r"stages=0 must be an integer in \[1, 8\]"):
        PipelineConfig(stages=0)
    with pytest.raises(ConfigError, match="one entry per stage"):
        PipelineConfig(stages=2, layers_per_stage=(3,))
    with pytest.raises(ConfigError, match="on_fault='restart'"):
        PipelineConfig(on_fault="restart")
    with pytest.raises(ConfigError, match="backend='mpi'"):
        PipelineConfig(backend="mpi")
    with pytest.raises(ConfigError, match="spares=-1"):
        PipelineConfig(spares=-1)
    with pytest.raises(ConfigError, match=r"steps=\(750,\) must be a sub-list"):
        Lane(0, MODEL.config, CONFIG, prompt(1), torch.float64).set_steps((750,))
    with pytest.raises(ConfigError, match="add up to num_layers=3"):
        PipelineEngine(MODEL, CONFIG, [prompt(1)], PipelineConfig(stages=2, layers_per_stage=(1, 1), standby=False))


def test_lanes_refuse_a_guided_config() -> None:
    with pytest.raises(ConfigError, match="pipeline's lanes run unguided"):
        Lane(0, MODEL.config, dataclasses.replace(CONFIG, guidance=1.5), prompt(1), torch.float64)
