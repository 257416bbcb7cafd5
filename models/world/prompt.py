"""Scene settings and the prompt language: `parse_prompt` turns text into settings, `describe` turns them back.

The grammar is a bag of words: every vocabulary word names one slot (see `vocabulary.py`), a few filler words
("a", "on", "at", ...) are allowed anywhere, and order does not matter: "a red circle on snow at night in fog" and
"fog, night, snow, red circle" are the same scene. A slot the prompt does not mention keeps its value from
`defaults`, so a mid-episode prompt such as "at night" changes only the time of day. Any other word is an error
that lists the vocabulary and the closest words.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from framecast.models.errors import ConfigError
from framecast.models.world.vocabulary import AgentColour, AgentShape, Terrain, TimeOfDay, Weather

# the fields of SceneSettings, in the order describe() speaks of them, with the word used for each in messages
SLOTS: dict[str, type[enum.Enum]] = {
    "agent_colour": AgentColour,
    "agent_shape": AgentShape,
    "terrain": Terrain,
    "time": TimeOfDay,
    "weather": Weather,
}
FILLER_WORDS = ("a", "an", "the", "on", "in", "at", "by", "under", "with", "and", "during", "weather")


@dataclass(frozen=True)
class SceneSettings:
    """What a prompt fixes: the setting (terrain, weather, time of day) and the player's look."""

    terrain: Terrain = Terrain.GRASS
    weather: Weather = Weather.CLEAR
    time: TimeOfDay = TimeOfDay.DAY
    agent_shape: AgentShape = AgentShape.CIRCLE
    agent_colour: AgentColour = AgentColour.RED

    def __post_init__(self) -> None:
        for name, kind in SLOTS.items():
            value = getattr(self, name)
            if not isinstance(value, kind):
                raise ConfigError(f"{name}={value!r} must be a {kind.__name__}: one of {[m.value for m in kind]}")

    def replace(self, **changes: object) -> SceneSettings:
        """A copy with some slots changed (validated again)."""
        unknown = sorted(set(changes) - set(SLOTS))
        if unknown:
            raise ConfigError(f"unknown SceneSettings field(s) {unknown}; fields: {list(SLOTS)}")
        return dataclasses.replace(self, **changes)


# word -> (slot, member); built from the enums so the two never disagree
_WORDS: dict[str, tuple[str, enum.Enum]] = {member.value: (slot, member) for slot, kind in SLOTS.items() for member in kind}
assert len(_WORDS) == sum(len(kind) for kind in SLOTS.values()), "a word names two slots"
assert not set(_WORDS) & set(FILLER_WORDS)


def vocabulary_text() -> str:
    """The whole vocabulary, one slot per clause, for error messages."""
    slots = "; ".join(f"{slot.replace('_', ' ')}: {', '.join(m.value for m in kind)}" for slot, kind in SLOTS.items())
    return f"{slots}; filler words: {', '.join(FILLER_WORDS)}"


def parse_prompt(text: str, defaults: SceneSettings = SceneSettings()) -> SceneSettings:
    """The settings a prompt names; slots it leaves out come from `defaults`.

    Raises:
        ConfigError: a word outside the vocabulary (the message lists the vocabulary and close matches), or two
            different words for one slot ("red ... cyan").
    """
    if not isinstance(text, str):
        raise ConfigError(f"prompt {text!r} must be a string")
    named: dict[str, enum.Enum] = {}
    for word in re.split(r"[\s,.;:!?]+", text.lower()):
        if not word or word in FILLER_WORDS:
            continue
        if word not in _WORDS:
            close = difflib.get_close_matches(word, [*_WORDS, *FILLER_WORDS], n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown word {word!r} in prompt {text!r}{hint}; vocabulary: {vocabulary_text()}")
        slot, member = _WORDS[word]
        if named.get(slot, member) is not member:
            raise ConfigError(
                f"prompt {text!r} names two {slot.replace('_', ' ')}s, {named[slot].value!r} and {word!r}; give one"
            )
        named[slot] = member
    return defaults.replace(**named)


_TIME_PHRASE = {TimeOfDay.DAY: "by day", TimeOfDay.DUSK: "at dusk", TimeOfDay.NIGHT: "at night"}
_WEATHER_PHRASE = {
    Weather.CLEAR: "in clear weather",
    Weather.RAIN: "in rain",
    Weather.SNOWFALL: "in snowfall",
    Weather.FOG: "in fog",
}


def describe(settings: SceneSettings) -> str:
    """The prompt for a scene, naming every slot: "a red circle on grass by day in clear weather"."""
    return (
        f"a {settings.agent_colour.value} {settings.agent_shape.value} on {settings.terrain.value} "
        f"{_TIME_PHRASE[settings.time]} {_WEATHER_PHRASE[settings.weather]}"
    )


def all_settings() -> Iterator[SceneSettings]:
    """Every combination of the vocabulary (4 * 4 * 3 * 4 * 4 = 768 scenes)."""
    for terrain, weather, time, shape, colour in itertools.product(Terrain, Weather, TimeOfDay, AgentShape, AgentColour):
        yield SceneSettings(terrain, weather, time, shape, colour)


def random_settings(rng: np.random.Generator, unlike: SceneSettings | None = None) -> SceneSettings:
    """A uniformly drawn scene; with `unlike`, one that differs from it in at least one slot."""
    while True:
        settings = SceneSettings(**{slot: list(kind)[rng.integers(len(kind))] for slot, kind in SLOTS.items()})
        if settings != unlike:
            return settings
