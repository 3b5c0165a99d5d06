"""Rollout plans: ordered steps with bake times, advanced by gate decisions.

A fleet campaign's waves and a cloud canary's traffic steps are both a
`RolloutPlan`; `decide` is the single pure function that moves either one
forward, holds it, completes it or aborts it.

Step sizes are cumulative: ``1, 5, 25, 50, 100`` percent means that by the
end of step 3 a quarter of the population (or of the traffic) is on the new
version. Counts work the same way.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from shared.gates.engine import Gate, GateDefinitionError, GateResult, MetricsSnapshot, Verdict, evaluate_gate


@dataclass(frozen=True)
class Step:
    percent: float | None = None
    count: int | None = None
    bake: timedelta = timedelta(0)
    gate: Gate | None = None
    manual: bool = False  # passed and baked, the step waits for a person's approval

    def __post_init__(self) -> None:
        if (self.percent is None) == (self.count is None):
            raise GateDefinitionError("a step has exactly one of percent or count")
        if self.percent is not None and not (0 < self.percent <= 100):
            raise GateDefinitionError(f"step percent {self.percent} must be in (0, 100]")
        if self.count is not None and self.count < 1:
            raise GateDefinitionError(f"step count {self.count} must be at least 1")
        if self.bake < timedelta(0):
            raise GateDefinitionError("bake time cannot be negative")

    @property
    def size(self) -> float:
        return self.percent if self.percent is not None else float(self.count or 0)


@dataclass(frozen=True)
class RolloutPlan:
    steps: tuple[Step, ...]
    gate: Gate | None = None
    failure_limit: int = 1
    # Bakes in a row whose comparisons could not decide before the rollout pauses for a person.
    inconclusive_limit: int = 3

    def __post_init__(self) -> None:
        if not self.steps:
            raise GateDefinitionError("a rollout plan needs at least one step")
        kinds = {s.percent is not None for s in self.steps}
        if len(kinds) > 1:
            raise GateDefinitionError("steps must all be percentages or all be counts")
        sizes = [s.size for s in self.steps]
        if any(b < a for a, b in itertools.pairwise(sizes)):
            raise GateDefinitionError(f"step sizes are cumulative and must not decrease: {sizes}")
        if self.failure_limit < 1:
            raise GateDefinitionError("failure_limit must be at least 1")
        if self.inconclusive_limit < 1:
            raise GateDefinitionError("inconclusive_limit must be at least 1")

    def gate_for(self, index: int) -> Gate | None:
        return self.steps[index].gate or self.gate

    def cumulative_counts(self, population: int) -> list[int]:
        """How many members of `population` each step has reached, cumulatively."""
        out = []
        for s in self.steps:
            if s.percent is not None:
                n = math.ceil(population * s.percent / 100 - 1e-9)
            else:
                n = s.count or 0
            out.append(min(population, max(n, 1 if population else 0)))
        return out


class RolloutStatus(StrEnum):
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"  # waiting for a person: a manual step, or comparisons that cannot decide
    COMPLETED = "COMPLETED"
    ABORTED = "ABORTED"


class Action(StrEnum):
    HOLD = "HOLD"
    ADVANCE = "ADVANCE"
    COMPLETE = "COMPLETE"
    ABORT = "ABORT"
    PAUSE = "PAUSE"


@dataclass(frozen=True)
class RolloutState:
    step: int
    step_started_at: datetime
    consecutive_failures: int = 0
    status: RolloutStatus = RolloutStatus.RUNNING
    inconclusive: int = 0  # bakes of this step whose comparisons could not decide
    paused_reason: str | None = None


@dataclass(frozen=True)
class Decision:
    action: Action
    state: RolloutState
    reason: str
    gate: GateResult | None = None


def start(now: datetime) -> RolloutState:
    return RolloutState(step=0, step_started_at=now)


def decide(
    plan: RolloutPlan,
    state: RolloutState,
    snapshot: MetricsSnapshot,
    now: datetime,
    baseline: MetricsSnapshot | None = None,
) -> Decision:
    """One evaluation tick: what should the rollout do now?

    - the step's absolute conditions FAIL: count it; at `failure_limit` consecutive failures,
      ABORT; they WAIT (too little data): HOLD;
    - the step has not baked long enough: HOLD;
    - baked: the gate's comparisons with `baseline` are looked at, once per bake. FAIL:
      ABORT. Inconclusive: bake again, and after `inconclusive_limit` such bakes PAUSE for a
      person;
    - all passed: PAUSE when the step is manual, else ADVANCE to the next step, or COMPLETE
      after the last.

    A paused rollout holds until `resume` (a person approves or rejects).
    """
    if state.status is not RolloutStatus.RUNNING:
        why = f": {state.paused_reason}" if state.paused_reason else ""
        return Decision(Action.HOLD, state, f"rollout is {state.status.value.lower()}{why}")
    if not 0 <= state.step < len(plan.steps):
        raise GateDefinitionError(f"state step {state.step} is outside the plan's {len(plan.steps)} steps")
    step = plan.steps[state.step]
    gate = plan.gate_for(state.step)
    result = evaluate_gate(gate, snapshot, now, compare=False) if gate is not None else None
    label = f"step {state.step + 1}/{len(plan.steps)}"

    if result is not None and result.verdict is Verdict.FAIL:
        return _failed(plan, state, label, result)
    if result is not None and result.verdict is Verdict.WAIT:
        return Decision(Action.HOLD, state, f"{label}: waiting: {result.reason}", result)

    state = replace(state, consecutive_failures=0)
    baked = now - state.step_started_at
    if baked < step.bake:
        left = (step.bake - baked).total_seconds()
        return Decision(Action.HOLD, state, f"{label}: baking, {left:.0f}s left", result)
    if gate is not None and gate.comparisons:
        result = evaluate_gate(gate, snapshot, now, baseline)
        if result.verdict is Verdict.FAIL:
            return _failed(plan, state, label, result)
        if result.verdict is Verdict.WAIT:
            looks = state.inconclusive + 1
            if looks >= plan.inconclusive_limit:
                why = f"{label}: {looks} bakes could not decide; waiting for a person: {result.reason}"
                new = replace(state, inconclusive=looks, status=RolloutStatus.PAUSED, paused_reason=why)
                return Decision(Action.PAUSE, new, why, result)
            new = replace(state, inconclusive=looks, step_started_at=now)
            return Decision(
                Action.HOLD,
                new,
                f"{label}: inconclusive ({looks}/{plan.inconclusive_limit}), baking again: {result.reason}",
                result,
            )
    if step.manual:
        why = f"{label}: passed; waiting for approval"
        new = replace(state, status=RolloutStatus.PAUSED, paused_reason=why)
        return Decision(Action.PAUSE, new, why, result)
    return _next(plan, state, now, label, "passed", result)


def _failed(plan: RolloutPlan, state: RolloutState, label: str, result: GateResult) -> Decision:
    failures = state.consecutive_failures + 1
    if failures >= plan.failure_limit:
        new = replace(state, consecutive_failures=failures, status=RolloutStatus.ABORTED)
        return Decision(Action.ABORT, new, f"{label}: gate failed: {result.reason}", result)
    new = replace(state, consecutive_failures=failures)
    return Decision(
        Action.HOLD, new, f"{label}: gate failed ({failures}/{plan.failure_limit}): {result.reason}", result
    )


def _next(
    plan: RolloutPlan, state: RolloutState, now: datetime, label: str, why: str, result: GateResult | None
) -> Decision:
    if state.step == len(plan.steps) - 1:
        new = replace(state, status=RolloutStatus.COMPLETED, paused_reason=None)
        return Decision(Action.COMPLETE, new, f"{label}: {why}; rollout complete", result)
    new = RolloutState(step=state.step + 1, step_started_at=now)
    return Decision(Action.ADVANCE, new, f"{label}: {why}; advancing to step {state.step + 2}", result)


def resume(plan: RolloutPlan, state: RolloutState, now: datetime, *, approve: bool, by: str) -> Decision:
    """A person's judgement on a paused rollout: approval moves it on past the step it waited
    at; rejection aborts it. Anything but a paused rollout is a `GateDefinitionError`."""
    if state.status is not RolloutStatus.PAUSED:
        raise GateDefinitionError(f"the rollout is {state.status.value.lower()}, not waiting for a person")
    label = f"step {state.step + 1}/{len(plan.steps)}"
    if not approve:
        new = replace(state, status=RolloutStatus.ABORTED, paused_reason=None)
        return Decision(Action.ABORT, new, f"{label}: rejected by {by}")
    return _next(plan, replace(state, status=RolloutStatus.RUNNING), now, label, f"approved by {by}", None)
