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
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.errors import TidegateError

if TYPE_CHECKING:
    from shared.gates.compare import Comparison, ComparisonResult


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
    """Absolute conditions on the candidate's snapshot and, optionally, comparisons of the
    candidate with a baseline (`shared.gates.compare`)."""

    conditions: tuple[Condition, ...]
    name: str = "gate"
    comparisons: tuple[Comparison, ...] = ()

    def __post_init__(self) -> None:
        if not self.conditions and not self.comparisons:
            raise GateDefinitionError(f"gate {self.name!r} has no conditions")


@dataclass(frozen=True)
class GateResult:
    gate: str
    verdict: Verdict
    results: tuple[ConditionResult | ComparisonResult, ...] = field(default_factory=tuple)

    @property
    def reason(self) -> str:
        relevant = [r for r in self.results if r.verdict == self.verdict] or list(self.results)
        return "; ".join(r.reason for r in relevant)


@dataclass(frozen=True)
class Columns:
    """Many samples as arrays: `at` in seconds since the epoch, `value`, and optional integer
    `weight` (1 each by default). What a producer with thousands of samples per tick (a
    canary's latencies) hands the engine instead of as many `Sample` objects."""

    at: np.ndarray[Any, Any]
    value: np.ndarray[Any, Any]
    weight: np.ndarray[Any, Any] | None = None

    def __len__(self) -> int:
        return int(self.value.size)


Series = Sequence[Sample] | Columns
MetricsSnapshot = Mapping[str, Series]


def window_arrays(
    series: Series | None, now: datetime, window: timedelta | None
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], int]:
    """The series' values and weights inside (now - window, now], and how many invalid
    samples (non-positive weight, non-finite value) were dropped."""
    if series is None or len(series) == 0:
        return np.empty(0), np.empty(0, dtype=np.int64), 0
    if isinstance(series, Columns):
        at, value = series.at, series.value.astype(np.float64, copy=False)
        weight = series.weight if series.weight is not None else np.ones(value.size, dtype=np.int64)
        t = now.timestamp()
        keep = at <= t
        if window is not None:
            keep &= at >= t - window.total_seconds()
        value, weight = value[keep], weight[keep]
    else:
        start = now - window if window is not None else None
        inside = [s for s in series if s.at <= now and (start is None or s.at >= start)]
        value = np.fromiter((s.value for s in inside), dtype=np.float64, count=len(inside))
        weight = np.fromiter((s.weight for s in inside), dtype=np.int64, count=len(inside))
    valid = (weight > 0) & np.isfinite(value)
    dropped = int(valid.size - np.count_nonzero(valid))
    if dropped:
        value, weight = value[valid], weight[valid]
    return value, weight, dropped


_QUANTILES = {Aggregation.P50: 0.5, Aggregation.P90: 0.9, Aggregation.P95: 0.95, Aggregation.P99: 0.99}


def aggregate_arrays(values: np.ndarray[Any, Any], weights: np.ndarray[Any, Any], how: Aggregation) -> float:
    """Combine weighted values (non-empty, positive weights). Quantiles are nearest-rank: the
    smallest value whose cumulative weight reaches ``ceil(q * total)``."""
    total = int(weights.sum())
    if how is Aggregation.MEAN:
        return float(np.dot(values, weights) / total)
    if how is Aggregation.SUM:
        return float(np.dot(values, weights))
    if how is Aggregation.COUNT:
        return float(total)
    if how is Aggregation.MIN:
        return float(values.min())
    if how is Aggregation.MAX:
        return float(values.max())
    rank = max(1, math.ceil(_QUANTILES[how] * total))
    if int(weights.max()) == 1:  # one sample each: a selection, not a sort
        return float(np.partition(values, rank - 1)[rank - 1])
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    idx = min(int(np.searchsorted(cumulative, rank)), order.size - 1)
    return float(values[order[idx]])


def aggregate(points: list[tuple[float, int]], how: Aggregation) -> float:
    """Combine weighted (value, weight) points; `points` must be non-empty with positive weights."""
    values = np.fromiter((v for v, _ in points), dtype=np.float64, count=len(points))
    weights = np.fromiter((w for _, w in points), dtype=np.int64, count=len(points))
    return aggregate_arrays(values, weights, how)


def evaluate_condition(cond: Condition, snapshot: MetricsSnapshot, now: datetime) -> ConditionResult:
    series = snapshot.get(cond.metric)
    if series is None or len(series) == 0:
        return ConditionResult(cond, Verdict.WAIT, None, 0, f"{cond.metric}: no data yet")
    values, weights, dropped = window_arrays(series, now, cond.window)
    n = int(weights.sum())
    note = f" ({dropped} invalid samples ignored)" if dropped else ""
    if n < cond.min_samples:
        return ConditionResult(
            cond,
            Verdict.WAIT,
            aggregate_arrays(values, weights, cond.aggregation) if values.size else None,
            n,
            f"{cond.metric}: {n} of {cond.min_samples} samples needed{note}",
        )
    observed = aggregate_arrays(values, weights, cond.aggregation)
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


def evaluate_gate(
    gate: Gate,
    snapshot: MetricsSnapshot,
    now: datetime,
    baseline: MetricsSnapshot | None = None,
    *,
    compare: bool = True,
) -> GateResult:
    """Any FAIL fails the gate; otherwise any WAIT holds it; only all-PASS passes.

    Comparisons are judged against `baseline` when `compare` is set (a rollout plan looks
    at them once per bake); without a baseline they WAIT, never pass."""
    from shared.gates.compare import ComparisonResult, evaluate_comparison

    results: tuple[ConditionResult | ComparisonResult, ...] = tuple(
        evaluate_condition(c, snapshot, now) for c in gate.conditions
    )
    if compare:
        for cmp in gate.comparisons:
            if baseline is None:
                results += (
                    ComparisonResult(
                        cmp, Verdict.WAIT, None, None, None, None, (0, 0), f"{cmp.metric}: no baseline"
                    ),
                )
            else:
                results += (evaluate_comparison(cmp, snapshot, baseline, now),)
    verdicts = {r.verdict for r in results}
    if Verdict.FAIL in verdicts:
        verdict = Verdict.FAIL
    elif Verdict.WAIT in verdicts:
        verdict = Verdict.WAIT
    else:
        verdict = Verdict.PASS
    return GateResult(gate.name, verdict, results)
