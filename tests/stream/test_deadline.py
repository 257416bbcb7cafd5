"""The deadline scheduler on fake time: injected costs (steady, gradual and sudden slowdowns, recoveries), the declared
degradation order, hysteresis, probes, per-frame records and the miss rate; the online cost model; config checks."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from fractions import Fraction

import pytest

from framecast.models.errors import ConfigError
from framecast.stream.deadline import (
    Action,
    CostModel,
    DeadlineConfig,
    DeadlineScheduler,
    Decision,
    Degradation,
    Fill,
    FrameRecord,
    Rung,
)

FULL, HALF, ONE = (1000, 750, 500, 250), (1000, 500), (1000,)


class FakeTime:
    """A monotonic time source the test moves by hand."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Oracle:
    """A cost model that predicts exactly what the test sets and learns nothing."""

    def __init__(self, default: float = 0.0) -> None:
        self.default = default
        self.costs: dict[tuple[Action, int], float] = {}
        self.observed: list[tuple[Action, int, dict]] = []
        self.forgotten: list[Action] = []

    def predict(self, action: Action, steps: int) -> float:
        return self.costs.get((action, steps), self.default)

    def observe(self, action: Action, steps: int, stage_seconds: Mapping[str, float]) -> None:
        self.observed.append((action, steps, dict(stage_seconds)))

    def forget(self, action: Action) -> None:
        self.forgotten.append(action)


Costs = Callable[[Decision], dict[str, float]]


def engine_costs(per_step_s: Callable[[int], float], context_s: Callable[[int], float], fill_s: float = 0.001) -> Costs:
    """True stage seconds of a chunk: `per_step_s(chunk)` per denoising step plus a context pass; fills are cheap."""

    def costs(decision: Decision) -> dict[str, float]:
        if decision.action is Action.GENERATE:
            chunk = decision.chunk
            return {"denoise": per_step_s(chunk) * len(decision.steps), "context": context_s(chunk)}
        return {decision.action.value: fill_s}

    return costs


def simulate(
    config: DeadlineConfig, costs: Costs, chunks: int, *, paced: bool = True, cost_model: object = None
) -> tuple[DeadlineScheduler, list[Decision], list[tuple[FrameRecord, ...]]]:
    """Run a producer on fake time: plan, spend the chunk's true cost, observe.

    Paced, the producer starts a chunk no earlier than its first frame's media time (so it is never more than the
    latency budget ahead of the sink); unpaced, it starts each chunk as soon as the previous one is done.
    """
    now = FakeTime(0.0)
    scheduler = DeadlineScheduler(config, cost_model, now=now)
    decisions, records = [], []
    for chunk in range(chunks):
        if paced:
            now.t = max(now.t, scheduler.clock.start_s + float(scheduler.clock.media_time(config.frames(chunk).start)))
        decision = scheduler.plan()
        stages = {} if decision.action is Action.DROP else costs(decision)
        now.t += sum(stages.values())
        records.append(scheduler.observe(decision, stages))
        decisions.append(decision)
    return scheduler, decisions, records


def rung_changes(decisions: list[Decision]) -> list[tuple[int, int, int]]:
    """(chunk, from rung, to rung) at every change of rung."""
    return [(b.chunk, a.rung, b.rung) for a, b in zip(decisions, decisions[1:]) if a.rung != b.rung]


def assert_climbs_wait_for_hysteresis(decisions: list[Decision], recovery_chunks: int, fill_rung: int) -> None:
    """Every climb (except drop -> fill) comes after at least recovery_chunks chunks on the lower rung."""
    last_change = 0
    for chunk, old, new in rung_changes(decisions):
        if new < old and new != fill_rung:
            assert chunk - last_change >= recovery_chunks, (chunk, old, new, last_change)
        last_change = chunk


BUDGET = DeadlineConfig(latency_budget_s=0.5)  # 16 fps, chunks of 3 latent frames = 12 video frames = 0.75 s


# --- layout and ladder


def test_chunks_cover_the_video_frames_by_the_wan_vae_rule() -> None:
    config = DeadlineConfig(chunk_frames=3)
    assert [config.frames(k) for k in range(3)] == [range(0, 9), range(9, 21), range(21, 33)]
    assert DeadlineConfig(chunk_frames=1).frames(0) == range(0, 1)
    assert DeadlineConfig(chunk_frames=1).frames(5) == range(17, 21)
    assert DeadlineConfig(chunk_frames=2, frames_per_latent=1).frames(4) == range(8, 10)


