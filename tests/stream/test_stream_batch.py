"""Stream-batch mode: the steps of successive chunks in flight at once. The one-process engine against a cache-free
reference, pipelines of 2 and 3 gloo stage processes bit-exact against the one-process engine (prompt switch,
actions, a layer moved), controls reaching each step slot with their chunk, and a killed stage."""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import threading
import time

import pytest
import torch

from framecast.models.config import AttentionKind, preset
from framecast.models.errors import ConfigError
from framecast.stream.engine import CacheKind, EngineConfig, StreamEngine, SwitchPolicy
from framecast.stream.model_source import RandomDiT
from framecast.stream.noise import GaussianNoise
from framecast.stream.pipeline import PipelineConfig, PipelineEngine, PipelineStream
from framecast.stream.reference import reference_stream_batch
from framecast.stream.stream_batch import StreamBatchEngine

MODEL = RandomDiT(preset("tiny", num_layers=3, num_actions=4), torch.float64, seed=0, action_std=1.0)
CONFIG = EngineConfig(latent_height=2, latent_width=4, window_frames=9, sink_frames=3, stream_batch=True)
CHUNKS = 6
SWITCH_AFTER = 2


def prompt(seed: int, tokens: int = 5) -> torch.Tensor:
    return torch.randn(1, tokens, MODEL.config.text_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


CASES = {
    "4 steps, rolling cache with sinks": {},
    "2 steps": {"denoising_steps": (1000, 500)},
    "1 step": {"denoising_steps": (1000,)},
    "full cache": {"cache": CacheKind.FULL, "window_frames": 33, "sink_frames": 0},  # S + 1 chunks run ahead
    "linear attention": {"cache": CacheKind.FULL, "window_frames": 6, "sink_frames": 0, "linear": True},
}


@pytest.mark.parametrize("case", CASES)
def test_engine_equals_the_cache_free_reference(case: str) -> None:
    """Each chunk's actions are those set before the call in which it enters slot 0: the first S + 1 chunks enter
    during the first call (chunk 0 comes out one tick after its last step, when chunk S has entered), chunk c > S
    during call c - S."""
    settings = dict(CASES[case])
    attention = AttentionKind.LINEAR if settings.pop("linear", False) else AttentionKind.SOFTMAX
    model = RandomDiT(preset("tiny", num_layers=3, num_actions=4, attention=attention), torch.float64, seed=0, action_std=1.0)
    config = dataclasses.replace(CONFIG, **settings)
    engine = StreamEngine(model(), config, prompt(1))
    assert isinstance(engine, StreamBatchEngine)
    slots = len(config.denoising_steps)
    generator = torch.Generator().manual_seed(3)
    calls = [torch.randint(0, 4, (1, config.chunk_frames), generator=generator) for _ in range(CHUNKS)]
    got = []
    for call in range(CHUNKS):
        engine.set_action(calls[call])
        chunk = engine.next_chunk()
        assert chunk.index == call and chunk.first_frame == call * config.chunk_frames
        got.append(chunk.latents)
    per_chunk = [calls[max(0, chunk - slots)] for chunk in range(CHUNKS)]
    expected = reference_stream_batch(model(), config, prompt(1), GaussianNoise(0), CHUNKS, torch.cat(per_chunk, dim=1))
    assert torch.allclose(torch.cat(got, dim=1), expected, rtol=0, atol=1e-12)


def one_process(lane: int, controls) -> list[torch.Tensor]:
    engine = StreamEngine(MODEL(), dataclasses.replace(CONFIG, seed=CONFIG.seed + lane), prompt(10 + lane))
    chunks = []
    for index in range(CHUNKS):
        chunks.append(engine.next_chunk().latents)
        controls(engine, lane, index)
    return chunks


def switch_and_act(target, lane: int, index: int) -> None:
    if index != SWITCH_AFTER:
        return
    if lane == 0:
        target.set_prompt(prompt(20, tokens=7), SwitchPolicy.RECACHE)
    else:
        target.set_action([1, 3, 2])


@pytest.mark.parametrize("stages", [2, 3])
def test_pipeline_equals_the_one_process_engine(stages: int) -> None:
    """2 lanes (each its own 4 step slots) through 2 or 3 stage processes; lane 0 switches prompt with a recache of
    every slot, lane 1 changes its actions; with 2 stages a layer also moves mid-stream."""
    expected = [one_process(lane, switch_and_act) for lane in range(2)]
    layers = (1, 2) if stages == 2 else (1, 1, 1)
    pipeline = PipelineConfig(stages=stages, layers_per_stage=layers, rebalance=False, start_timeout_s=45, stage_timeout_s=20)
    with PipelineEngine(MODEL, CONFIG, [prompt(10), prompt(11)], pipeline) as engine:
        assert engine.memories == 8
        got: list[list[torch.Tensor]] = [[], []]
        for item in engine.chunks():
            assert item.chunk.index == len(got[item.lane])
            got[item.lane].append(item.chunk.latents)
            switch_and_act(_LaneControls(engine, item.lane), item.lane, item.chunk.index)
            if stages == 2 and (item.lane, item.chunk.index) == (1, 1):
                engine.move_layer(1, 0)
            if min(len(chunks) for chunks in got) == CHUNKS:
                break
        assert not engine.rebuilds
    for lane in range(2):
        for index in range(CHUNKS):
            assert torch.equal(got[lane][index], expected[lane][index]), f"lane {lane} chunk {index} differs"


class _LaneControls:
    def __init__(self, engine: PipelineEngine, lane: int) -> None:
        self.engine, self.lane = engine, lane

    def set_prompt(self, text, policy) -> None:
        self.engine.set_prompt(self.lane, text, policy)

    def set_action(self, actions) -> None:
        self.engine.set_action(self.lane, actions)


@pytest.mark.parametrize("policy", list(SwitchPolicy))
def test_a_prompt_switch_travels_with_the_chunk_it_applies_to(policy: SwitchPolicy) -> None:
    """Asked after chunk k is handed out, a switch applies to the next chunk to enter (k + S + 1): chunks up to k + S
    are exactly those of a stream without the switch, and chunk k + S + 1 is not."""
    slots = len(CONFIG.denoising_steps)
    plain = [c.latents for c in itertools.islice(StreamEngine(MODEL(), CONFIG, prompt(1)).chunks(), 8)]
    engine = StreamEngine(MODEL(), CONFIG, prompt(1))
    switched = []
    for index in range(8):
        switched.append(engine.next_chunk().latents)
        if index == 1:
            engine.set_prompt(prompt(2), policy)
    first_new = 1 + slots + 1
    assert all(torch.equal(switched[i], plain[i]) for i in range(first_new))
    assert not torch.equal(switched[first_new], plain[first_new])


def test_one_stream_through_the_live_interface() -> None:
    """PipelineStream (what generate/serve drive) with stream_batch: same chunks as the one-process engine; a
    shorter step list is refused (every chunk goes through every slot)."""
    expected = [c.latents for c in itertools.islice(StreamEngine(MODEL(), CONFIG, prompt(10)).chunks(), 4)]
    pipeline = PipelineConfig(stages=2, layers_per_stage=(2, 1), rebalance=False, start_timeout_s=45, stage_timeout_s=20)
    stream = PipelineStream(PipelineEngine(MODEL, CONFIG, [prompt(10)], pipeline))
    try:
        got = [stream.next_chunk().latents for _ in range(4)]
        with pytest.raises(ConfigError, match="every chunk goes through all of"):
            stream.next_chunk(steps=(1000,))
    finally:
        stream.close()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_killed_stage_is_replaced_and_the_stream_goes_on_without_gap_or_repeat() -> None:
    pipeline = PipelineConfig(stages=2, start_timeout_s=45, stage_timeout_s=20, balance=False)
    with PipelineEngine(MODEL, CONFIG, [prompt(10)], pipeline) as engine:
        victim = engine.executor.processes[0]
        killed_at: list[float] = []

        def kill() -> None:
            killed_at.append(time.monotonic())
            os.kill(victim.pid, signal.SIGKILL)

        seen: list[tuple[int, float]] = []
        for item in itertools.islice(engine.chunks(), 16):
            seen.append((item.chunk.index, time.monotonic()))
            assert torch.isfinite(item.chunk.latents).all()
            if len(seen) == 5:
                threading.Timer(0.005, kill).start()
        assert killed_at and len(engine.rebuilds) == 1
        first_after = min(t for _, t in seen if t > engine.rebuilds[0].resumed_at)
        assert first_after - killed_at[0] < 2.0, f"stream stalled {first_after - killed_at[0]:.2f} s"
        assert [index for index, _ in seen] == list(range(16))


def test_stream_batch_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="two different samplers"):
        dataclasses.replace(CONFIG, rolling_chunks=2, denoising_steps=(1000, 500), sink_frames=0)
    with pytest.raises(ConfigError, match="stream_batch=1 must be True or False"):
        dataclasses.replace(CONFIG, stream_batch=1)
    engine = StreamEngine(MODEL(), CONFIG, prompt(1))
    with pytest.raises(ConfigError, match="takes no video input"):
        engine.next_chunk(source=torch.zeros(1))
    with pytest.raises(ConfigError, match=r"steps=\(1000, 500\): in stream-batch mode"):
        engine.next_chunk(steps=(1000, 500))


