"""The gate engine and rollout plans: worked examples and properties (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.gates import (
    Action,
    Aggregation,
    Comparator,
    Comparison,
    Condition,
    Gate,
    GateDefinitionError,
    Method,
    RolloutPlan,
    RolloutState,
    RolloutStatus,
    Sample,
    Step,
    Verdict,
    Worse,
    decide,
    evaluate_comparison,
    evaluate_condition,
    evaluate_gate,
    resume,
    start,
)

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


SUCCESS = Condition("success_rate", Comparator.GE, 0.98, min_samples=50)
ERRORS = Condition("failure_rate", Comparator.LE, 0.05, min_samples=20)
WAVE_GATE = Gate((SUCCESS, ERRORS), name="wave")


# ---- worked examples ------------------------------------------------------------------------


def test_wave_gate_waits_then_passes_then_fails() -> None:
    snap = {"success_rate": [Sample(T0, 1.0, 30)], "failure_rate": [Sample(T0, 0.0, 30)]}
    r = evaluate_gate(WAVE_GATE, snap, T0)
    assert r.verdict is Verdict.WAIT
    assert "30 of 50 samples" in r.reason

    snap = {"success_rate": [Sample(T0, 0.99, 60)], "failure_rate": [Sample(T0, 0.01, 60)]}
    assert evaluate_gate(WAVE_GATE, snap, T0).verdict is Verdict.PASS

    snap = {"success_rate": [Sample(T0, 1.0, 10)], "failure_rate": [Sample(T0, 0.10, 25)]}
    r = evaluate_gate(WAVE_GATE, snap, T0)
    assert r.verdict is Verdict.FAIL  # FAIL wins over the other condition's WAIT
    assert "failure_rate" in r.reason and "breached" in r.reason


def test_missing_metric_waits_with_reason() -> None:
    r = evaluate_gate(WAVE_GATE, {"success_rate": [Sample(T0, 1.0, 100)]}, T0)
    assert r.verdict is Verdict.WAIT
    assert r.results[1].reason == "failure_rate: no data yet"


def test_window_excludes_old_and_future_samples() -> None:
    cond = Condition(
        "p95_ms", Comparator.LE, 100, min_samples=3, window=timedelta(minutes=5), aggregation=Aggregation.P95
    )
    series = [
        Sample(at(-600), 500.0),
        Sample(at(-10), 50.0),
        Sample(at(-5), 60.0),
        Sample(at(-1), 70.0),
        Sample(at(+60), 900.0),
    ]
    r = evaluate_condition(cond, {"p95_ms": series}, T0)
    assert r.verdict is Verdict.PASS
    assert r.samples == 3
    assert r.observed == 70.0


def test_percentiles_and_weights() -> None:
    points = [Sample(T0, float(v)) for v in range(1, 101)]
    for agg, expected in [
        (Aggregation.P50, 50.0),
        (Aggregation.P95, 95.0),
        (Aggregation.P99, 99.0),
        (Aggregation.MAX, 100.0),
        (Aggregation.MIN, 1.0),
        (Aggregation.COUNT, 100.0),
        (Aggregation.SUM, 5050.0),
        (Aggregation.MEAN, 50.5),
    ]:
        r = evaluate_condition(Condition("x", Comparator.GE, 0, aggregation=agg), {"x": points}, T0)
        assert r.observed == expected, agg
    weighted = [Sample(T0, 1.0, 3), Sample(T0, 0.0, 1)]
    r = evaluate_condition(Condition("x", Comparator.GE, 0.7), {"x": weighted}, T0)
    assert r.observed == 0.75 and r.samples == 4 and r.verdict is Verdict.PASS


def test_non_finite_samples_are_not_data() -> None:
    r = evaluate_condition(
        Condition("x", Comparator.LE, 1.0, min_samples=1),
        {"x": [Sample(T0, float("nan")), Sample(T0, float("inf"))]},
        T0,
    )
    assert r.verdict is Verdict.WAIT
    assert "2 invalid samples ignored" in r.reason


def test_definitions_are_validated() -> None:
    with pytest.raises(GateDefinitionError):
        Gate(())
    with pytest.raises(GateDefinitionError):
        Condition("x", Comparator.GE, float("nan"))
    with pytest.raises(GateDefinitionError):
        Condition("x", Comparator.GE, 1, min_samples=0)
    with pytest.raises(GateDefinitionError):
        Step()
    with pytest.raises(GateDefinitionError):
        RolloutPlan((Step(percent=50), Step(percent=10)))
    with pytest.raises(GateDefinitionError):
        RolloutPlan((Step(percent=50), Step(count=10)))
    with pytest.raises(GateDefinitionError):
        Step(percent=150)


def test_cumulative_counts() -> None:
    plan = RolloutPlan(tuple(Step(percent=p) for p in (1, 5, 25, 50, 100)))
    assert plan.cumulative_counts(10_000) == [100, 500, 2500, 5000, 10000]
    assert plan.cumulative_counts(10) == [1, 1, 3, 5, 10]
    assert plan.cumulative_counts(0) == [0, 0, 0, 0, 0]
    assert RolloutPlan((Step(count=50), Step(count=500))).cumulative_counts(200) == [50, 200]


def test_plan_bakes_advances_completes() -> None:
    plan = RolloutPlan((Step(percent=10, bake=timedelta(minutes=10)), Step(percent=100)), gate=WAVE_GATE)
    good = {"success_rate": [Sample(T0, 1.0, 100)], "failure_rate": [Sample(T0, 0.0, 100)]}
    s = start(T0)
    d = decide(plan, s, good, at(60))
    assert d.action is Action.HOLD and "baking, 540s left" in d.reason
    d = decide(plan, s, good, at(600))
    assert d.action is Action.ADVANCE and d.state.step == 1 and d.state.step_started_at == at(600)
    d = decide(plan, d.state, good, at(601))
    assert d.action is Action.COMPLETE and d.state.status is RolloutStatus.COMPLETED
    assert decide(plan, d.state, good, at(700)).action is Action.HOLD


def test_plan_aborts_after_failure_limit_and_pass_resets_count() -> None:
    plan = RolloutPlan((Step(percent=10), Step(percent=100)), gate=WAVE_GATE, failure_limit=2)
    bad = {"success_rate": [Sample(T0, 0.5, 100)], "failure_rate": [Sample(T0, 0.5, 100)]}
    good = {"success_rate": [Sample(T0, 1.0, 100)], "failure_rate": [Sample(T0, 0.0, 100)]}
    s = start(T0)
    d1 = decide(plan, s, bad, T0)
    assert d1.action is Action.HOLD and d1.state.consecutive_failures == 1
    d2 = decide(plan, d1.state, bad, T0)
    assert d2.action is Action.ABORT and d2.state.status is RolloutStatus.ABORTED
    assert "failure_rate" in d2.reason
    reset = decide(plan, d1.state, good, T0)
    assert reset.state.consecutive_failures == 0


# ---- properties --------------------------------------------------------------------------------

comparators = st.sampled_from(list(Comparator))
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
aggregations = st.sampled_from(list(Aggregation))


@st.composite
def series(draw: st.DrawFn) -> list[Sample]:
    n = draw(st.integers(0, 30))
    return [Sample(at(-draw(st.integers(0, 3600))), draw(finite), draw(st.integers(1, 20))) for _ in range(n)]


@given(comparators, finite, finite, st.integers(1, 50), aggregations, series())
@settings(max_examples=300)
def test_gate_is_monotone_in_the_observed_value(
    comp: Comparator, threshold: float, shift: float, min_samples: int, agg: Aggregation, data: list[Sample]
) -> None:
    """Making every sample better (in the comparator's direction) never turns PASS into FAIL."""
    cond = Condition("m", comp, threshold, min_samples=min_samples, aggregation=agg)
    before = evaluate_condition(cond, {"m": data}, T0)
    delta = abs(shift)
    better = delta if comp in (Comparator.GE, Comparator.GT) else -delta
    improved = [Sample(s.at, s.value + better, s.weight) for s in data]
    after = evaluate_condition(cond, {"m": improved}, T0)
    if before.verdict is Verdict.PASS:
        assert after.verdict is Verdict.PASS
    assert before.samples == after.samples


@given(comparators, finite, st.integers(1, 500), aggregations, series())
def test_too_few_samples_never_pass(
    comp: Comparator, threshold: float, min_samples: int, agg: Aggregation, data: list[Sample]
) -> None:
    cond = Condition("m", comp, threshold, min_samples=min_samples, aggregation=agg)
    r = evaluate_condition(cond, {"m": data}, T0)
    if sum(s.weight for s in data) < min_samples:
        assert r.verdict is Verdict.WAIT
    else:
        assert r.verdict in (Verdict.PASS, Verdict.FAIL)


@given(
    st.lists(st.sampled_from([1.0, 5.0, 25.0, 50.0, 100.0]), min_size=1, max_size=5).map(sorted),
    st.integers(0, 7200),
    st.sets(st.sampled_from(["success_rate", "failure_rate"])),
    st.integers(0, 4),
)
def test_plan_never_advances_on_missing_data(
    percents: list[float], elapsed: int, present: set[str], step: int
) -> None:
    plan = RolloutPlan(tuple(Step(percent=p, bake=timedelta(minutes=5)) for p in percents), gate=WAVE_GATE)
    state = RolloutState(step=min(step, len(percents) - 1), step_started_at=T0)
    snap = {m: [Sample(at(elapsed), 1.0 if m == "success_rate" else 0.0, 1000)] for m in present}
    d = decide(plan, state, snap, at(elapsed))
    if present != {"success_rate", "failure_rate"} or elapsed < 300:
        assert d.action is Action.HOLD
        assert d.state.step == state.step
    else:
        assert d.action in (Action.ADVANCE, Action.COMPLETE)


@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.integers(0, 200)), max_size=40))
def test_plan_step_only_moves_forward_and_stays_in_range(ticks: list[tuple[float, float, int]]) -> None:
    plan = RolloutPlan(tuple(Step(percent=p) for p in (1, 10, 100)), gate=WAVE_GATE, failure_limit=3)
    state = start(T0)
    for i, (ok, bad, n) in enumerate(ticks):
        now = at(i * 60)
        snap = {"success_rate": [Sample(now, ok, n)], "failure_rate": [Sample(now, bad, n)]} if n else {}
        d = decide(plan, state, snap, now)
        assert d.state.step >= state.step
        assert 0 <= d.state.step < len(plan.steps)
        if d.action is Action.ADVANCE:
            assert d.gate is not None and d.gate.verdict is Verdict.PASS
        if state.status is not RolloutStatus.RUNNING:
            assert d.state == state
        state = d.state