def test_ladder_is_the_declared_order() -> None:
    ladder = DeadlineConfig(fill=Fill.INTERPOLATE).ladder
    assert ladder == (
        Rung(Action.GENERATE, FULL), Rung(Action.GENERATE, HALF), Rung(Action.GENERATE, ONE),
        Rung(Action.INTERPOLATE), Rung(Action.DROP),
    )
    assert DeadlineConfig().ladder[3] == Rung(Action.REPEAT)


# --- steady, gradual, sudden


@pytest.mark.parametrize("paced", [True, False])
def test_steady_fast_steps_keep_full_steps_and_miss_nothing(paced: bool) -> None:
    scheduler, decisions, records = simulate(BUDGET, engine_costs(lambda k: 0.05, lambda k: 0.02), 200, paced=paced)
    assert {d.rung for d in decisions} == {0} and {d.steps for d in decisions} == {FULL}
    assert all(d.degradation is None and not d.is_probe for d in decisions)
    assert scheduler.frames_total == 9 + 199 * 12 and scheduler.frames_missed == 0 and scheduler.miss_rate == 0.0
    assert all(r.steps == 4 and r.action is Action.GENERATE and not r.is_missed for chunk in records for r in chunk)


def test_gradually_slower_steps_degrade_in_the_declared_order() -> None:
    """Everything slows by 10% of the start per chunk: fewer steps (4, then 2, then 1), then interpolate, then drop."""
    config = DeadlineConfig(latency_budget_s=0.5, fill=Fill.INTERPOLATE, probe_chunks=0)
    slow = lambda chunk: 1 + 0.1 * chunk  # noqa: E731
    costs = engine_costs(lambda k: 0.05 * slow(k), lambda k: 0.01 * slow(k))

    def interpolate(decision: Decision) -> dict[str, float]:
        if decision.action is Action.INTERPOLATE:
            return {"interpolate": 0.02 * slow(decision.chunk)}
        return costs(decision)

    scheduler, decisions, records = simulate(config, interpolate, 300)
    rungs = [d.rung for d in decisions]
    assert rungs == sorted(rungs)  # never back up while it only gets slower
    visited = list(dict.fromkeys(rungs))
    assert visited == [0, 1, 2, 3, 4]
    assert [decisions[rungs.index(r)].degradation for r in visited] == [
        None, Degradation.FEWER_STEPS, Degradation.FEWER_STEPS, Degradation.INTERPOLATE, Degradation.DROP,
    ]
    assert [decisions[rungs.index(r)].steps for r in visited] == [FULL, HALF, ONE, (), ()]
    # each step down comes just before the rung would miss (true cost 0.4-0.5 s of 0.5 s), so only drops miss
    seconds_per_slow = {0: 0.21, 1: 0.11, 2: 0.06, 3: 0.02}  # 4, 2, 1 steps with the context pass; interpolate
    for rung, seconds in seconds_per_slow.items():
        first_below = rungs.index(rung + 1)
        assert 0.4 < seconds * slow(first_below) <= 0.5, (rung, first_below)
    missed = {r.chunk for chunk in records for r in chunk if r.is_missed}
    assert missed == {d.chunk for d in decisions if d.action is Action.DROP}
    assert scheduler.miss_rate == pytest.approx(scheduler.frames_missed / scheduler.frames_total)


