import pytest
import torch

from framecast.models.errors import ConfigError
from framecast.stream.sampler import FlowMatchSchedule, renoise, to_clean


def test_schedule_is_the_shifted_flow_matching_table() -> None:
    schedule = FlowMatchSchedule(shift=5.0)
    s = torch.linspace(1, 0, 1001)[:-1].double()
    expected = 5 * s / (1 + 4 * s)
    torch.testing.assert_close(schedule.sigmas.double(), expected, rtol=0, atol=1e-6)
    assert schedule.sigmas.dtype == torch.float32 and len(schedule.timesteps) == 1000


@pytest.mark.parametrize(
    "raw, warped",
    [
        ((1000, 750, 500, 250), [1000.0, 937.5, 833.3333, 625.0]),
        ((1000, 500), [1000.0, 833.3333]),
        ((1000,), [1000.0]),
    ],
)
def test_warped_step_lists(raw: tuple, warped: list) -> None:
    assert FlowMatchSchedule(5.0).warp(raw) == pytest.approx(warped, abs=1e-4)


def test_steps_end_at_zero_and_chain_sigmas() -> None:
    steps = FlowMatchSchedule(5.0).steps((1000, 750, 500, 250))
    assert [s.is_last for s in steps] == [False, False, False, True]
    assert all(a.next_sigma == b.sigma for a, b in zip(steps, steps[1:]))
    assert steps[0].sigma == 1.0


def test_clean_estimate_and_renoise_are_the_flow_matching_identities() -> None:
    x0, noise = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    sigma = 0.75
    x = renoise(x0, noise, sigma)
    torch.testing.assert_close(to_clean(x, noise - x0, sigma), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(renoise(x0, noise, 0.0), x0, rtol=0, atol=0)


@pytest.mark.parametrize("raw, message", [((), "integers in"), ((500, 750), "strictly descend"), ((0,), "integers in")])
def test_bad_step_lists_are_rejected(raw: tuple, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FlowMatchSchedule(5.0).warp(raw)


def test_unwarped_steps_are_fed_as_timesteps_with_the_nearest_sigma() -> None:
    schedule = FlowMatchSchedule(shift=8.0)
    steps = schedule.steps((1000, 757, 522), warp=False)
    assert [s.timestep for s in steps] == [1000.0, 757.0, 522.0]
    assert steps[1].sigma == schedule.sigma_at(757.0) and steps[0].next_sigma == steps[1].sigma
    with pytest.raises(ConfigError, match="strictly descend"):
        schedule.steps((500, 757), warp=False)
