"""The world simulator as a live source: frame accounting, controls at chunk boundaries, and a session over it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from framecast.models.errors import ConfigError
from framecast.models.world.ground_truth import read_agent, read_setting
from framecast.models.world.vocabulary import Action, Terrain, TimeOfDay, Weather
from framecast.stream.control import PromptControl
from framecast.stream.session import Session, SessionConfig
from framecast.stream.simulator import PixelDecoder, SimulatorConfig, WorldSimulator


def frames_of(simulator: WorldSimulator) -> np.ndarray:
    return PixelDecoder().decode(simulator.next_chunk().latents)[0].numpy()


def test_frame_accounting_follows_the_wan_rule():
    simulator = WorldSimulator(SimulatorConfig(chunk_frames=2))
    assert [len(frames_of(simulator)) for _ in range(3)] == [5, 8, 8]
    simulator.reset()
    assert len(frames_of(simulator)) == 5
    assert simulator.chunk_index == 4  # keeps counting across resets, as StreamEngine


def test_prompt_switch_lands_at_the_next_chunk_and_keeps_unnamed_slots():
    simulator = WorldSimulator(SimulatorConfig(prompt="a cyan square on grass by day in clear weather"))
    frames_of(simulator)
    simulator.set_prompt("snow at night")
    setting = read_setting(frames_of(simulator)[-1])
    assert (setting.terrain, setting.time, setting.weather) == (Terrain.SNOW, TimeOfDay.NIGHT, Weather.CLEAR)
    agent = read_agent(frames_of(simulator)[-1])
    assert agent is not None and (agent.shape.value, agent.colour.value) == ("square", "cyan")


def test_held_key_moves_the_agent_until_the_next_key():
    simulator = WorldSimulator(SimulatorConfig(seed=3))
    start = read_agent(frames_of(simulator)[-1]).xy
    simulator.set_action(int(Action.LEFT))
    for _ in range(3):
        frames_of(simulator)
    moved = read_agent(frames_of(simulator)[-1]).xy
    assert moved[0] < start[0] - 5 and abs(moved[1] - start[1]) < 1.5
    simulator.set_action(int(Action.NONE))
    frames_of(simulator)
    still = read_agent(frames_of(simulator)[-1]).xy
    assert read_agent(frames_of(simulator)[-1]).xy == still


def test_reseed_restarts_the_world_under_the_current_settings():
    a, b = WorldSimulator(SimulatorConfig(seed=1)), WorldSimulator(SimulatorConfig(seed=2))
    frames_of(a), frames_of(b)
    a.set_prompt("sand")
    a.reseed(2)
    b.set_prompt("sand")
    b.reseed(2)
    assert np.array_equal(frames_of(a), frames_of(b))


@pytest.mark.parametrize("bad", ["a purple circle", "grass and sand"])
def test_prompts_outside_the_vocabulary_are_refused_at_once(bad):
    with pytest.raises(ConfigError, match="vocabulary|two"):
        WorldSimulator.encode_prompt(bad)
    with pytest.raises(ConfigError):
        SimulatorConfig(prompt=bad)


def test_bad_controls_are_refused():
    simulator = WorldSimulator()
    with pytest.raises(ConfigError, match="action"):
        simulator.set_action(len(Action))
    with pytest.raises(ConfigError, match="seed"):
        simulator.reseed(-1)
    with pytest.raises(ConfigError, match="PixelDecoder"):
        PixelDecoder().decode(simulator.next_chunk().latents.float())


def test_a_session_streams_the_simulator_and_applies_a_prompt():
    async def run() -> tuple[list, list[str]]:
        simulator = WorldSimulator()
        session = Session(simulator, PixelDecoder(), simulator.encode_prompt,
                          SessionConfig(fps=16, speed=8.0, latency_budget_s=0.5, output_scale=2), token="t")
        frames, events = session.frames.subscribe(capacity=512), session.events.subscribe()
        replies: list[str] = []
        session.start()
        try:
            received = [await asyncio.wait_for(frames.get(), 10) for _ in range(8)]
            session.submit(PromptControl("snow at dusk"), token="t", seq=1, reply=replies.append)
            deadline = asyncio.get_running_loop().time() + 10
            while not replies and asyncio.get_running_loop().time() < deadline:
                received.append(await asyncio.wait_for(frames.get(), 10))
            received += [await asyncio.wait_for(frames.get(), 10) for _ in range(24)]
        finally:
            await asyncio.to_thread(session.close)
        del events
        return received, replies

    received, replies = asyncio.run(run())
    assert replies and '"type":"ack"' in replies[0].replace(" ", "")
    assert received[0].rgb.shape == (256, 256, 3)  # output_scale 2
    assert [f.index for f in received] == list(range(len(received)))
    last = received[-1].rgb[::2, ::2]
    assert read_setting(last).terrain is Terrain.SNOW and read_setting(last).time is TimeOfDay.DUSK
    assert read_setting(received[0].rgb[::2, ::2]).terrain is Terrain.GRASS