def test_sudden_slowdown_degrades_at_once_and_recovers_with_hysteresis() -> None:
    """4x slower for chunks 20-29: the surprise costs chunk 20 alone; the scheduler drops to the rung that fits and
    climbs back one rung at a time, each after recovery_chunks chunks with slack, and stays at full steps."""
    slow = lambda k: 4.0 if 20 <= k < 30 else 1.0  # noqa: E731
    costs = engine_costs(lambda k: 0.05 * slow(k), lambda k: 0.02 * slow(k))
    scheduler, decisions, records = simulate(BUDGET, costs, 80)
    changes = rung_changes(decisions)
    assert changes[0] == (21, 0, 2)  # 4 steps take 0.88 s and 2 steps 0.48 s (too close): 1 step
    assert [(old, new) for _, old, new in changes] == [(0, 2), (2, 1), (1, 0)]
    assert changes[1][0] >= 30 + BUDGET.recovery_chunks  # no climbing while still slow
    assert_climbs_wait_for_hysteresis(decisions, BUDGET.recovery_chunks, fill_rung=3)
    missed_chunks = {r.chunk for chunk in records for r in chunk if r.is_missed}
    assert missed_chunks == {20}
    # chunk 20 took 0.88 s from its start at its media time: frames due within 0.5 + j/16 < 0.88 s are late, j = 0..6
    assert [r.is_missed for r in records[20]] == [True] * 7 + [False] * 5
    assert scheduler.frames_missed == 7 and scheduler.miss_rate == 7 / (9 + 79 * 12)


def test_noisy_costs_at_the_edge_do_not_flap() -> None:
    """Full steps cost 0.45 s +- 20% against a 0.5 s budget: the hysteresis bounds the rung changes."""
    rng = random.Random(0)
    jitter = [rng.uniform(0.8, 1.2) for _ in range(400)]
    costs = engine_costs(lambda k: 0.1 * jitter[k], lambda k: 0.05 * jitter[k])
    _, steady, _ = simulate(BUDGET, costs, 400)
    _, twitchy, _ = simulate(DeadlineConfig(latency_budget_s=0.5, recovery_chunks=1), costs, 400)
    assert_climbs_wait_for_hysteresis(steady, BUDGET.recovery_chunks, fill_rung=3)
    assert len(rung_changes(steady)) <= 2 * 400 // BUDGET.recovery_chunks
    assert len(rung_changes(steady)) < len(rung_changes(twitchy)) / 2
    assert {d.action for d in steady} == {Action.GENERATE}  # 1 or 2 steps always fit: never a fill


def test_recovery_slack_holds_the_climb_until_there_is_room() -> None:
    """From chunk 5 a step costs 0.2 s: 2 steps take 0.47 s of the 0.5 s budget. Once the estimate settles they fit,
    but not with 0.1 s to spare: with recovery_slack_s=0.1 the stream stays at 1 step."""
    costs = engine_costs(lambda k: 0.2 if k >= 5 else 0.05, lambda k: 0.07)
    _, decisions, _ = simulate(DeadlineConfig(latency_budget_s=0.5), costs, 60)
    assert [(old, new) for _, old, new in rung_changes(decisions)] == [(0, 2), (2, 1)]
    _, decisions, _ = simulate(DeadlineConfig(latency_budget_s=0.5, recovery_slack_s=0.1), costs, 60)
    assert [(old, new) for _, old, new in rung_changes(decisions)] == [(0, 2)]


def test_probes_re_measure_a_stale_cost_after_a_spike() -> None:
    """A 20x spike sends the stream to repeats; the generate cost learned in it stays stale while nothing is
    generated. Without probes the stream repeats forever; a probe re-measures it and the stream climbs back."""
    slow = lambda k: 20.0 if 10 <= k < 15 else 1.0  # noqa: E731
    costs = engine_costs(lambda k: 0.05 * slow(k), lambda k: 0.02 * slow(k))
    _, stuck, _ = simulate(DeadlineConfig(latency_budget_s=0.5, probe_chunks=0), costs, 80)
    assert {d.action for d in stuck[30:]} == {Action.REPEAT}

    config = DeadlineConfig(latency_budget_s=0.5, probe_chunks=6)
    scheduler, decisions, records = simulate(config, costs, 80)
    probes = [d for d in decisions if d.is_probe]
    assert len(probes) == 1 and probes[0].steps == ONE and probes[0].slack_s < 0  # generated against the prediction
    before = decisions[: probes[0].chunk]
    assert [d.action for d in before[-config.probe_chunks:]].count(Action.GENERATE) == 0
    assert decisions[-1].rung == 0 and all(d.rung == 0 for d in decisions[40:])
    # the spike's first chunk (10) is late and the drops catch up; from the first repeat on, nothing is missed
    first_repeat = next(d.chunk for d in decisions if d.action is Action.REPEAT)
    assert all(not r.is_missed for chunk in records[first_repeat:] for r in chunk)
    assert {d.action for d in decisions[11:first_repeat]} == {Action.DROP}


