"""Relative gate conditions: a candidate measured against its baseline over the same window.

An absolute SLO tells whether a release is fast enough; it cannot tell that a release is 30 %
slower than the one it replaces, or that it lost accuracy the SLO never mentions. A
`Comparison` judges the candidate's samples against the baseline's (production's requests, or
the cohort's devices not yet updated), as Kayenta judges a canary:

- ``proportion``: a rate of 0/1 outcomes (errors, correct answers), two-proportion z-test;
- ``mann_whitney``: a distribution (latency), Mann-Whitney U on the raw samples, the effect
  read at a quantile (p95 by default) as a ratio;
- ``difference``: a value per side (ECE), judged on the difference alone.

Each comparison has three answers, never a pass on missing data:

- PASS: the candidate is no worse than the tolerance allows (the observed degradation is
  within it);
- FAIL: it is worse beyond the tolerance *and* the test says the candidate is worse than
  the baseline at level `alpha` (one-sided), so noise alone rarely aborts a good release;
- WAIT: too few samples on either side, or worse beyond the tolerance without significance
  yet (inconclusive: the rollout bakes again, and a person decides after a few of those).

`alpha` is per comparison; `shared.gates.plan` looks at comparisons once per bake, so a
caller who wants a family-wise false-abort rate divides it over comparisons and looks
(`family_alpha`). Pure functions over samples; the clock is an argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import numpy as np

from shared.gates.engine import (
    Aggregation,
    GateDefinitionError,
    MetricsSnapshot,
    Verdict,
    aggregate_arrays,
    window_arrays,
)


class Method(StrEnum):
    PROPORTION = "proportion"
    MANN_WHITNEY = "mann_whitney"
    DIFFERENCE = "difference"


class Worse(StrEnum):
    """Which direction of the metric is worse for the candidate."""

    HIGHER = "higher"
    LOWER = "lower"


@dataclass(frozen=True)
class Comparison:
    """``metric`` of the candidate against the baseline's.

    ``tolerance`` is the degradation allowed: an absolute difference of rates for
    ``proportion`` (0.005 = half a point), a relative change of the quantile for
    ``mann_whitney`` (0.1 = 10 % slower at p95), an absolute difference for ``difference``."""

    metric: str
    method: Method
    worse: Worse = Worse.HIGHER
    tolerance: float = 0.0
    min_samples: int = 50
    window: timedelta | None = None
    alpha: float = 0.01
    quantile: Aggregation = Aggregation.P95  # where mann_whitney reads its effect

    def __post_init__(self) -> None:
        if not self.metric:
            raise GateDefinitionError("a comparison needs a metric name")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise GateDefinitionError(f"{self.metric}: tolerance must be a finite number >= 0")
        if self.min_samples < 1:
            raise GateDefinitionError(f"{self.metric}: min_samples must be at least 1")
        if not 0 < self.alpha < 0.5:
            raise GateDefinitionError(f"{self.metric}: alpha must be in (0, 0.5)")
        if self.window is not None and self.window <= timedelta(0):
            raise GateDefinitionError(f"{self.metric}: window must be positive")

    def describe(self) -> str:
        unit = " (relative)" if self.method is Method.MANN_WHITNEY else ""
        return (
            f"{self.metric} vs baseline ({self.method}): {self.worse} is worse, tolerance "
            f"{self.tolerance:g}{unit}, alpha {self.alpha:.2g}, >= {self.min_samples} samples a side"
        )


@dataclass(frozen=True)
class ComparisonResult:
    comparison: Comparison
    verdict: Verdict
    candidate: float | None  # the statistic on each side (rate, quantile or value)
    baseline: float | None
    degradation: float | None  # in the worse direction; > tolerance is a regression
    p_value: float | None
    samples: tuple[int, int]
    reason: str


def family_alpha(alpha: float, comparisons: int, looks: int) -> float:
    """Bonferroni: the per-look, per-comparison level that keeps the family-wise rate of
    false aborts at `alpha` over `comparisons` × `looks` tests."""
    return alpha / max(1, comparisons * looks)


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def two_proportion_p(x_c: float, n_c: float, x_b: float, n_b: float) -> float:
    """One-sided p-value of H0 "the candidate's rate is not above the baseline's" (pooled z)."""
    pooled = (x_c + x_b) / (n_c + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_c + 1 / n_b))
    if se == 0:
        return 1.0 if x_c / n_c <= x_b / n_b else 0.0
    return _normal_sf((x_c / n_c - x_b / n_b) / se)


def mann_whitney_p(candidate: np.ndarray, baseline: np.ndarray) -> float:
    """One-sided p-value of H0 "candidate values are not stochastically greater" (normal
    approximation with tie correction; exact enough for the sample sizes a gate waits for)."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(candidate, baseline, alternative="greater", method="asymptotic").pvalue)


