"""Redrawing the rain: the world's whole pattern at the phase the frames draw it, as the renderer would."""

import dataclasses

import numpy as np
import pytest

from framecast.models.errors import ShapeError
from framecast.models.world.ground_truth import read_setting
from framecast.models.world.palette import RAIN_RGB, sprite_rgb
from framecast.models.world.prompt import SceneSettings
from framecast.models.world.rain_redraw import rain_layers, rain_period_frames, rain_phase, redraw_rain
from framecast.models.world.render import Renderer
from framecast.models.world.state import WorldConfig
from framecast.models.world.vocabulary import AgentColour, AgentShape, Terrain, TimeOfDay, Weather
from framecast.models.world.world import World

CONFIG = WorldConfig()
RAIN = SceneSettings(Terrain.SNOW, Weather.RAIN, TimeOfDay.DUSK, AgentShape.SQUARE, AgentColour.RED)


def _rain_frames(settings: SceneSettings, frames: int, seed: int = 4, skip: int = 5):
    """Consecutive frames of a world in `settings` and their states (after `skip` steps)."""
    world = World(CONFIG, seed, settings)
    for _ in range(skip):
        world.step(0)
    video, states = [], []
    for t in range(frames):
        world.step(t % 5)
        video.append(world.render()), states.append(world.state)
    return np.stack(video), states


def test_the_rain_repeats_every_period_and_the_layers_are_what_the_renderer_paints():
    assert rain_period_frames() == 64  # 128 rows at 4 a frame, 128 columns at 2 a frame
    renderer = Renderer(CONFIG)
    np.testing.assert_array_equal(renderer.rain_mask(3), renderer.rain_mask(3 + 64))
    assert not np.array_equal(renderer.rain_mask(3), renderer.rain_mask(4))
    frames, states = _rain_frames(RAIN, 3)
    rain = sprite_rgb(RAIN_RGB, RAIN.time, Weather.RAIN)
    for frame, state in zip(frames, states):
        painted = (frame == rain).all(-1)
        layer = rain_layers()[state.frame_index % 64]
        assert painted.sum() > 900 and (painted & ~layer).sum() == 0  # all rain lies on the layer (the agent hides some)


def test_clean_rain_is_left_as_it_is_and_its_phase_is_the_frame_index():
    frames, states = _rain_frames(RAIN, 3, skip=70)
    redrawn, phase = redraw_rain(frames, RAIN)
    assert phase == states[0].frame_index % 64
    np.testing.assert_array_equal(redrawn, frames)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_thinned_rain_is_drawn_again_in_full_at_its_own_phase(seed):
    frames, states = _rain_frames(RAIN, 3, seed=seed)
    no_rain, _ = _rain_frames(dataclasses.replace(RAIN, weather=Weather.CLEAR), 3, seed=seed)
    rng = np.random.default_rng(seed)
    thinned = frames.copy()
    for f in range(3):  # keep a fifth of the streak pixels (of the same world without rain under the rest)
        gone = (frames[f] != no_rain[f]).any(-1) & (rng.random(frames.shape[1:3]) < 0.8)
        thinned[f][gone] = no_rain[f][gone]
    assert [read_setting(frame).weather for frame in thinned] == [Weather.CLEAR] * 3
    redrawn, phase = redraw_rain(thinned, RAIN)
    assert phase == states[0].frame_index % 64
    assert [read_setting(frame).weather for frame in redrawn] == [Weather.RAIN] * 3
    assert (redrawn != frames).any(-1).mean() < 0.002  # the same frames but a few pixels where objects meet rain


def test_snowflakes_drawn_for_rain_are_wiped_and_the_rain_drawn():
    snowing, _ = _rain_frames(dataclasses.replace(RAIN, weather=Weather.SNOWFALL), 3)
    assert read_setting(snowing[0]).weather is Weather.SNOWFALL
    redrawn, _ = redraw_rain(snowing, RAIN)
    for frame in redrawn:
        reading = read_setting(frame)
        assert reading.weather is Weather.RAIN and reading.particle_pixels > 900


def test_the_phase_is_the_one_whose_streaks_cover_the_drawn_particles_in_every_frame():
    layers = rain_layers()
    particles = np.stack([layers[(40 + f) % 64] & (np.arange(128)[None, :] < 64) for f in range(3)])  # left half
    assert rain_phase(particles) == 40


def test_frames_of_the_wrong_rank_are_refused():
    with pytest.raises(ShapeError, match=r"\[F, 128, 128, 3\]"):
        redraw_rain(np.zeros((128, 128, 3), np.uint8), RAIN)