def test_probes_wait_for_a_chunk_that_can_still_make_it() -> None:
    oracle = Oracle(default=10.0)  # nothing ever fits
    now = FakeTime(0.0)
    scheduler = DeadlineScheduler(DeadlineConfig(latency_budget_s=0.5, probe_chunks=2), oracle, now=now)
    first = scheduler.plan()
    scheduler.observe(first, {"denoise": 10.0})
    now.t = 100.0  # far behind: every later chunk is already late
    decisions = [scheduler.plan() for _ in range(6)]
    assert [d.action for d in decisions] == [Action.DROP] * 6 and not any(d.is_probe for d in decisions)


def test_a_probe_replaces_the_estimate_it_doubted() -> None:
    oracle = Oracle()
    now = FakeTime(0.0)
    scheduler = DeadlineScheduler(DeadlineConfig(latency_budget_s=0.5, probe_chunks=2), oracle, now=now)
    scheduler.observe(scheduler.plan(), {"denoise": 0.1})
    oracle.costs.update({(Action.GENERATE, 4): 9.0, (Action.GENERATE, 2): 9.0, (Action.GENERATE, 1): 9.0})
    fills = [scheduler.plan(), scheduler.plan()]
    probe = scheduler.plan()
    assert [d.action for d in fills] == [Action.REPEAT] * 2 and probe.is_probe and probe.steps == ONE
    for decision in fills:
        scheduler.observe(decision, {"repeat": 0.0})
    assert oracle.forgotten == []
    scheduler.observe(probe, {"denoise": 0.1})
    assert oracle.forgotten == [Action.GENERATE] and oracle.observed[-1] == (Action.GENERATE, 1, {"denoise": 0.1})


# --- declared order with an oracle


def test_declared_order_with_an_oracle_cost_model() -> None:
    """Raise the predicted costs one rung at a time: the scheduler takes the rungs in the declared order."""
    oracle = Oracle()
    now = FakeTime(0.0)
    scheduler = DeadlineScheduler(DeadlineConfig(latency_budget_s=0.5), oracle, now=now)
    too_slow = 1.0  # against 0.5 s of budget
    steps = []
    for slow in [(), (FULL,), (FULL, HALF), (FULL, HALF, ONE), (FULL, HALF, ONE, "repeat")]:
        for key in slow:
            oracle.costs[(Action.REPEAT, 0) if key == "repeat" else (Action.GENERATE, len(key))] = too_slow
        media = scheduler.clock.start_s + float(scheduler.clock.media_time(scheduler.config.frames(len(steps)).start))
        now.t = media  # paced: the chunk starts at its media time
        decision = scheduler.plan()
        scheduler.observe(decision, {})
        steps.append((decision.rung, decision.action, decision.steps, decision.degradation))
    assert steps == [
        (0, Action.GENERATE, FULL, None),
        (1, Action.GENERATE, HALF, Degradation.FEWER_STEPS),
        (2, Action.GENERATE, ONE, Degradation.FEWER_STEPS),
        (3, Action.REPEAT, (), Degradation.REPEAT),
        (4, Action.DROP, (), Degradation.DROP),
    ]
    assert [o[:2] for o in oracle.observed] == [
        (Action.GENERATE, 4), (Action.GENERATE, 2), (Action.GENERATE, 1), (Action.REPEAT, 0),
    ]  # a drop teaches nothing


def test_a_single_step_list_goes_straight_to_the_fill() -> None:
    oracle = Oracle()
    config = DeadlineConfig(latency_budget_s=0.5, step_lists=((1000, 500),), fill=Fill.INTERPOLATE)
    assert [rung.action for rung in config.ladder] == [Action.GENERATE, Action.INTERPOLATE, Action.DROP]
    scheduler = DeadlineScheduler(config, oracle, now=FakeTime(0.0))
    assert scheduler.plan().steps == (1000, 500)
    oracle.costs[(Action.GENERATE, 2)] = 5.0
    assert scheduler.plan().action is Action.INTERPOLATE
    oracle.costs[(Action.INTERPOLATE, 0)] = 5.0
    assert scheduler.plan().action is Action.DROP


