import numpy as np
import pytest

from framecast.models.errors import ConfigError
from framecast.models.world.prompt import SceneSettings, parse_prompt
from framecast.models.world.state import WorldConfig
from framecast.models.world.vocabulary import Action, TimeOfDay
from framecast.models.world.world import World
from framecast.stream.worldmodel.recipe import CHUNK_FRAMES
from framecast.stream.worldmodel.rollout import (
    StreamScript, command_line_script, parse_actions, parse_switch, random_script, world_rollout,
)


def test_random_actions_are_seeded_and_use_only_the_five_keys() -> None:
    first, again = parse_actions("random", 200, seed=3), parse_actions(" Random ", 200, seed=3)
    assert first.dtype == np.int64 and first.shape == (200,)
    assert np.array_equal(first, again)
    assert set(first.tolist()) <= set(range(len(Action))) == {0, 1, 2, 3, 4}
    assert not np.array_equal(first, parse_actions("random", 200, seed=4))


def test_listed_actions_hold_each_key_for_its_count_and_repeat_to_fill() -> None:
    assert parse_actions("right:3,up:2", 12).tolist() == [4, 4, 4, 1, 1] * 2 + [4, 4]
    assert parse_actions("left, none:2, DOWN", 4).tolist() == [3, 0, 0, 2]


@pytest.mark.parametrize("spec, part", [("jump:3", "jump:3"), ("right:0", "right:0"), ("right:x", "right:x"),
                                        ("right:2,,up", ""), ("up:-1", "up:-1")])
