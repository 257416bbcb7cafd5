import math

import numpy as np
import pytest

from framecast.models.errors import ConfigError
from framecast.models.world.ground_truth import read_agent
from framecast.models.world.prompt import SceneSettings, parse_prompt
from framecast.models.world.state import ObjectKind, WorldConfig
from framecast.models.world.vocabulary import Action
from framecast.models.world.world import World

CONFIG = WorldConfig()
R = CONFIG.agent_radius_px
LOW, HIGH = R, CONFIG.width - 1 - R


def _run(seed: int, actions: np.ndarray, settings: SceneSettings = SceneSettings()) -> tuple[np.ndarray, World]:
    world = World(CONFIG, seed, settings)
    frames = []
    for action in actions:
        world.step(int(action))
        frames.append(world.render())
    return np.stack(frames), world


def _world_at_centre() -> World:
    world = World(CONFIG, 0)
    # walk to the middle of the frame: far enough from every wall for the tests below
    for _ in range(200):
        x, y = world.state.agent_xy
        if not 60 <= x <= 68:
            world.step(Action.RIGHT if x < 60 else Action.LEFT)
        else:
            world.step(Action.DOWN if y < 60 else Action.UP if y > 68 else Action.NONE)
    for _ in range(30):
        world.step(Action.NONE)
    assert world.state.agent_velocity == (0.0, 0.0)
    return world


def test_same_seed_same_frames_different_seed_different_frames() -> None:
    actions = np.random.default_rng(0).integers(0, 5, size=120)
    settings = parse_prompt("a yellow diamond on water at dusk in snowfall")
    first, _ = _run(7, actions, settings)
    second, _ = _run(7, actions, settings)
    other, _ = _run(8, actions, settings)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


def test_reset_starts_the_same_episode_again() -> None:
    world = World(CONFIG, 5)
    start = world.state
    for action in (1, 4, 4, 2):
        world.step(action)
    world.reset(5)
    assert world.state == start


@pytest.mark.parametrize(
    "action, axis, wall", [(Action.RIGHT, 0, HIGH), (Action.LEFT, 0, LOW), (Action.DOWN, 1, HIGH), (Action.UP, 1, LOW)]
)
def test_walls_hold_the_agent_inside(action: Action, axis: int, wall: int) -> None:
    world = World(CONFIG, 3)
    for _ in range(100):
        world.step(action)
    assert world.state.agent_xy[axis] == wall
    assert world.state.agent_velocity[axis] == 0.0


def test_random_play_never_leaves_the_frame_and_objects_stay_inside() -> None:
    world = World(CONFIG, 11)
    for action in np.random.default_rng(1).integers(0, 5, size=1500):
        world.step(int(action))
        x, y = world.state.agent_xy
        assert LOW <= x <= HIGH and LOW <= y <= HIGH
        for obj in world.state.objects:
            assert all(CONFIG.object_radius_px <= c <= CONFIG.width - 1 - CONFIG.object_radius_px for c in obj.xy)


@pytest.mark.parametrize(
    "action, direction", [(Action.UP, (0, -1)), (Action.DOWN, (0, 1)), (Action.LEFT, (-1, 0)), (Action.RIGHT, (1, 0))]
)
def test_an_action_moves_the_agent_its_way_in_the_first_frame(action: Action, direction: tuple[int, int]) -> None:
    world = _world_at_centre()
    before = world.state.agent_xy
    world.step(action)
    moved = np.subtract(world.state.agent_xy, before)
    assert np.allclose(moved, np.multiply(direction, CONFIG.agent_accel_px))


def test_reversing_at_top_speed_turns_the_agent_within_two_frames() -> None:
    world = _world_at_centre()
    for _ in range(12):
        world.step(Action.LEFT if world.state.agent_xy[0] > 40 else Action.RIGHT)
    for _ in range(3):
        world.step(Action.RIGHT)  # now moving right at close to top speed
    assert world.state.agent_velocity[0] > 0.9 * CONFIG.agent_top_speed_px
    xs = [world.state.agent_xy[0]]
    for _ in range(2):
        world.step(Action.LEFT)
        xs.append(world.state.agent_xy[0])
    assert xs[2] < xs[1]  # moving left by the second frame


