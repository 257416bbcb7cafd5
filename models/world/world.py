"""The world's dynamics: a seeded start, one frame of physics per action, and the `World` that holds the state.

The agent accelerates while a direction key is held and loses a fixed share of its velocity every frame
(friction), so it glides a little after a key is released and turns around within two frames; walls stop it.
Balls fly straight and bounce off the walls; orbiters circle at a constant rate. Objects and the agent pass
over each other: the agent's motion depends on the actions alone, so action following can be measured cleanly.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from framecast.models.errors import ConfigError
from framecast.models.world.prompt import SceneSettings
from framecast.models.world.render import Renderer
from framecast.models.world.state import ObjectKind, ObjectState, WorldConfig, WorldState
from framecast.models.world.vocabulary import Action

# (dx, dy) of each key; y grows downwards
ACTION_DIRECTION: dict[Action, tuple[int, int]] = {
    Action.NONE: (0, 0),
    Action.UP: (0, -1),
    Action.DOWN: (0, 1),
    Action.LEFT: (-1, 0),
    Action.RIGHT: (1, 0),
}
REST_SPEED_PX = 1e-3  # slower than this the agent is at rest (exactly), so an idle agent's state stops changing


def as_action(action: Action | int) -> Action:
    """An Action from an Action or an int id; raises ConfigError naming the allowed ids."""
    if isinstance(action, (int, np.integer)) and not isinstance(action, bool) and 0 <= int(action) < len(Action):
        return Action(int(action))
    names = ", ".join(f"{a.value}={a.name}" for a in Action)
    raise ConfigError(f"action={action!r} must be an Action or an id in [0, {len(Action)}): {names}")


def initial_state(seed: int, settings: SceneSettings, config: WorldConfig) -> WorldState:
    """The state after reset: agent at rest at a random place, objects with random positions and motions."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be an integer >= 0")
    if not isinstance(settings, SceneSettings):
        raise ConfigError(f"settings={settings!r} must be a SceneSettings (parse_prompt makes one from text)")
    rng = np.random.default_rng(int(seed))
    r = config.agent_radius_px
    agent_xy = (float(rng.uniform(r, config.width - 1 - r)), float(rng.uniform(r, config.height - 1 - r)))
    objects = [_ball(rng, config) for _ in range(config.balls)] + [_orbiter(rng, config) for _ in range(config.orbiters)]
    return WorldState(0, settings, agent_xy, (0.0, 0.0), tuple(objects))


def _ball(rng: np.random.Generator, config: WorldConfig) -> ObjectState:
    r = config.object_radius_px
    xy = (float(rng.uniform(r, config.width - 1 - r)), float(rng.uniform(r, config.height - 1 - r)))
    speed, angle = rng.uniform(*config.ball_speed_px), rng.uniform(0, 2 * math.pi)
    return ObjectState(ObjectKind.BALL, xy, (speed * math.cos(angle), speed * math.sin(angle)))


def _orbiter(rng: np.random.Generator, config: WorldConfig) -> ObjectState:
    radius = float(rng.uniform(*config.orbit_radius_px))
    margin = radius + config.object_radius_px  # the whole orbit fits inside the walls
    centre = (rng.uniform(margin, config.width - 1 - margin), rng.uniform(margin, config.height - 1 - margin))
    turn = float(rng.choice([-1.0, 1.0])) * 2 * math.pi / config.orbit_period_frames
    angle = rng.uniform(0, 2 * math.pi)
    # the velocity is the chord from the previous point of the orbit, so turning it by `turn` each frame keeps
    # the object exactly on the circle
    xy = (centre[0] + radius * math.cos(angle), centre[1] + radius * math.sin(angle))
    velocity = (xy[0] - centre[0] - radius * math.cos(angle - turn), xy[1] - centre[1] - radius * math.sin(angle - turn))
    return ObjectState(ObjectKind.ORBITER, (float(xy[0]), float(xy[1])), (float(velocity[0]), float(velocity[1])), turn)


def _stop_at_walls(position: float, velocity: float, low: float, high: float) -> tuple[float, float]:
    if position < low:
        return low, 0.0
    if position > high:
        return high, 0.0
    return position, velocity


