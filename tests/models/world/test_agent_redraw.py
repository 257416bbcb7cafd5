"""Redrawing the agent: the wanted sprite where the frame had one, as the renderer would have drawn it."""

import dataclasses

import numpy as np
import pytest

from framecast.models.world.agent_redraw import redraw_agent
from framecast.models.world.ground_truth import read_agent
from framecast.models.world.palette import AGENT_RGB, ground_rgb
from framecast.models.world.prompt import SceneSettings
from framecast.models.world.render import Renderer, paste
from framecast.models.world.sprites import agent_mask
from framecast.models.world.state import WorldConfig
from framecast.models.world.vocabulary import AgentColour, AgentShape, Terrain, TimeOfDay, Weather
from framecast.models.world.world import initial_state

CONFIG = WorldConfig()
RENDERER = Renderer(CONFIG)


def _agent_alone(shape: AgentShape, colour: AgentColour, xy: tuple[float, float]) -> np.ndarray:
    """A clear-weather frame with the agent and no object near it (objects are moved to a far corner)."""
    settings = SceneSettings(Terrain.GRASS, Weather.CLEAR, TimeOfDay.DUSK, shape, colour)
    state = initial_state(3, settings, CONFIG)
    far = (CONFIG.width - 1 - CONFIG.object_radius_px, CONFIG.height - 1 - CONFIG.object_radius_px)
    objects = tuple(dataclasses.replace(obj, xy=far) for obj in state.objects)
    return RENDERER.render(dataclasses.replace(state, agent_xy=xy, objects=objects))


@pytest.mark.parametrize("drawn, wanted", [(AgentShape.CIRCLE, AgentShape.DIAMOND),
                                           (AgentShape.TRIANGLE, AgentShape.SQUARE),
                                           (AgentShape.SQUARE, AgentShape.TRIANGLE)])
def test_a_wrong_shape_is_redrawn_exactly_as_the_world_draws_the_wanted_one(drawn, wanted):
    xy = (40.0, 61.0)
    redrawn, centre = redraw_agent(_agent_alone(drawn, AgentColour.CYAN, xy), wanted, AgentColour.CYAN)
    truth = _agent_alone(wanted, AgentColour.CYAN, xy)
    assert np.abs(np.array(centre) - xy).max() <= 0.5
    np.testing.assert_array_equal(redrawn, truth)


def test_a_blurred_blend_is_wiped_rim_and_all():
    xy = (70.0, 30.0)
    blend = (_agent_alone(AgentShape.CIRCLE, AgentColour.RED, xy).astype(np.float32)
             + _agent_alone(AgentShape.DIAMOND, AgentColour.RED, xy)) / 2
    padded = np.pad(blend, ((1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = np.rint(sum(padded[i : i + 128, j : j + 128] for i in range(3) for j in range(3)) / 9).astype(np.uint8)
    redrawn, centre = redraw_agent(blurred, AgentShape.DIAMOND, AgentColour.RED)
    reading = read_agent(redrawn)
    assert reading.shape is AgentShape.DIAMOND and reading.colour is AgentColour.RED
    assert np.abs(np.array(reading.xy) - xy).max() <= 0.5
    truth = _agent_alone(AgentShape.DIAMOND, AgentColour.RED, xy)
    # around the agent only a faint rim (under 20% of the way to the agent's colour) may stay (the far corner's
    # objects were blurred too)
    near = (slice(30 - 13, 30 + 14), slice(70 - 13, 70 + 14))
    rim = np.abs(redrawn[near].astype(int) - truth[near]).max(axis=-1)
    ground = ground_rgb(Terrain.GRASS, TimeOfDay.DUSK, Weather.CLEAR).astype(int)
    full = np.abs(ground - AGENT_RGB[AgentColour.RED]).max()
    assert 0 < rim.max() < 0.2 * full


def test_the_colour_is_redrawn_too_and_the_centre_stays_inside_the_frame():
    edge = (float(CONFIG.agent_radius_px), float(CONFIG.agent_radius_px))
    redrawn, centre = redraw_agent(_agent_alone(AgentShape.TRIANGLE, AgentColour.RED, edge), AgentShape.TRIANGLE,
                                   AgentColour.CYAN)
    assert centre == edge
    np.testing.assert_array_equal(redrawn, _agent_alone(AgentShape.TRIANGLE, AgentColour.CYAN, edge))


def test_the_agent_is_drawn_where_asked_and_its_old_place_wiped():
    drawn_at, wanted_at = (40.0, 61.0), (44.0, 58.0)
    redrawn, centre = redraw_agent(_agent_alone(AgentShape.CIRCLE, AgentColour.CYAN, drawn_at), AgentShape.SQUARE,
                                   AgentColour.CYAN, at=wanted_at)
    assert centre == wanted_at
    np.testing.assert_array_equal(redrawn, _agent_alone(AgentShape.SQUARE, AgentColour.CYAN, wanted_at))
    # asked for a place past the walls: kept inside as the physics keeps the agent
    _, centre = redraw_agent(_agent_alone(AgentShape.CIRCLE, AgentColour.CYAN, drawn_at), AgentShape.SQUARE,
                             AgentColour.CYAN, at=(-5.0, 200.0))
    r = float(CONFIG.agent_radius_px)
    assert centre == (r, CONFIG.height - 1 - r)


def test_no_agent_no_redraw():
    flat = np.empty((128, 128, 3), dtype=np.uint8)
    flat[:] = ground_rgb(Terrain.GRASS, TimeOfDay.DAY, Weather.CLEAR)
    assert redraw_agent(flat, AgentShape.CIRCLE, AgentColour.RED) is None


def test_two_agents_are_no_one_place_to_draw_one():
    """A model unsure where the agent is may draw it twice; redrawing one between them would add a third."""
    one = _agent_alone(AgentShape.DIAMOND, AgentColour.RED, (30.0, 30.0))
    both = one.copy()
    paste(both, agent_mask(AgentShape.DIAMOND, CONFIG.agent_radius_px), AGENT_RGB[AgentColour.RED], (30.0, 52.0))
    assert read_agent(both) is not None  # the reader still reads one (between them): the redraw must refuse
    assert redraw_agent(both, AgentShape.DIAMOND, AgentColour.RED) is None
    # a blurred single agent is still one place
    padded = np.pad(one.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = np.rint(sum(padded[i : i + 128, j : j + 128] for i in range(3) for j in range(3)) / 9).astype(np.uint8)
    assert redraw_agent(blurred, AgentShape.SQUARE, AgentColour.RED) is not None