def test_a_big_slowdown_skips_to_the_first_rung_that_fits() -> None:
    oracle = Oracle()
    scheduler = DeadlineScheduler(DeadlineConfig(latency_budget_s=0.5), oracle, now=FakeTime(0.0))
    scheduler.observe(scheduler.plan(), {})
    oracle.costs.update({(Action.GENERATE, 4): 2.0, (Action.GENERATE, 2): 2.0, (Action.GENERATE, 1): 2.0})
    decision = scheduler.plan()  # at time 0, chunk 1's first frame (9) is due at 0.5 + 9/16 s
    assert (decision.rung, decision.action) == (3, Action.REPEAT)
    assert decision.predicted_s == 0.0 and decision.slack_s == pytest.approx(0.5 + 9 / 16)


def test_the_first_chunk_is_always_generated() -> None:
    """Nothing to repeat yet: even when nothing fits, chunk 0 is generated with the cheapest list."""
    oracle = Oracle(default=10.0)
    scheduler = DeadlineScheduler(DeadlineConfig(latency_budget_s=0.5), oracle, now=FakeTime(0.0))
    first = scheduler.plan()
    assert (first.action, first.steps, first.rung) == (Action.GENERATE, ONE, 2)
    assert first.deadline_s == 0.5 and first.predicted_done_s == 10.0 and first.slack_s == -9.5
    second = scheduler.plan()  # pipelined: planned before the first is observed
    assert second.action is Action.DROP  # a repeat would not make it either


def test_cold_start_runs_full_steps_and_learns() -> None:
    """The price of an optimistic cold start: the first two chunks (warm-up, then the first learned one) run full
    steps whatever they cost; from the third on the model knows."""
    model = CostModel()
    scheduler, decisions, records = simulate(BUDGET, engine_costs(lambda k: 0.15, lambda k: 0.05), 6, cost_model=model)
    assert [d.rung for d in decisions[:2]] == [0, 0]
    assert decisions[0].predicted_s == 0.0 and decisions[1].predicted_s == 0.0
    assert decisions[2].rung == 1  # learned from chunk 1: 4 x 0.15 + 0.05 s does not fit 0.5 s; 2 steps do
    assert decisions[2].predicted_s == pytest.approx(2 * 0.15 + 0.05)
    assert {r.chunk for chunk in records for r in chunk if r.is_missed} == {0, 1}


# --- records and the miss rate


def test_frame_records_and_miss_rate_match_a_hand_count() -> None:
    """4 fps, one latent frame per chunk (1 video frame, then 4), budget 0.5 s: frame i is due at 0.5 + i/4 s.

    chunk 0 (frame 0, due 0.5)       generated, ready 0.4   -> 0 missed
    chunk 1 (frames 1-4, due 0.75-1.5) generated, ready 1.1 -> frames 1, 2 missed
    chunk 2 (frames 5-8)             dropped                 -> 4 missed
    chunk 3 (frames 9-12, due 2.75-) repeated, ready 2.75   -> 0 missed (on the deadline is on time)
    chunk 4 (frames 13-16, due 3.75-) 1 step, ready 4.0     -> frame 13 missed
    7 of 17 frames missed.
    """
    oracle = Oracle()
    now = FakeTime(0.0)
    config = DeadlineConfig(fps=4, latency_budget_s=0.5, chunk_frames=1, recovery_chunks=1)
    scheduler = DeadlineScheduler(config, oracle, now=now)
    outcomes = []

    def run(plan_at: float, done_at: float | None) -> Decision:
        now.t = plan_at
        decision = scheduler.plan()
        outcomes.append(scheduler.observe(decision, {}, completed_at=done_at))
        return decision

    assert run(0.0, 0.4).steps == FULL
    assert run(0.5, 1.1).steps == FULL
    oracle.default = 10.0
    assert run(1.1, None).action is Action.DROP
    oracle.default = 0.0
    assert run(2.7, 2.75).action is Action.REPEAT  # one rung per plan, even from a drop
    assert run(3.5, 4.0).steps == ONE

    assert [[r.is_missed for r in chunk] for chunk in outcomes] == [
        [False], [True, True, False, False], [True] * 4, [False] * 4, [True, False, False, False],
    ]
    assert scheduler.frames_total == 17 and scheduler.frames_missed == 7 and scheduler.miss_rate == 7 / 17
    flat = [r for chunk in outcomes for r in chunk]
    assert [r.frame for r in flat] == list(range(17))
    assert [r.pts for r in flat[:3]] == [0, 22_500, 45_000]  # 90 kHz / 4 fps
    assert [r.deadline_s for r in flat] == [0.5 + i / 4 for i in range(17)]
    assert [r.completed_s for r in flat[5:9]] == [None] * 4
    assert [r.steps for r in flat] == [4] * 5 + [0] * 8 + [1] * 4
    assert [r.action for r in flat[5:13]] == [Action.DROP] * 4 + [Action.REPEAT] * 4
    assert list(scheduler.records) == flat


