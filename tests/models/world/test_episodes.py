import numpy as np
import pytest

from framecast.models.errors import ConfigError
from framecast.models.world.episodes import HeldKeys, make_episode
from framecast.models.world.ground_truth import read_agent, read_scene
from framecast.models.world.prompt import SceneSettings, parse_prompt
from framecast.models.world.state import WorldConfig


def test_shapes_types_and_ground_truth_agree_with_the_frames() -> None:
    episode = make_episode(0, 60, switch_every=20)
    assert episode.frames.shape == (60, 128, 128, 3) and episode.frames.dtype == np.uint8
    assert episode.actions.shape == (60,) and episode.actions.dtype == np.int64
    assert len(episode.settings) == 60 and episode.agent_xy.shape == (60, 2)
    for t in (0, 19, 20, 59):
        assert read_scene(episode.frames[t]) == episode.settings[t]
        assert np.allclose(read_agent(episode.frames[t]).xy, episode.agent_xy[t], atol=0.75)


def test_same_seed_same_episode() -> None:
    first, second = make_episode(4, 40, switch_every=10), make_episode(4, 40, switch_every=10)
    assert np.array_equal(first.frames, second.frames) and np.array_equal(first.actions, second.actions)
    assert first.settings == second.settings
    assert not np.array_equal(first.frames, make_episode(5, 40, switch_every=10).frames)


def test_switches_change_the_prompt_and_keep_the_agent_moving_smoothly() -> None:
    config = WorldConfig()
    episode = make_episode(1, 100, switch_every=25, settings=parse_prompt("a red circle on grass by day in clear weather"))
    assert episode.settings[0] == SceneSettings()
    assert episode.switch_frames == (0, 25, 50, 75) and len(episode.prompts) == 4
    steps = np.linalg.norm(np.diff(episode.agent_xy, axis=0), axis=1)
    assert steps.max() <= config.agent_top_speed_px + 1e-9  # no jump at a switch, only motion
    assert make_episode(1, 100).switch_frames == (0,)


def test_held_keys_are_held_like_a_players() -> None:
    actions = HeldKeys(mean_hold_frames=8.0, none_share=0.2).actions(np.random.default_rng(0), 20_000)
    assert set(np.unique(actions)) == {0, 1, 2, 3, 4}
    runs = np.diff(np.flatnonzero(np.diff(actions)))
    assert 7 < runs.mean() < 14  # a new press may repeat the key, so runs are a bit longer than the holds
    assert 0.15 < (actions == 0).mean() < 0.25


def test_bad_arguments_are_errors() -> None:
    with pytest.raises(ConfigError, match="frames=0 must be a positive integer"):
        make_episode(0, 0)
    with pytest.raises(ConfigError, match="switch_every=0"):
        make_episode(0, 10, switch_every=0)
    with pytest.raises(ConfigError, match="mean_hold_frames=0.5 must be >= 1"):
        HeldKeys(mean_hold_frames=0.5)

    class Broken:
        def actions(self, rng: np.random.Generator, frames: int) -> np.ndarray:
            return np.full(frames, 7)

    with pytest.raises(ConfigError, match=r"the policy gave action ids .* in \[7, 7\]"):
        make_episode(0, 10, policy=Broken())
