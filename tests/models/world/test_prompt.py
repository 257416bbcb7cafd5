import numpy as np
import pytest

from framecast.models.errors import ConfigError
from framecast.models.world.prompt import SceneSettings, all_settings, describe, parse_prompt, random_settings
from framecast.models.world.vocabulary import AgentColour, AgentShape, Terrain, TimeOfDay, Weather


def test_describe_then_parse_is_the_identity_for_every_scene() -> None:
    scenes = list(all_settings())
    assert len(scenes) == len(set(scenes)) == 4 * 4 * 3 * 4 * 4
    texts = [describe(s) for s in scenes]
    assert len(set(texts)) == len(scenes)
    for scene, text in zip(scenes, texts):
        assert parse_prompt(text) == scene, text


def test_parse_is_order_free_and_case_blind() -> None:
    expected = SceneSettings(Terrain.SNOW, Weather.FOG, TimeOfDay.NIGHT, AgentShape.CIRCLE, AgentColour.RED)
    assert parse_prompt("a red circle on snow at night in fog") == expected
    assert parse_prompt("Fog, NIGHT; snow. circle red!") == expected


def test_missing_slots_come_from_the_defaults() -> None:
    assert parse_prompt("") == SceneSettings()
    before = parse_prompt("a cyan diamond on water at dusk in rain")
    after = parse_prompt("at night", defaults=before)  # a mid-episode prompt changes only what it names
    assert after == before.replace(time=TimeOfDay.NIGHT)


def test_unknown_word_lists_the_vocabulary_and_close_matches() -> None:
    expected = r"unknown word 'snwo' in prompt 'a red circle on snwo' \(did you mean snow\?\); vocabulary: "
    with pytest.raises(ConfigError, match=expected) as error:
        parse_prompt("a red circle on snwo")
    message = str(error.value)
    for kind in (Terrain, Weather, TimeOfDay, AgentShape, AgentColour):
        for member in kind:
            assert member.value in message
    with pytest.raises(ConfigError, match="did you mean magenta"):
        parse_prompt("a magneta square")


def test_two_words_for_one_slot_are_an_error() -> None:
    with pytest.raises(ConfigError, match="names two agent colours, 'red' and 'cyan'"):
        parse_prompt("a red cyan circle")
    assert parse_prompt("red red circle").agent_colour is AgentColour.RED  # a repeat is no conflict


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"terrain='snow' must be a Terrain: one of \['grass', 'sand', 'snow', 'water'\]"):
        SceneSettings(terrain="snow")
    with pytest.raises(ConfigError, match="unknown SceneSettings field"):
        SceneSettings().replace(colour=AgentColour.RED)
    with pytest.raises(ConfigError, match="must be a string"):
        parse_prompt(None)


def test_random_settings_are_seeded_and_can_differ_from_a_given_scene() -> None:
    first = [random_settings(np.random.default_rng(3)) for _ in range(2)]
    assert first[0] == first[1]
    rng = np.random.default_rng(0)
    scene = SceneSettings()
    assert all(random_settings(rng, unlike=scene) != scene for _ in range(200))
