"""The colour margins the readers in ground_truth.py depend on."""

import itertools

import numpy as np

from framecast.models.world.palette import AGENT_RGB, OBJECT_RGB, RAIN_RGB, SNOWFLAKE_RGB, ground_rgb, sprite_rgb
from framecast.models.world.vocabulary import Terrain, TimeOfDay, Weather


def _distance(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)))


def test_the_24_ground_colours_are_far_apart() -> None:
    grounds = [ground_rgb(t, h, w) for t in Terrain for h in TimeOfDay for w in (Weather.CLEAR, Weather.FOG)]
    assert min(_distance(a, b) for a, b in itertools.combinations(grounds, 2)) >= 35
    # rain and snowfall fall on the clear ground: only fog changes it
    for t, h, w in itertools.product(Terrain, TimeOfDay, (Weather.RAIN, Weather.SNOWFALL)):
        assert (ground_rgb(t, h, w) == ground_rgb(t, h, Weather.CLEAR)).all()


def test_agent_colours_are_far_from_everything_else_in_every_scene() -> None:
    scene_colours = [
        colour
        for h, w in itertools.product(TimeOfDay, Weather)
        for colour in [ground_rgb(t, h, w) for t in Terrain]
        + [sprite_rgb(rgb, h, w) for rgb in [*OBJECT_RGB.values(), RAIN_RGB, SNOWFLAKE_RGB]]
    ]
    assert min(_distance(agent, other) for agent in AGENT_RGB.values() for other in scene_colours) >= 100
    assert min(_distance(a, b) for a, b in itertools.combinations(AGENT_RGB.values(), 2)) >= 150


def test_particles_stand_out_from_the_ground_they_fall_on() -> None:
    contrasts = [
        _distance(ground_rgb(t, h, w), sprite_rgb(rgb, h, w))
        for t, h, w in itertools.product(Terrain, TimeOfDay, (Weather.RAIN, Weather.SNOWFALL))
        for rgb in (RAIN_RGB, SNOWFLAKE_RGB)
    ]
    assert min(contrasts) >= 75