# ---- comparisons with a baseline (relative gates) ---------------------------------------------


def _series(values: list[float], at: datetime = T0) -> list[Sample]:
    return [Sample(at, v) for v in values]


def test_a_proportion_comparison_passes_within_tolerance_fails_when_significantly_worse() -> None:
    cmp = Comparison("errors", Method.PROPORTION, Worse.HIGHER, tolerance=0.005, min_samples=100, alpha=0.01)
    base = {"errors": _series([1.0] * 10 + [0.0] * 990)}  # 1 %
    same = {"errors": _series([1.0] * 11 + [0.0] * 989)}
    worse = {"errors": _series([1.0] * 40 + [0.0] * 960)}  # 4 %: significant at 1000 a side
    thin = {"errors": _series([1.0] * 2 + [0.0] * 48)}
    assert evaluate_comparison(cmp, same, base, T0).verdict is Verdict.PASS
    r = evaluate_comparison(cmp, worse, base, T0)
    assert r.verdict is Verdict.FAIL and r.p_value is not None and r.p_value < 0.01
    assert "errors vs baseline" in r.reason and "0.0400 vs 0.0100" in r.reason
    r = evaluate_comparison(cmp, thin, base, T0)
    assert r.verdict is Verdict.WAIT and "50 candidate and 1000 baseline samples" in r.reason
    # worse beyond the tolerance but not yet significant: inconclusive, never a pass
    few = {"errors": _series([1.0] * 5 + [0.0] * 95)}
    few_base = {"errors": _series([1.0] * 2 + [0.0] * 98)}
    r = evaluate_comparison(cmp, few, few_base, T0)
    assert r.verdict is Verdict.WAIT and "inconclusive" in r.reason
    # lower is worse (accuracy): a drop is judged on the failures
    acc = Comparison("correct", Method.PROPORTION, Worse.LOWER, tolerance=0.02, min_samples=100, alpha=0.01)
    good = {"correct": _series([1.0] * 950 + [0.0] * 50)}
    bad = {"correct": _series([1.0] * 850 + [0.0] * 150)}
    assert evaluate_comparison(acc, bad, good, T0).verdict is Verdict.FAIL
    assert evaluate_comparison(acc, good, bad, T0).verdict is Verdict.PASS  # better is fine


