"""The statistics of drift and calibration, pure: arrays in, numbers out.

* numeric features: two-sample Kolmogorov–Smirnov (asymptotic p-value: exact is quadratic
  in the sample size) and the population stability index over the reference's deciles;
* categorical features: chi-square on the category counts of both samples;
* concept drift (labels known): the error rates of the two samples, two-proportion z-test;
* calibration: expected calibration error over equal-width confidence bins, with the bins
  themselves (a reliability diagram).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

# PSI of an empty bin is infinite; a share this small stands in for zero on either side.
PSI_FLOOR = 1e-4


def ks(reference: np.ndarray[Any, Any], current: np.ndarray[Any, Any]) -> tuple[float, float]:
    """(statistic, p-value) of the two-sample KS test."""
    return ks_sorted(np.sort(reference), np.sort(current))


def ks_sorted(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> tuple[float, float]:
    """KS on already sorted samples: both empirical CDFs at every sample point (searching
    sorted keys in a sorted array is near linear), asymptotic Kolmogorov p-value."""
    n1, n2 = len(a), len(b)
    d_a = np.abs(_own_cdf(a) / n1 - np.searchsorted(b, a, side="right") / n2)
    d_b = np.abs(np.searchsorted(a, b, side="right") / n1 - _own_cdf(b) / n2)
    d = float(max(d_a.max(), d_b.max()))
    en = n1 * n2 / (n1 + n2)
    return d, float(min(1.0, sps.kstwobign.sf(d * math.sqrt(en))))


def _own_cdf(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """`searchsorted(a, a, side="right")` for sorted `a` in one pass: each value's count of
    values ≤ it, i.e. the end of its run of ties."""
    ends = np.flatnonzero(np.append(a[1:] != a[:-1], True)) + 1
    return np.repeat(ends, np.diff(np.concatenate([[0], ends])))


def psi(reference: np.ndarray[Any, Any], current: np.ndarray[Any, Any], bins: int = 10) -> float:
    """Population stability index over the reference's quantile bins (open-ended outer
    bins, so values outside the reference's range count in the end bins)."""
    return psi_sorted(np.sort(reference), np.sort(current), bins)


def psi_sorted(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any], bins: int = 10) -> float:
    """PSI on already sorted samples (the reference's quantiles are read off by index)."""
    edges = np.unique(a[np.minimum((np.arange(1, bins) * len(a)) // bins, len(a) - 1)])
    ref = np.diff(np.concatenate([[0], np.searchsorted(a, edges, side="left"), [len(a)]]))
    cur = np.diff(np.concatenate([[0], np.searchsorted(b, edges, side="left"), [len(b)]]))
    p = np.maximum(ref / max(len(a), 1), PSI_FLOOR)
    q = np.maximum(cur / max(len(b), 1), PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def psi_counts(reference: np.ndarray[Any, Any], current: np.ndarray[Any, Any]) -> float:
    """PSI of two histograms over the same bins (counts)."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    p = np.maximum(ref / max(ref.sum(), 1), PSI_FLOOR)
    q = np.maximum(cur / max(cur.sum(), 1), PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def chi2(reference: np.ndarray[Any, Any], current: np.ndarray[Any, Any]) -> tuple[float, float, int]:
    """(statistic, p-value, categories) of a chi-square test of homogeneity on the counts."""
    cats, codes = np.unique(np.concatenate([reference, current]), return_inverse=True)
    if len(cats) < 2:
        return 0.0, 1.0, len(cats)
    ref = np.bincount(codes[: len(reference)], minlength=len(cats))
    cur = np.bincount(codes[len(reference) :], minlength=len(cats))
    table = np.vstack([ref, cur])
    table = table[:, table.sum(axis=0) > 0]
    r = sps.chi2_contingency(table, correction=False)
    return float(r.statistic), float(r.pvalue), len(cats)


def chi2_counts(reference: np.ndarray[Any, Any], current: np.ndarray[Any, Any]) -> tuple[float, float]:
    """(statistic, p-value) of a chi-square test of homogeneity on two histograms' counts
    over the same bins (bins empty in both are left out)."""
    table = np.vstack([np.asarray(reference, dtype=np.float64), np.asarray(current, dtype=np.float64)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 0.0, 1.0
    r = sps.chi2_contingency(table, correction=False)
    return float(r.statistic), float(r.pvalue)


def category_psi(reference: np.ndarray[Any, Any], current: np.ndarray[Any, Any]) -> float:
    """PSI over categories (each category its own bin)."""
    cats, codes = np.unique(np.concatenate([reference, current]), return_inverse=True)
    p = np.maximum(
        np.bincount(codes[: len(reference)], minlength=len(cats)) / max(len(reference), 1), PSI_FLOOR
    )
    q = np.maximum(
        np.bincount(codes[len(reference) :], minlength=len(cats)) / max(len(current), 1), PSI_FLOOR
    )
    return float(np.sum((q - p) * np.log(q / p)))


def error_rate_change(ref_errors: int, ref_n: int, cur_errors: int, cur_n: int) -> tuple[float, float, float]:
    """(reference error rate, current error rate, two-sided p-value) of a two-proportion z-test."""
    p1, p2 = ref_errors / ref_n, cur_errors / cur_n
    pooled = (ref_errors + cur_errors) / (ref_n + cur_n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / ref_n + 1 / cur_n))
    if se == 0:
        return p1, p2, 1.0 if p1 == p2 else 0.0
    z = (p2 - p1) / se
    return p1, p2, float(math.erfc(abs(z) / math.sqrt(2)))


@dataclass(frozen=True)
class CalibrationBin:
    lower: float
    upper: float
    count: int
    confidence: float | None  # mean predicted confidence in the bin
    accuracy: float | None  # share correct in the bin


def ece(
    confidence: np.ndarray[Any, Any], correct: np.ndarray[Any, Any], bins: int = 10
) -> tuple[float, list[CalibrationBin]]:
    """Expected calibration error: Σ_b (n_b / N) · |accuracy_b − confidence_b| over equal-width
    bins of confidence in [0, 1] (a confidence of exactly 1 falls in the last bin)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.size == 0:
        return 0.0, []
    idx = np.minimum((confidence * bins).astype(int), bins - 1)
    total, out = 0.0, []
    for b in range(bins):
        mask = idx == b
        n = int(mask.sum())
        conf = float(confidence[mask].mean()) if n else None
        acc = float(correct[mask].mean()) if n else None
        if n:
            total += n / confidence.size * abs(acc - conf)  # type: ignore[operator]
        out.append(CalibrationBin(b / bins, (b + 1) / bins, n, conf, acc))
    return total, out