def evaluate_comparison(
    cmp: Comparison, candidate: MetricsSnapshot, baseline: MetricsSnapshot, now: datetime
) -> ComparisonResult:
    vc, wc, _ = window_arrays(candidate.get(cmp.metric), now, cmp.window)
    vb, wb, _ = window_arrays(baseline.get(cmp.metric), now, cmp.window)
    n_c, n_b = int(wc.sum()), int(wb.sum())
    label = f"{cmp.metric} vs baseline"
    if n_c < cmp.min_samples or n_b < cmp.min_samples:
        return ComparisonResult(
            cmp,
            Verdict.WAIT,
            None,
            None,
            None,
            None,
            (n_c, n_b),
            f"{label}: {n_c} candidate and {n_b} baseline samples of {cmp.min_samples} a side needed",
        )
    sign = 1.0 if cmp.worse is Worse.HIGHER else -1.0
    p: float | None
    if cmp.method is Method.PROPORTION:
        x_c, x_b = float(np.dot(vc, wc)), float(np.dot(vb, wb))
        stat_c, stat_b = x_c / n_c, x_b / n_b
        degradation = sign * (stat_c - stat_b)
        if cmp.worse is Worse.HIGHER:
            p = two_proportion_p(x_c, n_c, x_b, n_b)
        else:  # lower is worse: test the complement (failures) the same way
            p = two_proportion_p(n_c - x_c, n_c, n_b - x_b, n_b)
        shown = f"{stat_c:.4f} vs {stat_b:.4f}"
    elif cmp.method is Method.MANN_WHITNEY:
        if np.any(wc != 1) or np.any(wb != 1):
            vc, vb = np.repeat(vc, wc), np.repeat(vb, wb)
        stat_c, stat_b = (
            aggregate_arrays(vc, np.ones(vc.size, np.int64), cmp.quantile),
            aggregate_arrays(vb, np.ones(vb.size, np.int64), cmp.quantile),
        )
        ratio = stat_c / stat_b if stat_b > 0 else (1.0 if stat_c == 0 else math.inf)
        degradation = sign * (ratio - 1)
        p = mann_whitney_p(vc * sign, vb * sign) if degradation > cmp.tolerance else None
        shown = f"{cmp.quantile} {stat_c:.4g} vs {stat_b:.4g} ({ratio:.3f}x)"
    else:
        stat_c, stat_b = (
            aggregate_arrays(vc, wc, Aggregation.MEAN),
            aggregate_arrays(vb, wb, Aggregation.MEAN),
        )
        degradation = sign * (stat_c - stat_b)
        p = None
        shown = f"{stat_c:.4g} vs {stat_b:.4g}"
    over = f"over {n_c}/{n_b} samples"
    if degradation <= cmp.tolerance:
        verdict, word = Verdict.PASS, f"within tolerance {cmp.tolerance:g}"
    elif p is None or p < cmp.alpha:
        verdict = Verdict.FAIL
        word = f"worse beyond tolerance {cmp.tolerance:g}" + (f" (p={p:.2g} < {cmp.alpha:.2g})" if p else "")
    else:
        verdict, word = Verdict.WAIT, f"inconclusive: worse than tolerance {cmp.tolerance:g} but p={p:.2g}"
    return ComparisonResult(
        cmp, verdict, stat_c, stat_b, degradation, p, (n_c, n_b), f"{label}: {shown} {word} {over}"
    )