def test_mann_whitney_fails_a_30_percent_slower_candidate_and_passes_an_equal_one() -> None:
    import numpy as np

    rng = np.random.default_rng(4)
    cmp = Comparison(
        "latency_ms", Method.MANN_WHITNEY, Worse.HIGHER, tolerance=0.1, min_samples=200, alpha=0.001
    )
    base = {"latency_ms": _series(list(rng.lognormal(0, 0.3, 2000)))}
    same = {"latency_ms": _series(list(rng.lognormal(0, 0.3, 2000)))}
    slow = {"latency_ms": _series(list(1.3 * rng.lognormal(0, 0.3, 2000)))}
    r = evaluate_comparison(cmp, slow, base, T0)
    assert r.verdict is Verdict.FAIL and r.degradation is not None and 0.2 < r.degradation < 0.4
    assert "p95" in r.reason
    assert evaluate_comparison(cmp, same, base, T0).verdict is Verdict.PASS
    # outside the window the samples do not count
    old = {"latency_ms": _series(list(rng.lognormal(0, 0.3, 2000)), at=T0 - timedelta(hours=1))}
    windowed = Comparison("latency_ms", Method.MANN_WHITNEY, window=timedelta(minutes=5), min_samples=200)
    assert evaluate_comparison(windowed, old, base, T0).verdict is Verdict.WAIT


