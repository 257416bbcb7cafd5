import dataclasses

import numpy as np

from framecast.models.world.palette import AGENT_RGB, ground_rgb
from framecast.models.world.prompt import SceneSettings, parse_prompt
from framecast.models.world.render import Renderer, pixel
from framecast.models.world.sprites import agent_mask
from framecast.models.world.state import WorldConfig
from framecast.models.world.vocabulary import Weather
from framecast.models.world.world import initial_state

CONFIG = WorldConfig()


def test_a_frame_is_a_pure_function_of_the_state() -> None:
    state = initial_state(4, parse_prompt("a cyan square on sand at dusk in rain"), CONFIG)
    frame = Renderer(CONFIG).render(state)
    assert frame.shape == (128, 128, 3) and frame.dtype == np.uint8
    assert np.array_equal(frame, Renderer(CONFIG).render(state))
    later = dataclasses.replace(state, frame_index=state.frame_index + 1)
    assert not np.array_equal(frame, Renderer(CONFIG).render(later))  # the rain falls


def test_the_agent_is_drawn_on_top_of_everything() -> None:
    state = initial_state(0, parse_prompt("a magenta triangle on snow at night in snowfall"), CONFIG)
    r = CONFIG.agent_radius_px
    # put the agent on the first ball (as close as the walls allow)
    on_ball = tuple(float(np.clip(c, r, CONFIG.width - 1 - r)) for c in state.objects[0].xy)
    state = dataclasses.replace(state, agent_xy=on_ball)
    frame = Renderer(CONFIG).render(state)
    x, y = pixel(state.agent_xy[0]), pixel(state.agent_xy[1])
    box = frame[y - r : y + r + 1, x - r : x + r + 1]
    assert (box[agent_mask(state.settings.agent_shape, r)] == AGENT_RGB[state.settings.agent_colour]).all()


def test_weather_draws_particles_or_haze() -> None:
    renderer = Renderer(CONFIG)
    state = initial_state(1, SceneSettings(), CONFIG)
    ground = {}
    for weather in Weather:
        frame = renderer.render(dataclasses.replace(state, settings=SceneSettings(weather=weather)))
        ground[weather] = (frame == ground_rgb(SceneSettings().terrain, SceneSettings().time, weather)).all(axis=-1).mean()
    assert ground[Weather.CLEAR] > 0.9 and ground[Weather.FOG] > 0.9
    assert ground[Weather.CLEAR] - ground[Weather.RAIN] > 0.04  # streaks cover ~7% of the frame
    assert ground[Weather.CLEAR] - ground[Weather.SNOWFALL] > 0.04  # flakes ~6.5%
