"""A drift job: a reference table against a current one, per feature and per slice.

A table is columns by name (`dict[str, ndarray]`, equal lengths). Numeric columns get KS
and PSI, categorical ones (strings, or listed in `categorical`) chi-square and PSI. With a
label and a prediction column the job also checks concept drift (the error rate) and, with
a confidence column, calibration (ECE and the reliability diagram) of the current sample.

The false-alarm rate is the configured `alpha` for the whole job, not per test: each test
runs at alpha divided by the number of tests (Bonferroni), so twenty features on unchanged
data do not raise an alarm twenty times as often as one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from shared.drift import stats
from shared.errors import TidegateError

Table = dict[str, np.ndarray[Any, Any]]


class DriftInputError(TidegateError):
    """Tables the job cannot compare (missing columns, empty, mismatched lengths)."""

    exit_code = 2


@dataclass(frozen=True)
class DriftConfig:
    alpha: float = 0.01  # the job's false-alarm rate on data from the reference distribution
    psi_threshold: float = 0.2  # PSI at or above this is drift whatever the p-value
    bins: int = 10
    categorical: tuple[str, ...] = ()
    slice_by: str | None = None  # a column whose values each get their own comparison
    min_slice_rows: int = 200  # smaller slices are listed, not tested
    label: str | None = None
    prediction: str | None = None
    confidence: str | None = None
    features: tuple[str, ...] | None = None  # default: every column but the special ones


@dataclass
class FeatureDrift:
    feature: str
    kind: str  # numeric | categorical
    test: str  # ks | chi2
    statistic: float
    p_value: float
    psi: float
    drifted: bool


@dataclass
class SliceDrift:
    slice: str
    reference_rows: int
    current_rows: int
    tested: bool
    features: list[FeatureDrift] = field(default_factory=list)

    @property
    def drifted(self) -> list[str]:
        return [f.feature for f in self.features if f.drifted]


@dataclass
class DriftReport:
    config: dict[str, Any]
    reference_rows: int
    current_rows: int
    tests: int
    per_test_alpha: float
    overall: SliceDrift
    slices: list[SliceDrift]
    concept: dict[str, Any] | None
    calibration: dict[str, Any] | None
    alarm: bool
    reasons: list[str]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["overall"]["drifted"] = self.overall.drifted
        for s, obj in zip(data["slices"], self.slices, strict=True):
            s["drifted"] = obj.drifted
        return data


def _rows(table: Table) -> int:
    lengths = {len(v) for v in table.values()}
    if len(lengths) > 1:
        raise DriftInputError(f"columns of different lengths: {sorted(lengths)}")
    return lengths.pop() if lengths else 0


def _features(reference: Table, current: Table, config: DriftConfig) -> list[str]:
    special = {c for c in (config.slice_by, config.label, config.prediction, config.confidence) if c}
    names = list(config.features) if config.features else [c for c in reference if c not in special]
    missing = [n for n in [*names, *special] if n not in reference or n not in current]
    if missing:
        raise DriftInputError(f"columns missing from the reference or the current data: {', '.join(missing)}")
    if not names:
        raise DriftInputError("no feature columns to compare")
    return names


def _categorical(name: str, column: np.ndarray[Any, Any], config: DriftConfig) -> bool:
    return name in config.categorical or not np.issubdtype(column.dtype, np.number)


def _compare(
    reference: Table, current: Table, names: list[str], config: DriftConfig, per_test_alpha: float
) -> list[FeatureDrift]:
    out = []
    for name in names:
        ref, cur = reference[name], current[name]
        if _categorical(name, ref, config):
            ref, cur = ref.astype(str), cur.astype(str)
            stat, p, _ = stats.chi2(ref, cur)
            index, kind, test = stats.category_psi(ref, cur), "categorical", "chi2"
        else:
            ref, cur = ref.astype(np.float64), cur.astype(np.float64)
            ref, cur = np.sort(ref[np.isfinite(ref)]), np.sort(cur[np.isfinite(cur)])
            if not len(ref) or not len(cur):
                raise DriftInputError(f"feature {name!r} has no finite values on one side")
            stat, p = stats.ks_sorted(ref, cur)  # one sort per column serves both tests
            index, kind, test = stats.psi_sorted(ref, cur, config.bins), "numeric", "ks"
        out.append(
            FeatureDrift(
                name, kind, test, stat, p, index, p < per_test_alpha or index >= config.psi_threshold
            )
        )
    return out


def run_drift(reference: Table, current: Table, config: DriftConfig = DriftConfig()) -> DriftReport:
    n_ref, n_cur = _rows(reference), _rows(current)
    if not n_ref or not n_cur:
        raise DriftInputError(f"empty data: {n_ref} reference rows, {n_cur} current rows")
    names = _features(reference, current, config)
    tested_slices = []
    if config.slice_by:
        ref_keys, cur_keys = reference[config.slice_by].astype(str), current[config.slice_by].astype(str)
        for v in sorted(set(ref_keys) | set(cur_keys)):
            rm, cm = ref_keys == v, cur_keys == v
            enough = rm.sum() >= config.min_slice_rows and cm.sum() >= config.min_slice_rows
            tested_slices.append((v, rm, cm, bool(enough)))
    tests = len(names) * (1 + sum(t for *_, t in tested_slices))
    tests += int(bool(config.label and config.prediction))
    per_test = config.alpha / max(tests, 1)

    overall = SliceDrift("all", n_ref, n_cur, True, _compare(reference, current, names, config, per_test))
    slices = []
    for v, rm, cm, tested in tested_slices:
        sd = SliceDrift(f"{config.slice_by}={v}", int(rm.sum()), int(cm.sum()), tested)
        if tested:
            sd.features = _compare(
                {k: c[rm] for k, c in reference.items()},
                {k: c[cm] for k, c in current.items()},
                names,
                config,
                per_test,
            )
        slices.append(sd)

    reasons = [f"{f.feature}: {_why(f, per_test, config)}" for f in overall.features if f.drifted]
    for sd in slices:
        reasons += [f"{sd.slice} {f.feature}: {_why(f, per_test, config)}" for f in sd.features if f.drifted]

    concept = None
    calibration = None
    if config.label and config.prediction:
        ref_ok = reference[config.label].astype(str) == reference[config.prediction].astype(str)
        cur_ok = current[config.label].astype(str) == current[config.prediction].astype(str)
        r1, r2, p = stats.error_rate_change(int((~ref_ok).sum()), n_ref, int((~cur_ok).sum()), n_cur)
        drifted = p < per_test and r2 > r1
        concept = {"reference_error_rate": r1, "current_error_rate": r2, "p_value": p, "drifted": drifted}
        if drifted:
            reasons.append(f"error rate rose from {r1:.3f} to {r2:.3f} (p {p:.2g})")
        if config.confidence:
            value, diagram = stats.ece(current[config.confidence], cur_ok, config.bins)
            calibration = {"ece": value, "bins": [asdict(b) for b in diagram]}

    return DriftReport(
        config=asdict(config),
        reference_rows=n_ref,
        current_rows=n_cur,
        tests=tests,
        per_test_alpha=per_test,
        overall=overall,
        slices=slices,
        concept=concept,
        calibration=calibration,
        alarm=bool(reasons),
        reasons=reasons,
    )


def _why(f: FeatureDrift, per_test: float, config: DriftConfig) -> str:
    parts = []
    if f.p_value < per_test:
        parts.append(f"{f.test} p {f.p_value:.2g} < {per_test:.2g}")
    if f.psi >= config.psi_threshold:
        parts.append(f"PSI {f.psi:.3f} ≥ {config.psi_threshold:g}")
    return ", ".join(parts)