def test_a_comparison_without_a_baseline_waits() -> None:
    gate = Gate((), name="relative", comparisons=(Comparison("errors", Method.PROPORTION),))
    r = evaluate_gate(gate, {"errors": _series([0.0] * 100)}, T0)
    assert r.verdict is Verdict.WAIT and "no baseline" in r.reason
    with pytest.raises(GateDefinitionError):
        Gate((), name="empty")
    with pytest.raises(GateDefinitionError, match="alpha"):
        Comparison("errors", Method.PROPORTION, alpha=0.7)


def _relative_plan(**kw: object) -> RolloutPlan:
    gate = Gate(
        (),
        name="canary",
        comparisons=(
            Comparison(
                "errors", Method.PROPORTION, Worse.HIGHER, tolerance=0.005, min_samples=100, alpha=0.01
            ),
        ),
    )
    steps = kw.pop("steps", (Step(percent=10, bake=timedelta(seconds=60)), Step(percent=100)))
    return RolloutPlan(steps, gate=gate, **kw)  # type: ignore[arg-type]


def test_relative_gates_are_looked_at_once_per_bake_and_inconclusive_bakes_pause_for_a_person() -> None:
    plan = _relative_plan(inconclusive_limit=2)
    state = start(T0)
    few = {"errors": _series([1.0] * 6 + [0.0] * 94)}  # 6 % vs 2 %: worse, not yet significant
    base = {"errors": _series([1.0] * 2 + [0.0] * 98)}
    d = decide(plan, state, few, at(30), base)
    assert d.action is Action.HOLD and "baking" in d.reason  # comparisons wait for the bake
    d = decide(plan, d.state, few, at(61), base)
    assert d.action is Action.HOLD and "inconclusive (1/2)" in d.reason and d.state.step_started_at == at(61)
    d = decide(plan, d.state, few, at(90), base)
    assert d.action is Action.HOLD and "baking" in d.reason  # the bake starts again
    d = decide(plan, d.state, few, at(122), base)
    assert d.action is Action.PAUSE and d.state.status is RolloutStatus.PAUSED
    assert "waiting for a person" in d.reason
    assert decide(plan, d.state, few, at(500), base).action is Action.HOLD  # paused holds
    approved = resume(plan, d.state, at(600), approve=True, by="ops")
    assert (
        approved.action is Action.ADVANCE
        and approved.state.step == 1
        and "approved by ops" in approved.reason
    )
    rejected = resume(plan, d.state, at(600), approve=False, by="ops")
    assert rejected.action is Action.ABORT and rejected.state.status is RolloutStatus.ABORTED
    with pytest.raises(GateDefinitionError, match="not waiting"):
        resume(plan, approved.state, at(601), approve=True, by="ops")


def test_a_significantly_worse_candidate_aborts_and_a_manual_step_waits_for_approval() -> None:
    base = {"errors": _series([0.0] * 1000)}
    bad = {"errors": _series([1.0] * 50 + [0.0] * 950)}
    d = decide(_relative_plan(), start(T0), bad, at(61), base)
    assert d.action is Action.ABORT and "errors vs baseline" in d.reason
    manual = _relative_plan(
        steps=(Step(percent=10, bake=timedelta(seconds=60), manual=True), Step(percent=100))
    )
    d = decide(manual, start(T0), base, at(61), base)
    assert d.action is Action.PAUSE and "waiting for approval" in d.reason
    d = resume(manual, d.state, at(70), approve=True, by="alice")
    assert d.action is Action.ADVANCE and d.state.status is RolloutStatus.RUNNING
