"""The closed vocabulary of the procedural world: the words a prompt may use, and the player's actions.

Each enum is one prompt slot; an enum's values are the words that name it. No word belongs to two slots (the
weather is `snowfall`, the terrain `snow`), so a prompt parses word by word in any order. The sets are small on
purpose: every member must stay recognisable at 128x128 after a lossy autoencoder (see `palette.py`).
"""

from __future__ import annotations

import enum


class Terrain(enum.Enum):
    """The ground: the frame's dominant colour."""

    GRASS = "grass"
    SAND = "sand"
    SNOW = "snow"
    WATER = "water"


class Weather(enum.Enum):
    """An overlay: falling particles (rain streaks, snowflakes) or a haze over the ground and objects."""

    CLEAR = "clear"
    RAIN = "rain"
    SNOWFALL = "snowfall"
    FOG = "fog"


class TimeOfDay(enum.Enum):
    """The lighting: the ground's colour and brightness, and a milder tint on objects and particles."""

    DAY = "day"
    DUSK = "dusk"
    NIGHT = "night"


class AgentShape(enum.Enum):
    """The player's sprite."""

    CIRCLE = "circle"
    SQUARE = "square"
    TRIANGLE = "triangle"
    DIAMOND = "diamond"


class AgentColour(enum.Enum):
    """The player's colour: saturated colours that no ground, object or particle comes close to."""

    RED = "red"
    YELLOW = "yellow"
    MAGENTA = "magenta"
    CYAN = "cyan"


class Action(enum.IntEnum):
    """A key held during one frame; ids 0..4 are the action ids an action-conditioned model is given."""

    NONE = 0  # the engine's convention: 0 is "no action"
    UP = 1
    DOWN = 2
    LEFT = 3
    RIGHT = 4
