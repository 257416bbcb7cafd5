import numpy as np

from framecast.models.world.sprites import agent_centroid, agent_mask, object_mask, rain_streak_offsets, snowflake_offsets
from framecast.models.world.state import ObjectKind
from framecast.models.world.vocabulary import AgentShape


def test_agent_shapes_fit_their_box_and_differ() -> None:
    masks = {shape: agent_mask(shape, 9) for shape in AgentShape}
    assert all(mask.shape == (19, 19) for mask in masks.values())
    assert len({mask.tobytes() for mask in masks.values()}) == len(AgentShape)
    areas = [int(mask.sum()) for mask in masks.values()]
    assert min(areas) / max(areas) > 0.7  # similar sizes: shape, not size, tells them apart
    assert agent_centroid(AgentShape.CIRCLE, 9) == (0.0, 0.0)
    assert agent_centroid(AgentShape.TRIANGLE, 9)[1] > 2  # the base pulls the triangle's mass down


def test_masks_are_cached_and_read_only() -> None:
    assert agent_mask(AgentShape.SQUARE, 9) is agent_mask(AgentShape.SQUARE, 9)
    assert not object_mask(ObjectKind.BALL, 6).flags.writeable


def test_particle_shapes() -> None:
    dy, dx = rain_streak_offsets()
    assert len(dy) == 24 and dy.max() == 11 and dx.min() == -5  # 12 rows, 2 px wide, slanting left
    assert len(snowflake_offsets()[0]) == 12
    assert np.all(object_mask(ObjectKind.ORBITER, 6) <= object_mask(ObjectKind.BALL, 6))  # a ring inside the disc
