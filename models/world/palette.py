"""Every colour the world draws, chosen so that the scene can be read back from pixels.

The ground colour depends on (terrain, time of day, fog or not): 24 colours at least 35 RGB levels apart, so the
frame's median colour names terrain, time and fog (`ground_truth.py`). Objects and particles get a milder version of
the lighting, so they stay visible at night. The agent is drawn unlit and unfogged in saturated colours that are
more than 100 levels from anything else in any scene, so its pixels are found by colour alone. Rain and snowfall are
both near-white particles, at least 75 levels from the clear ground they fall on; they differ in shape (streaks or
flakes). The tables were tuned numerically for these margins; `tests/models/world/test_palette.py` guards them.
"""

from __future__ import annotations

import numpy as np

from framecast.models.world.state import ObjectKind
from framecast.models.world.vocabulary import AgentColour, Terrain, TimeOfDay, Weather

RGB = tuple[int, int, int]

_GRASS, _SAND, _SNOW, _WATER = Terrain.GRASS, Terrain.SAND, Terrain.SNOW, Terrain.WATER
GROUND_RGB: dict[TimeOfDay, dict[Terrain, RGB]] = {
    TimeOfDay.DAY: {_GRASS: (61, 175, 43), _SAND: (239, 193, 137), _SNOW: (170, 211, 228), _WATER: (59, 117, 187)},
    TimeOfDay.DUSK: {_GRASS: (75, 132, 59), _SAND: (185, 124, 76), _SNOW: (194, 141, 195), _WATER: (89, 50, 152)},
    TimeOfDay.NIGHT: {_GRASS: (5, 75, 26), _SAND: (104, 95, 54), _SNOW: (113, 101, 170), _WATER: (32, 10, 104)},
}
FOG_RGB: dict[TimeOfDay, RGB] = {
    TimeOfDay.DAY: (168, 172, 178),
    TimeOfDay.DUSK: (170, 145, 140),
    TimeOfDay.NIGHT: (80, 84, 108),
}
FOG_ALPHA_GROUND = 0.64  # share of fog colour in a fogged ground pixel
FOG_ALPHA_SPRITES = 0.4  # objects are fogged less, so their motion stays visible

# per-channel gain on objects and particles (the ground has its own table above)
SPRITE_LIGHT: dict[TimeOfDay, tuple[float, float, float]] = {
    TimeOfDay.DAY: (1.0, 1.0, 1.0),
    TimeOfDay.DUSK: (1.0, 0.85, 0.75),
    TimeOfDay.NIGHT: (0.65, 0.7, 0.9),
}
OBJECT_RGB: dict[ObjectKind, RGB] = {ObjectKind.BALL: (50, 50, 58), ObjectKind.ORBITER: (100, 62, 38)}
RAIN_RGB: RGB = (235, 240, 255)
SNOWFLAKE_RGB: RGB = (255, 255, 255)
AGENT_RGB: dict[AgentColour, RGB] = {
    AgentColour.RED: (230, 30, 40),
    AgentColour.YELLOW: (250, 220, 0),
    AgentColour.MAGENTA: (225, 40, 225),
    AgentColour.CYAN: (20, 230, 230),
}


def _blend(rgb: np.ndarray, towards: RGB, alpha: float) -> np.ndarray:
    return (1 - alpha) * rgb + alpha * np.asarray(towards, dtype=np.float64)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def ground_rgb(terrain: Terrain, time: TimeOfDay, weather: Weather) -> np.ndarray:
    """The ground colour of a scene, uint8 [3]."""
    rgb = np.asarray(GROUND_RGB[time][terrain], dtype=np.float64)
    if weather is Weather.FOG:
        rgb = _blend(rgb, FOG_RGB[time], FOG_ALPHA_GROUND)
    return _to_uint8(rgb)


def sprite_rgb(rgb: RGB, time: TimeOfDay, weather: Weather) -> np.ndarray:
    """An object's or a particle's colour as lit by the time of day and fogged, uint8 [3]."""
    lit = np.asarray(rgb, dtype=np.float64) * np.asarray(SPRITE_LIGHT[time])
    if weather is Weather.FOG:
        lit = _blend(lit, FOG_RGB[time], FOG_ALPHA_SPRITES)
    return _to_uint8(lit)