def test_records_are_bounded_but_totals_are_not() -> None:
    small = DeadlineScheduler(BUDGET, history_frames=30, now=FakeTime())
    for _ in range(5):
        small.observe(small.plan(), {"denoise": 0.0})
    assert len(small.records) == 30 and small.frames_total == 9 + 4 * 12
    assert small.records[-1].frame == 9 + 4 * 12 - 1


def test_observing_twice_or_an_unknown_decision_raises() -> None:
    scheduler = DeadlineScheduler(BUDGET, Oracle(), now=FakeTime())
    decision = scheduler.plan()
    scheduler.observe(decision, {})
    with pytest.raises(RuntimeError, match="chunk 0 was not planned or was already observed"):
        scheduler.observe(decision, {})


# --- the cost model


def test_cost_model_cold_start_warmup_and_first_estimate() -> None:
    model = CostModel(alpha=0.25, margin_sigmas=2.0, warmup=1)
    assert model.predict(Action.GENERATE, 4) == 0.0 and model.estimate(Action.GENERATE, "denoise") is None
    model.observe(Action.GENERATE, 4, {"denoise": 30.0, "context": 5.0})  # compilation: not learned
    assert model.predict(Action.GENERATE, 4) == 0.0
    model.observe(Action.GENERATE, 4, {"denoise": 0.4, "context": 0.05})
    assert model.estimate(Action.GENERATE, "denoise").mean == pytest.approx(0.1)  # seconds per step
    assert model.predict(Action.GENERATE, 4) == pytest.approx(0.45)  # one sample: no spread yet
    assert model.predict(Action.GENERATE, 1) == pytest.approx(0.15)  # per step: every step count is predicted
    assert model.predict(Action.REPEAT, 0) == 0.0  # actions are learned apart


def test_cost_model_converges_to_the_injected_cost() -> None:
    rng = random.Random(1)
    model = CostModel(alpha=0.1, margin_sigmas=2.0, warmup=0)
    for _ in range(400):
        steps = rng.choice([1, 2, 4])
        model.observe(Action.GENERATE, steps, {"denoise": 0.03 * steps * rng.gauss(1, 0.05), "decode": 0.02})
    denoise = model.estimate(Action.GENERATE, "denoise")
    assert denoise.mean == pytest.approx(0.03, rel=0.03)
    assert denoise.std == pytest.approx(0.03 * 0.05, rel=0.5)  # the spread is learned too
    assert model.estimate(Action.GENERATE, "decode").std == pytest.approx(0.0, abs=1e-12)
    predicted = model.predict(Action.GENERATE, 2)
    assert 2 * 0.03 + 0.02 < predicted < 2 * 0.03 * (1 + 3 * 0.05) + 0.02  # mean plus a margin of about 2 sigma


def test_cost_model_follows_a_step_change_and_averages_rare_stages() -> None:
    model = CostModel(alpha=0.25, warmup=0)
    for _ in range(3):
        model.observe(Action.GENERATE, 2, {"denoise": 0.2})
    for _ in range(40):
        model.observe(Action.GENERATE, 1, {"denoise": 0.3})  # 3x slower per step, seen at another step count
    assert model.estimate(Action.GENERATE, "denoise").mean == pytest.approx(0.3, rel=1e-4)
    assert model.predict(Action.GENERATE, 4) == pytest.approx(4 * 0.3, rel=1e-2)  # what is left is the margin
    model.observe(Action.GENERATE, 1, {"denoise": 0.3, "recache": 1.0})  # a prompt switch, once
    for _ in range(40):
        model.observe(Action.GENERATE, 1, {"denoise": 0.3})
    assert model.estimate(Action.GENERATE, "recache").mean < 1e-4  # absent counts as 0: not charged to every chunk
    model.forget(Action.GENERATE)
    assert model.predict(Action.GENERATE, 1) == 0.0
    model.observe(Action.GENERATE, 1, {"denoise": 0.05})  # no second warm-up after forget
    assert model.predict(Action.GENERATE, 1) == pytest.approx(0.05)