def test_reset_starts_over_at_once_and_a_fault_keeps_a_reset_in_flight() -> None:
    """StreamBatchEngine.reset() drops the chunks in flight: the next chunks are those of a fresh engine whose noise
    starts where this one's is. A pipeline lane's reset travels with its chunk; if a fault drops that chunk before it
    reached every slot, the next chunk carries the reset again."""
    engine = StreamEngine(MODEL(), CONFIG, prompt(1))
    for _ in range(3):
        engine.next_chunk()
    engine.reset()
    state = engine.noise.generator.get_state()
    after = [engine.next_chunk() for _ in range(3)]
    assert [chunk.index for chunk in after] == [3, 4, 5] and after[0].first_frame == 0
    fresh_noise = GaussianNoise(0)
    fresh_noise.generator.set_state(state)
    fresh = StreamBatchEngine(MODEL(), CONFIG, prompt(1), fresh_noise)
    assert all(torch.equal(a.latents, fresh.next_chunk().latents) for a in after)

    lane = engine.lane
    lane.reset()
    engine.next_chunk()  # the reset entered slot 0 with the newest chunk, which is still in flight
    assert lane.in_flight[0].reset and not lane._pending_reset
    restore = lane.restore_program()
    next(restore)
    assert lane._pending_reset
    restore.close()


def test_a_step_cap_keeps_the_full_list_of_a_stream_batch_engine() -> None:
    """A client's `steps` control caps the scheduler's lists; a stream-batch engine has only its full list, which it
    keeps (it used to end the session with StopIteration). Its controls reach the next chunk to enter slot 0."""
    from framecast.stream.bench import engine_step_lists
    from framecast.stream.session import _SteppedEngine

    engine = StreamEngine(MODEL(), CONFIG, prompt(1))
    stepped = _SteppedEngine(engine, engine_step_lists(engine), None)
    stepped.max_steps = 2
    assert stepped.next_chunk(CONFIG.denoising_steps).index == 0
    assert engine.chunk_index == 1 and engine.controls_reach == len(CONFIG.denoising_steps) + 1
