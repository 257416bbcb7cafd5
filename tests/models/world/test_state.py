import pytest

from framecast.models.errors import ConfigError
from framecast.models.world.state import WorldConfig


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(height=0), "height=0 must be a positive integer"),
        (dict(balls=-1), "balls=-1 must be an integer >= 0"),
        (dict(agent_radius_px=2), "agent_radius_px=2 must be >= 3"),
        (dict(width=40), "frame 128x40 must be >= 32 px per side"),
        (dict(velocity_retention=1.0), r"velocity_retention=1.0 must be in \[0, 1\)"),
        (dict(agent_accel_px=0.0), "agent_accel_px=0.0 must be > 0"),
        (dict(ball_speed_px=(2.0, 1.0)), r"ball_speed_px=\(2.0, 1.0\) must be a range"),
    ],
)
def test_invalid_config_values_name_value_and_range(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        WorldConfig(**changes)


def test_top_speed_follows_from_acceleration_and_friction() -> None:
    config = WorldConfig(agent_accel_px=1.0, velocity_retention=0.5)
    assert config.agent_top_speed_px == 2.0