def test_cost_model_decisions_are_deterministic() -> None:
    costs = engine_costs(lambda k: 0.05 * (1 + (k * 37 % 11) / 10), lambda k: 0.02)
    first = simulate(BUDGET, costs, 100)[1]
    second = simulate(BUDGET, costs, 100)[1]
    assert first == second


@pytest.mark.parametrize("seconds", [float("nan"), -0.1, float("inf")])
def test_cost_model_refuses_bad_stage_times(seconds: float) -> None:
    with pytest.raises(ValueError, match=r"stage_seconds\['denoise'\]=.* must be finite and >= 0"):
        CostModel().observe(Action.GENERATE, 1, {"denoise": seconds})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=0), r"alpha=0 must be in \(0, 1\]"),
        (dict(alpha=1.5), r"alpha=1.5 must be in \(0, 1\]"),
        (dict(margin_sigmas=-1), r"margin_sigmas=-1 must be a finite number >= 0"),
        (dict(warmup=-1), r"warmup=-1 must be an integer >= 0"),
        (dict(per_step_stages="denoise"), r"per_step_stages='denoise' must be a collection of stage names"),
    ],
)
def test_bad_cost_model_settings_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CostModel(**kwargs)


# --- config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fps=0), r"fps=0 must be an int or Fraction in \(0, 1000\]"),
        (dict(fps=15.5), r"fps=15.5 must be an int or Fraction"),
        (dict(latency_budget_s=-1.0), r"latency_budget_s=-1.0 must be a finite number of seconds >= 0"),
        (dict(step_lists=()), r"step_lists=\(\) must be a non-empty tuple"),
        (dict(step_lists=[FULL]), r"step_lists=\[\(1000, 750, 500, 250\)\] must be a non-empty tuple"),
        (dict(step_lists=(FULL, ())), r"step_lists\[1\]=\(\) must be a non-empty tuple"),
        (dict(step_lists=((1000, 0),)), r"step_lists\[0\]=\(1000, 0\) must hold integers in \[1, 1000\]"),
        (dict(step_lists=((500, 750),)), r"step_lists\[0\]=\(500, 750\) must strictly descend"),
        (dict(step_lists=(FULL, FULL)), r"step_lists\[1\]=.* must have fewer steps than step_lists\[0\]"),
        (dict(step_lists=(FULL, (750,))), r"step_lists\[1\]=\(750,\) must be a sub-list of .* its first step 1000"),
        (dict(step_lists=(FULL, (1000, 600))), r"step_lists\[1\]=\(1000, 600\) must be a sub-list"),
        (dict(fill="repeat"), r"fill='repeat' must be one of \['repeat', 'interpolate'\]"),
        (dict(chunk_frames=0), r"chunk_frames=0 must be an integer >= 1"),
        (dict(recovery_chunks=0), r"recovery_chunks=0 must be an integer >= 1"),
        (dict(probe_chunks=-1), r"probe_chunks=-1 must be an integer >= 0"),
        (dict(first_latent_frames=5), r"first_latent_frames=5 must be in \[1, frames_per_latent=4\]"),
        (dict(recovery_slack_s=float("nan")), r"recovery_slack_s=nan must be a finite number"),
    ],
)
def test_bad_config_values_raise_config_error_naming_them(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DeadlineConfig(**kwargs)


def test_config_accepts_exact_rates_and_is_frozen() -> None:
    config = DeadlineConfig(fps=Fraction(30000, 1001), step_lists=((1000, 750, 500), (1000, 500)))
    scheduler = DeadlineScheduler(config, now=FakeTime())
    assert scheduler.clock.pts(1) == 3003
    with pytest.raises(AttributeError):
        config.fps = 30  # type: ignore[misc]
    with pytest.raises(ConfigError, match="history_frames=0 must be an integer >= 1"):
        DeadlineScheduler(config, history_frames=0)