def test_momentum_glides_on_and_friction_stops_the_agent() -> None:
    world = _world_at_centre()
    for _ in range(4):
        world.step(Action.DOWN)
    speed = world.state.agent_velocity[1]
    assert speed == pytest.approx(CONFIG.agent_top_speed_px, rel=0.05)
    glide = []
    while world.state.agent_velocity != (0.0, 0.0):
        y = world.state.agent_xy[1]
        world.step(Action.NONE)
        glide.append(world.state.agent_xy[1] - y)
    assert all(step > 0 for step in glide[:3])  # keeps going the same way
    assert all(a > b for a, b in zip(glide, glide[1:]))  # ever slower
    assert len(glide) < 15  # and comes to rest exactly


def test_objects_move_on_their_own_whatever_the_agent_does() -> None:
    _, idle = _run(2, np.zeros(300, dtype=int))
    _, busy = _run(2, np.random.default_rng(0).integers(0, 5, size=300))
    assert idle.state.objects == busy.state.objects
    world = World(CONFIG, 2)
    start = world.state.objects
    for _ in range(CONFIG.orbit_period_frames):
        world.step(Action.NONE)
    for before, after in zip(start, world.state.objects):
        if before.kind is ObjectKind.ORBITER:  # one period brings an orbiter back to where it was
            assert math.dist(before.xy, after.xy) < 1e-6
        else:
            assert math.dist(before.xy, after.xy) > 1e-3


def test_a_prompt_switch_keeps_the_world_state() -> None:
    world = World(CONFIG, 9, parse_prompt("a red circle on grass by day in clear weather"))
    for action in (4, 4, 4, 2, 2):
        world.step(action)
    before, frame_before = world.state, world.render()
    world.set_settings(parse_prompt("a cyan triangle on snow at night in rain"))
    after = world.state
    assert (after.agent_xy, after.agent_velocity, after.objects, after.frame_index) == (
        before.agent_xy, before.agent_velocity, before.objects, before.frame_index
    )
    assert read_agent(frame_before).xy == pytest.approx(read_agent(world.render()).xy, abs=0.5)  # seen jump: none


def test_bad_actions_seeds_and_settings_name_the_allowed_values() -> None:
    world = World(CONFIG)
    with pytest.raises(ConfigError, match=r"action=5 must be an Action or an id in \[0, 5\): 0=NONE, 1=UP"):
        world.step(5)
    with pytest.raises(ConfigError, match="action=True"):
        world.step(True)
    with pytest.raises(ConfigError, match="seed=-1 must be an integer >= 0"):
        world.reset(-1)
    with pytest.raises(ConfigError, match="must be a SceneSettings"):
        world.set_settings("a red circle")


def test_agent_path_from_two_sightings_is_the_worlds_own_path() -> None:
    from framecast.models.world.episodes import make_episode
    from framecast.models.world.world import agent_path

    config = WorldConfig()
    for seed in range(6):
        episode = make_episode(seed, 40)
        xy, actions = episode.agent_xy, np.asarray(episode.actions)
        low, high = config.agent_radius_px, config.width - 1 - config.agent_radius_px
        for t in range(2, 37, 5):
            at_wall = ((xy[t - 2 : t] <= low) | (xy[t - 2 : t] >= high)).any()
            if at_wall:  # a wall stop zeroes the world's velocity, which two sightings cannot tell
                continue
            path = agent_path(tuple(xy[t - 2]), tuple(xy[t - 1]), actions[t : t + 3], config)
            np.testing.assert_allclose(path, xy[t : t + 3], atol=1e-6)
