"""Frames from world states: a pure function of the state, fast enough to generate training data on the fly.

Layers, bottom to top: the ground (one flat colour per terrain, time of day and fog, cached), the objects, the
weather particles, the agent. The agent is drawn last, unlit and unfogged, so it is never hidden and its colour is
exact. Particles move with the frame index only (their layout is fixed by `particle_seed`, not by the episode): the
weather is part of the look, not of the state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from framecast.models.world.palette import AGENT_RGB, OBJECT_RGB, RAIN_RGB, RGB, SNOWFLAKE_RGB, ground_rgb, sprite_rgb
from framecast.models.world.prompt import SceneSettings
from framecast.models.world.sprites import RAIN_STEP_PX, agent_mask, object_mask, rain_streak_offsets, snowflake_offsets
from framecast.models.world.state import ObjectKind, WorldConfig, WorldState
from framecast.models.world.vocabulary import Terrain, TimeOfDay, Weather

SNOW_SWAY_PX = 2  # flakes drift sideways by up to this much
SNOW_SWAY_PERIOD_FRAMES = 60


def pixel(coordinate: float) -> int:
    """The pixel a coordinate falls in (halves round up, the same way for every reader)."""
    return math.floor(coordinate + 0.5)


def paste(frame: np.ndarray, mask: np.ndarray, colour: np.ndarray | RGB, xy: tuple[float, float]) -> None:
    """Paint a sprite's mask ([2r+1, 2r+1] bool) in one colour, centred on the pixel of `xy`, in place."""
    # the physics keeps every sprite inside the frame, so no clipping is needed
    radius = mask.shape[0] // 2
    x, y = pixel(xy[0]), pixel(xy[1])
    frame[y - radius : y + radius + 1, x - radius : x + radius + 1][mask] = colour


@dataclass(frozen=True)
class _Look:
    """The colours of one setting (terrain, weather, time of day), built on first use."""

    ground: np.ndarray  # uint8 [H, W, 3], copied into every frame
    objects: dict[ObjectKind, np.ndarray]
    rain: np.ndarray
    snowflake: np.ndarray


class Renderer:
    """Draws `WorldState`s of one `WorldConfig` into uint8 [height, width, 3] frames."""

    def __init__(self, config: WorldConfig, particle_seed: int = 0) -> None:
        self.config = config
        height, width = config.height, config.width
        rng = np.random.default_rng(particle_seed)
        self._rain_heads = rng.integers(0, (height, width), size=(config.rain_streaks, 2))
        self._flake_heads = rng.integers(0, (height, width), size=(config.snowflakes, 2))
        self._flake_fall_px = rng.integers(1, 3, size=config.snowflakes)  # near flakes fall faster
        self._flake_phase = rng.uniform(0, 2 * math.pi, size=config.snowflakes)
        self._looks: dict[tuple[Terrain, TimeOfDay, Weather], _Look] = {}

    def render(self, state: WorldState) -> np.ndarray:
        settings = state.settings
        look = self._look(settings)
        frame = look.ground.copy()
        for obj in state.objects:
            paste(frame, object_mask(obj.kind, self.config.object_radius_px), look.objects[obj.kind], obj.xy)
        if settings.weather is Weather.RAIN:
            self._draw_particles(frame, self._rain_positions(state.frame_index), rain_streak_offsets(), look.rain)
        elif settings.weather is Weather.SNOWFALL:
            self._draw_particles(frame, self._flake_positions(state.frame_index), snowflake_offsets(), look.snowflake)
        agent = agent_mask(settings.agent_shape, self.config.agent_radius_px)
        paste(frame, agent, AGENT_RGB[settings.agent_colour], state.agent_xy)
        return frame

    def _look(self, settings: SceneSettings) -> _Look:
        key = (settings.terrain, settings.time, settings.weather)
        if key not in self._looks:
            time, weather = settings.time, settings.weather
            ground = np.empty((self.config.height, self.config.width, 3), dtype=np.uint8)
            ground[:] = ground_rgb(settings.terrain, time, weather)
            objects = {kind: sprite_rgb(OBJECT_RGB[kind], time, weather) for kind in ObjectKind}
            rain, snowflake = sprite_rgb(RAIN_RGB, time, weather), sprite_rgb(SNOWFLAKE_RGB, time, weather)
            self._looks[key] = _Look(ground, objects, rain, snowflake)
        return self._looks[key]

    def _rain_positions(self, frame_index: int) -> np.ndarray:
        return self._rain_heads + frame_index * np.asarray(RAIN_STEP_PX)

    def _flake_positions(self, frame_index: int) -> np.ndarray:
        sway = np.rint(SNOW_SWAY_PX * np.sin(2 * math.pi * frame_index / SNOW_SWAY_PERIOD_FRAMES + self._flake_phase))
        return self._flake_heads + np.stack([self._flake_fall_px * frame_index, sway.astype(np.int64)], axis=1)

    def _draw_particles(
        self, frame: np.ndarray, heads: np.ndarray, offsets: tuple[np.ndarray, np.ndarray], colour: np.ndarray
    ) -> None:
        # particles wrap around the frame edges, so the same ones fall forever
        rows = (heads[:, :1] + offsets[0][None]) % self.config.height
        cols = (heads[:, 1:] + offsets[1][None]) % self.config.width
        frame[rows, cols] = colour
