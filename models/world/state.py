"""What a world is made of: its size and physics constants (`WorldConfig`) and a snapshot of it (`WorldState`).

Coordinates are pixels, x to the right and y down, with pixel centres at integers; velocities are pixels per frame.
A `WorldState` holds everything the future depends on, so rendering and stepping are functions of it alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from framecast.models.errors import ConfigError
from framecast.models.world.prompt import SceneSettings


class ObjectKind(enum.Enum):
    """The things that move on their own (drawn under the agent; they never touch it)."""

    BALL = "ball"  # straight lines, bouncing off the walls
    ORBITER = "orbiter"  # circles at a constant rate (its velocity turns by a fixed angle every frame)


@dataclass(frozen=True)
class WorldConfig:
    """Size, physics and population of the world; the defaults are tuned for 128x128 frames."""

    height: int = 128
    width: int = 128
    agent_radius_px: int = 9  # the agent fills a (2r+1)-pixel square at most
    agent_accel_px: float = 1.6  # velocity added per frame while a direction key is held
    velocity_retention: float = 0.45  # share of the agent's velocity kept per frame (friction); top speed a/(1-k)
    balls: int = 3
    orbiters: int = 2
    object_radius_px: int = 6
    ball_speed_px: tuple[float, float] = (0.7, 1.8)  # drawn uniformly per ball at reset
    orbit_radius_px: tuple[float, float] = (10.0, 26.0)  # drawn uniformly per orbiter at reset
    orbit_period_frames: int = 90
    rain_streaks: int = 48
    snowflakes: int = 90

    def __post_init__(self) -> None:
        for name in ("height", "width", "agent_radius_px", "object_radius_px", "orbit_period_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        for name in ("balls", "orbiters", "rain_streaks", "snowflakes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an integer >= 0")
        if self.agent_radius_px < 3:
            raise ConfigError(f"agent_radius_px={self.agent_radius_px} must be >= 3 for the shapes to differ")
        for name in ("ball_speed_px", "orbit_radius_px"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and len(value) == 2):
                raise ConfigError(f"{name}={value!r} must be a range (low, high)")
            low, high = value
            if not 0 < low <= high:
                raise ConfigError(f"{name}={value!r} must be a range (low, high) with 0 < low <= high")
        smallest = min(self.height, self.width)
        orbit_extent = 2 * (self.orbit_radius_px[1] + self.object_radius_px) + 1  # widest orbit, object included
        if smallest < 32 or smallest < 2 * (2 * self.agent_radius_px + 1) or smallest <= orbit_extent:
            raise ConfigError(
                f"frame {self.height}x{self.width} must be >= 32 px per side, fit two agents "
                f"({2 * self.agent_radius_px + 1} px each) and more than the widest orbit ({orbit_extent:g} px)"
            )
        if not self.agent_accel_px > 0:
            raise ConfigError(f"agent_accel_px={self.agent_accel_px!r} must be > 0")
        if not 0 <= self.velocity_retention < 1:
            raise ConfigError(f"velocity_retention={self.velocity_retention!r} must be in [0, 1)")

    @property
    def agent_top_speed_px(self) -> float:
        """The speed a held key converges to."""
        return self.agent_accel_px / (1 - self.velocity_retention)


@dataclass(frozen=True)
class ObjectState:
    """One moving object: where it is and how it moves (its future follows from these alone)."""

    kind: ObjectKind
    xy: tuple[float, float]
    velocity: tuple[float, float]
    turn_rad: float = 0.0  # angle the velocity turns by every frame: 0 for a ball, +-2*pi/period for an orbiter


@dataclass(frozen=True)
class WorldState:
    """One frame of the world: the settings it is shown under and where everything is."""

    frame_index: int  # frames stepped since reset; animates the weather
    settings: SceneSettings
    agent_xy: tuple[float, float]
    agent_velocity: tuple[float, float]
    objects: tuple[ObjectState, ...]
