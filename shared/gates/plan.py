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
    COMPLETED = "COMPLETED"
    ABORTED = "ABORTED"


class Action(StrEnum):
    HOLD = "HOLD"
    ADVANCE = "ADVANCE"
    COMPLETE = "COMPLETE"
    ABORT = "ABORT"


@dataclass(frozen=True)
class RolloutState:
    step: int
    step_started_at: datetime
    consecutive_failures: int = 0
    status: RolloutStatus = RolloutStatus.RUNNING


@dataclass(frozen=True)
class Decision:
    action: Action
    state: RolloutState
    reason: str
    gate: GateResult | None = None


def start(now: datetime) -> RolloutState:
    return RolloutState(step=0, step_started_at=now)


def decide(plan: RolloutPlan, state: RolloutState, snapshot: MetricsSnapshot, now: datetime) -> Decision:
    """One evaluation tick: what should the rollout do now?

    - the step's gate FAILs: count it; at `failure_limit` consecutive failures, ABORT;
    - the gate WAITs (too little data): HOLD;
    - the gate PASSes but the step has not baked long enough: HOLD;
    - otherwise ADVANCE to the next step, or COMPLETE after the last.
    """
    if state.status is not RolloutStatus.RUNNING:
        return Decision(Action.HOLD, state, f"rollout is {state.status.value.lower()}")
    if not 0 <= state.step < len(plan.steps):
        raise GateDefinitionError(f"state step {state.step} is outside the plan's {len(plan.steps)} steps")
    step = plan.steps[state.step]
    gate = plan.gate_for(state.step)
    result = evaluate_gate(gate, snapshot, now) if gate is not None else None
    label = f"step {state.step + 1}/{len(plan.steps)}"

    if result is not None and result.verdict is Verdict.FAIL:
        failures = state.consecutive_failures + 1
        if failures >= plan.failure_limit:
            new = replace(state, consecutive_failures=failures, status=RolloutStatus.ABORTED)
            return Decision(Action.ABORT, new, f"{label}: gate failed: {result.reason}", result)
        new = replace(state, consecutive_failures=failures)
        return Decision(
            Action.HOLD,
            new,
            f"{label}: gate failed ({failures}/{plan.failure_limit}): {result.reason}",
            result,
        )
    if result is not None and result.verdict is Verdict.WAIT:
        return Decision(Action.HOLD, state, f"{label}: waiting: {result.reason}", result)

    state = replace(state, consecutive_failures=0)
    baked = now - state.step_started_at
    if baked < step.bake:
        left = (step.bake - baked).total_seconds()
        return Decision(Action.HOLD, state, f"{label}: baking, {left:.0f}s left", result)
    if state.step == len(plan.steps) - 1:
        new = replace(state, status=RolloutStatus.COMPLETED)
        return Decision(Action.COMPLETE, new, f"{label}: passed; rollout complete", result)
    new = RolloutState(step=state.step + 1, step_started_at=now)
    return Decision(Action.ADVANCE, new, f"{label}: passed; advancing to step {state.step + 2}", result)