def test_bad_action_parts_are_named_with_the_keys(spec: str, part: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_actions(spec, 10)
    message = str(error.value)
    assert f"--actions part {part!r}" in message
    assert "none, up, down, left, right" in message and "random" in message


def test_switch_parses_frame_and_prompt() -> None:
    assert parse_switch("48:at night in rain") == (48, "at night in rain")
    assert parse_switch(" 7 :  fog ") == (7, "fog")
    assert parse_switch("0:a cyan triangle: on snow") == (0, "a cyan triangle: on snow")


@pytest.mark.parametrize("text", ["48", "48:", "48:   ", ":fog", "x:fog", "-3:fog", "1.5:fog"])
def test_bad_switches_are_refused_with_an_example(text: str) -> None:
    with pytest.raises(ConfigError, match="must be FRAME:PROMPT, e.g. '48:at night in rain'") as error:
        parse_switch(text)
    assert repr(text) in str(error.value)


def test_script_frames_round_up_to_whole_chunks() -> None:
    assert CHUNK_FRAMES == 3
    for frames, rounded in [(1, 3), (3, 3), (7, 9), (9, 9), (10, 12)]:
        script = command_line_script("grass", [], "random", frames)
        assert script.frames == rounded and len(script.settings) == rounded


def test_a_switch_lands_at_the_chunk_boundary_before_it_and_keeps_the_slots_it_does_not_name() -> None:
    first = parse_prompt("a cyan triangle on snow at dusk in fog")
    script = command_line_script("a cyan triangle on snow at dusk in fog", [(7, "at night")], "up", 12)
    assert script.settings[:6] == (first,) * 6
    assert script.settings[6:] == (first.replace(time=TimeOfDay.NIGHT),) * 6
    assert script.actions.tolist() == [int(Action.UP)] * 12


def test_switches_build_on_each_other_in_frame_order() -> None:
    script = command_line_script("a red circle", [(9, "in rain"), (3, "on sand")], "none", 12)
    assert [s.terrain.value for s in script.settings] == ["grass"] * 3 + ["sand"] * 9
    assert [s.weather.value for s in script.settings] == ["clear"] * 9 + ["rain"] * 3


@pytest.mark.parametrize("frame", [12, 100])
def test_a_switch_outside_the_video_is_refused(frame: int) -> None:
    with pytest.raises(ConfigError, match=f"--switch at frame {frame} is outside the video's 12 frames"):
        command_line_script("grass", [(frame, "at night")], "random", 12)


def test_a_switch_with_an_unknown_word_names_it() -> None:
    with pytest.raises(ConfigError, match="unknown word 'purple'"):
        command_line_script("grass", [(3, "purple")], "random", 6)


def test_world_rollout_is_deterministic_and_is_the_world_rendered_under_the_script() -> None:
    script = command_line_script("a yellow square on sand", [(6, "at night in snowfall")], "right:4,down:2", 12)
    rollout = world_rollout(script, seed=5)
    assert rollout.frames.shape == (12, 128, 128, 3) and rollout.frames.dtype == np.uint8
    assert np.array_equal(rollout.frames, world_rollout(script, seed=5).frames)
    assert rollout.settings == script.settings and np.array_equal(rollout.actions, script.actions)
    world = World(WorldConfig(), 5, script.settings[0])
    for t in range(script.frames):
        if script.settings[t] != world.state.settings:
            world.set_settings(script.settings[t])
        world.step(int(script.actions[t]))
        assert np.array_equal(rollout.frames[t], world.render()), t
    assert not np.array_equal(rollout.frames[5], rollout.frames[6])


def test_random_script_switches_only_at_multiples_of_the_chunk() -> None:
    script = random_script(seed=2, frames=60, switch_every=6)
    changes = [t for t in range(1, 60) if script.settings[t] != script.settings[t - 1]]
    assert changes == list(range(6, 60, 6))  # a new scene always differs from the one before
    assert np.array_equal(script.actions, random_script(2, 60, 6).actions)
    assert script.settings == random_script(2, 60, 6).settings
    assert set(script.actions.tolist()) <= {0, 1, 2, 3, 4}


def test_random_script_without_switches_keeps_one_scene() -> None:
    script = random_script(seed=1, frames=30, switch_every=None)
    assert len(set(script.settings)) == 1


@pytest.mark.parametrize("every", [4, 7])
def test_random_script_refuses_switches_off_the_chunk_grid(every: int) -> None:
    with pytest.raises(ConfigError, match=f"switch_every={every} must be a multiple of the chunk"):
        random_script(seed=0, frames=30, switch_every=every)


def test_a_script_needs_one_setting_per_action() -> None:
    with pytest.raises(ConfigError, match="2 settings for 3 actions"):
        StreamScript((SceneSettings(),) * 2, np.zeros(3, dtype=np.int64))


def test_a_guided_stream_is_seeded_decoded_and_steered_by_its_scale() -> None:
    import torch

    from framecast.stream.worldmodel.bundle import WorldModel
    from framecast.stream.worldmodel.rollout import guided_rollout

    torch.set_num_threads(1)
    model = WorldModel.load(which="teacher")
    script = random_script(3, 9, 6)  # a switch at frame 6: the second prompt recaches both windows
    runs = [guided_rollout(model, script, 2, scale, seed=1) for scale in (1.0, 1.0, 3.0)]
    assert runs[0].frames.shape == (9, 128, 128, 3) and runs[0].frames.dtype == np.uint8
    assert runs[0].settings == script.settings
    assert np.array_equal(runs[0].frames, runs[1].frames)
    assert not np.array_equal(runs[0].frames, runs[2].frames)
    with pytest.raises(ConfigError, match="whole number"):
        guided_rollout(model, StreamScript(script.settings[:4], script.actions[:4]), 2, 1.0)


def test_replay_opening_plays_the_first_frames_again_and_nothing_else_changes():
    from framecast.stream.worldmodel.rollout import replay_opening

    script = random_script(3, 90, 30)
    replayed = replay_opening(script, 24, 60)
    assert replayed.settings[60:84] == script.settings[:24]
    assert (replayed.actions[60:84] == script.actions[:24]).all()
    assert replayed.settings[:60] + replayed.settings[84:] == script.settings[:60] + script.settings[84:]
    assert (replayed.actions[:60] == script.actions[:60]).all() and (replayed.actions[84:] == script.actions[84:]).all()
    with pytest.raises(ConfigError, match="chunk boundary"):
        replay_opening(script, 24, 61)
    with pytest.raises(ConfigError, match=r"in \[24, 66\]"):
        replay_opening(script, 24, 69)