def _bounce(position: float, velocity: float, low: float, high: float) -> tuple[float, float]:
    if position < low:
        return 2 * low - position, -velocity
    if position > high:
        return 2 * high - position, -velocity
    return position, velocity


def _step_agent(state: WorldState, action: Action, config: WorldConfig) -> tuple[tuple[float, float], tuple[float, float]]:
    direction = ACTION_DIRECTION[action]
    r = config.agent_radius_px
    limits = ((r, config.width - 1 - r), (r, config.height - 1 - r))
    xy, velocity = [], []
    for axis in range(2):
        v = config.velocity_retention * state.agent_velocity[axis] + config.agent_accel_px * direction[axis]
        v = 0.0 if abs(v) < REST_SPEED_PX else v
        p, v = _stop_at_walls(state.agent_xy[axis] + v, v, *limits[axis])
        xy.append(p)
        velocity.append(v)
    return (xy[0], xy[1]), (velocity[0], velocity[1])


def _step_object(obj: ObjectState, config: WorldConfig) -> ObjectState:
    vx, vy = obj.velocity
    if obj.turn_rad:
        cos, sin = math.cos(obj.turn_rad), math.sin(obj.turn_rad)
        vx, vy = cos * vx - sin * vy, sin * vx + cos * vy
    r = config.object_radius_px
    x, vx = _bounce(obj.xy[0] + vx, vx, r, config.width - 1 - r)
    y, vy = _bounce(obj.xy[1] + vy, vy, r, config.height - 1 - r)
    return ObjectState(obj.kind, (x, y), (vx, vy), obj.turn_rad)


def advance(state: WorldState, action: Action | int, config: WorldConfig) -> WorldState:
    """The state one frame later, with `action` held during that frame."""
    agent_xy, agent_velocity = _step_agent(state, as_action(action), config)
    objects = tuple(_step_object(obj, config) for obj in state.objects)
    return WorldState(state.frame_index + 1, state.settings, agent_xy, agent_velocity, objects)


def agent_path(
    before_last: tuple[float, float], last: tuple[float, float], actions: np.ndarray | list[int],
    config: WorldConfig,
) -> np.ndarray:
    """Where the world's physics takes an agent seen at `before_last` then `last` (x, y px, one frame apart) over
    the next frames with `actions` held: float64 [len(actions), 2]. Its velocity is the step between the two
    sightings, which is the world's velocity exactly unless a wall stopped the agent in that step (then the world's
    is 0); the agent's physics has nothing else (no collisions), so the path is the world's own."""
    velocity = (last[0] - before_last[0], last[1] - before_last[1])
    state = WorldState(0, SceneSettings(), (float(last[0]), float(last[1])), velocity, ())
    path = []
    for action in actions:
        state = WorldState(0, state.settings, *_step_agent(state, as_action(int(action)), config), ())
        path.append(state.agent_xy)
    return np.array(path, dtype=np.float64).reshape(len(path), 2)


class World:
    """A seeded world: `step` it with actions, `render` frames, `set_settings` to switch the prompt mid-episode."""

    def __init__(
        self, config: WorldConfig = WorldConfig(), seed: int = 0, settings: SceneSettings = SceneSettings()
    ) -> None:
        self.config = config
        self._renderer = Renderer(config)
        self._state = initial_state(seed, settings, config)

    @property
    def state(self) -> WorldState:
        return self._state

    def reset(self, seed: int, settings: SceneSettings = SceneSettings()) -> None:
        """Start over: the same seed gives the same episode for the same actions."""
        self._state = initial_state(seed, settings, self.config)

    def step(self, action: Action | int) -> None:
        self._state = advance(self._state, action, self.config)

    def set_settings(self, settings: SceneSettings) -> None:
        """Show the world under new settings from the next render on; positions and velocities stay as they are."""
        if not isinstance(settings, SceneSettings):
            raise ConfigError(f"settings={settings!r} must be a SceneSettings (parse_prompt makes one from text)")
        self._state = dataclasses.replace(self._state, settings=settings)

    def render(self) -> np.ndarray:
        """The current frame, uint8 [height, width, 3] (a new array)."""
        return self._renderer.render(self._state)
