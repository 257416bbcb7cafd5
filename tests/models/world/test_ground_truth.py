"""The readers must be exact on clean renders and hold up under mild noise and blur (decoded frames)."""

import dataclasses
import math

import numpy as np
import pytest

from framecast.models.errors import ShapeError
from framecast.models.world.ground_truth import read_agent, read_scene, read_setting
from framecast.models.world.palette import ground_rgb
from framecast.models.world.prompt import random_settings
from framecast.models.world.render import Renderer
from framecast.models.world.state import WorldConfig, WorldState
from framecast.models.world.vocabulary import Terrain, TimeOfDay, Weather
from framecast.models.world.world import initial_state

CONFIG = WorldConfig()
RENDERER = Renderer(CONFIG)


def _random_states(seed: int, count: int) -> list[WorldState]:
    """Random scenes at random places, weather at random phases."""
    rng = np.random.default_rng(seed)
    states = []
    for _ in range(count):
        state = initial_state(int(rng.integers(1 << 30)), random_settings(rng), CONFIG)
        states.append(dataclasses.replace(state, frame_index=int(rng.integers(10_000))))
    return states


def _box_blur_3x3(frame: np.ndarray) -> np.ndarray:
    padded = np.pad(frame.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    height, width = frame.shape[:2]
    return sum(padded[i : i + height, j : j + width] for i in range(3) for j in range(3)) / 9


def _check(frame: np.ndarray, state: WorldState, position_tolerance_px: float) -> None:
    settings = state.settings
    setting = read_setting(frame)
    assert (setting.terrain, setting.weather, setting.time) == (settings.terrain, settings.weather, settings.time)
    agent = read_agent(frame)
    assert agent is not None and (agent.shape, agent.colour) == (settings.agent_shape, settings.agent_colour)
    assert math.dist(agent.xy, state.agent_xy) <= position_tolerance_px


def test_readers_are_exact_on_clean_renders() -> None:
    for state in _random_states(0, 1000):
        # the drawn agent sits on the nearest pixel: at most half a pixel off per axis
        _check(RENDERER.render(state), state, position_tolerance_px=math.sqrt(0.5))


def test_readers_survive_noise_and_blur() -> None:
    rng = np.random.default_rng(1)
    for state in _random_states(2, 300):
        frame = RENDERER.render(state)
        noisy = np.clip(frame + rng.normal(0, 8, frame.shape), 0, 255)  # sigma = 8/255 of the range
        _check(_box_blur_3x3(noisy) if rng.random() < 0.5 else noisy, state, position_tolerance_px=1.25)


def test_read_scene_gives_the_prompt_slots() -> None:
    state = _random_states(3, 1)[0]
    assert read_scene(RENDERER.render(state)) == state.settings


def test_no_agent_and_wrong_shapes() -> None:
    ground = np.empty((128, 128, 3), dtype=np.uint8)
    ground[:] = ground_rgb(Terrain.SAND, TimeOfDay.DUSK, Weather.FOG)
    assert read_agent(ground) is None and read_scene(ground) is None
    assert read_setting(ground).ground_distance == 0.0
    red = np.zeros((128, 128, 3), dtype=np.uint8)
    red[:] = (230, 30, 40)  # a garbled frame: all agent colour, no ground to tell it from
    assert read_agent(red) is None
    read_setting(np.random.default_rng(0).integers(0, 256, (128, 128, 3)))  # nonsense reads as something, no error
    with pytest.raises(ShapeError, match=r"frame of shape \(64, 64, 3\); expected \[128, 128, 3\]"):
        read_setting(np.zeros((64, 64, 3)))
