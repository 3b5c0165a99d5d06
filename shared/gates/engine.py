"""The gate engine: conditions over a metrics snapshot → PASS, FAIL or WAIT.

Fleet waves and cloud canaries use this one engine. It is pure: it takes the
snapshot and the time and returns a decision with a reason per condition, so
a decision can be replayed from the decision log.

A condition is judged only on samples inside its evaluation window. Fewer
samples than its minimum, or none at all, give WAIT: missing data never lets
a rollout advance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from shared.errors import TidegateError


class GateDefinitionError(TidegateError, ValueError):
    """A gate or condition that cannot be evaluated as written."""


class Verdict(StrEnum):
    PASS = "PASS"
    FAIL = "FAIL"
    WAIT = "WAIT"


class Comparator(StrEnum):
    GE = ">="
    GT = ">"
    LE = "<="
    LT = "<"

    def holds(self, observed: float, threshold: float) -> bool:
        if self is Comparator.GE:
            return observed >= threshold
        if self is Comparator.GT:
            return observed > threshold
        if self is Comparator.LE:
            return observed <= threshold
        return observed < threshold


class Aggregation(StrEnum):
    MEAN = "mean"
    SUM = "sum"
    COUNT = "count"
    MIN = "min"
    MAX = "max"
    P50 = "p50"
    P90 = "p90"
    P95 = "p95"
    P99 = "p99"


@dataclass(frozen=True)
class Sample:
    """One observation. `weight` lets a producer hand over a pre-aggregated value
    (e.g. a success rate of 0.98 over 50 devices is ``Sample(t, 0.98, 50)``)."""

    at: datetime
    value: float
    weight: int = 1


MetricsSnapshot = Mapping[str, Sequence[Sample]]


@dataclass(frozen=True)
class Condition:
    metric: str
    comparator: Comparator
    threshold: float
    min_samples: int = 1
    window: timedelta | None = None
    aggregation: Aggregation = Aggregation.MEAN

    def __post_init__(self) -> None:
        if not self.metric:
            raise GateDefinitionError("condition needs a metric name")
        if not math.isfinite(self.threshold):
            raise GateDefinitionError(f"{self.metric}: threshold must be a finite number")
        if self.min_samples < 1:
            raise GateDefinitionError(f"{self.metric}: min_samples must be at least 1")
        if self.window is not None and self.window <= timedelta(0):
            raise GateDefinitionError(f"{self.metric}: window must be positive")

    def describe(self) -> str:
        text = f"{self.aggregation}({self.metric}) {self.comparator} {self.threshold:g}"
        text += f" over >= {self.min_samples} samples"
        if self.window is not None:
            text += f" in the last {self.window.total_seconds():g}s"
        return text


@dataclass(frozen=True)
class ConditionResult:
    condition: Condition
    verdict: Verdict
    observed: float | None
    samples: int
    reason: str


@dataclass(frozen=True)
class Gate:
    conditions: tuple[Condition, ...]
    name: str = "gate"

    def __post_init__(self) -> None:
        if not self.conditions:
            raise GateDefinitionError(f"gate {self.name!r} has no conditions")


@dataclass(frozen=True)
class GateResult:
    gate: str
    verdict: Verdict
    results: tuple[ConditionResult, ...] = field(default_factory=tuple)

    @property
    def reason(self) -> str:
        relevant = [r for r in self.results if r.verdict == self.verdict] or list(self.results)
        return "; ".join(r.reason for r in relevant)


def _weighted_quantile(points: list[tuple[float, int]], q: float) -> float:
    """Nearest-rank quantile over weighted values: the smallest value whose
    cumulative weight reaches ``ceil(q * total)``."""
    points.sort(key=lambda p: p[0])
    total = sum(w for _, w in points)
    rank = max(1, math.ceil(q * total))
    seen = 0
    for value, weight in points:
        seen += weight
        if seen >= rank:
            return value
    return points[-1][0]


_QUANTILES = {Aggregation.P50: 0.5, Aggregation.P90: 0.9, Aggregation.P95: 0.95, Aggregation.P99: 0.99}


def aggregate(points: list[tuple[float, int]], how: Aggregation) -> float:
    """Combine weighted values; `points` must be non-empty with positive weights."""
    total = sum(w for _, w in points)
    if how is Aggregation.MEAN:
        return sum(v * w for v, w in points) / total
    if how is Aggregation.SUM:
        return sum(v * w for v, w in points)
    if how is Aggregation.COUNT:
        return float(total)
    if how is Aggregation.MIN:
        return min(v for v, _ in points)
    if how is Aggregation.MAX:
        return max(v for v, _ in points)
    return _weighted_quantile(points, _QUANTILES[how])


def evaluate_condition(cond: Condition, snapshot: MetricsSnapshot, now: datetime) -> ConditionResult:
    series = snapshot.get(cond.metric)
    if not series:
        return ConditionResult(cond, Verdict.WAIT, None, 0, f"{cond.metric}: no data yet")
    start = now - cond.window if cond.window is not None else None
    points: list[tuple[float, int]] = []
    dropped = 0
    for s in series:
        if s.at > now or (start is not None and s.at < start):
            continue
        if s.weight <= 0 or not math.isfinite(s.value):
            dropped += 1
            continue
        points.append((s.value, s.weight))
    n = sum(w for _, w in points)
    note = f" ({dropped} invalid samples ignored)" if dropped else ""
    if n < cond.min_samples:
        return ConditionResult(
            cond,
            Verdict.WAIT,
            aggregate(points, cond.aggregation) if points else None,
            n,
            f"{cond.metric}: {n} of {cond.min_samples} samples needed{note}",
        )
    observed = aggregate(points, cond.aggregation)
    ok = cond.comparator.holds(observed, cond.threshold)
    verdict = Verdict.PASS if ok else Verdict.FAIL
    word = "holds" if ok else "breached"
    return ConditionResult(
        cond,
        verdict,
        observed,
        n,
        f"{cond.metric}: {cond.aggregation} {observed:.6g} {cond.comparator} {cond.threshold:g} "
        f"{word} over {n} samples{note}",
    )


def evaluate_gate(gate: Gate, snapshot: MetricsSnapshot, now: datetime) -> GateResult:
    """Any FAIL fails the gate; otherwise any WAIT holds it; only all-PASS passes."""
    results = tuple(evaluate_condition(c, snapshot, now) for c in gate.conditions)
    verdicts = {r.verdict for r in results}
    if Verdict.FAIL in verdicts:
        verdict = Verdict.FAIL
    elif Verdict.WAIT in verdicts:
        verdict = Verdict.WAIT
    else:
        verdict = Verdict.PASS
    return GateResult(gate.name, verdict, results)
