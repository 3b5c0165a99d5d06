"""Drift and calibration: false alarms stay at the configured rate, real shifts are found,
ECE matches a hand-worked example, and `tidegate drift run` works on files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from shared.drift.job import DriftConfig, DriftInputError, run_drift
from shared.drift.stats import ece, psi
from tidegate.cli import main

REGIONS = np.array(["eu", "us", "apac"])


def _draw(
    rng: np.random.Generator, n: int, *, shift: float = 0.0, eu_share: float = 0.4
) -> dict[str, np.ndarray]:
    return {
        **{f"f{i}": rng.standard_normal(n) + (shift if i == 2 else 0.0) for i in range(5)},
        "region": rng.choice(REGIONS, n, p=[eu_share, (1 - eu_share) * 0.6, (1 - eu_share) * 0.4]),
    }


def test_no_alarm_beyond_the_configured_rate_on_data_from_the_reference_distribution() -> None:
    """400 jobs on unchanged data (5 numeric features and a categorical one): the alarm rate
    stays within alpha plus three standard errors, while testing each feature at alpha
    without the job-level correction would alarm visibly more often."""
    rng = np.random.default_rng(11)
    alpha, runs = 0.05, 400
    reference = _draw(rng, 1000)
    alarms = uncorrected = 0
    for _ in range(runs):
        report = run_drift(reference, _draw(rng, 1000), DriftConfig(alpha=alpha))
        alarms += report.alarm
        uncorrected += any(f.p_value < alpha for f in report.overall.features)
    rate, naive = alarms / runs, uncorrected / runs
    assert rate <= alpha + 3 * (alpha * (1 - alpha) / runs) ** 0.5
    assert naive > alpha * 2 and naive > rate


def test_a_shifted_feature_and_a_shifted_category_mix_are_found() -> None:
    rng = np.random.default_rng(12)
    reference = _draw(rng, 5000)
    report = run_drift(reference, _draw(rng, 5000, shift=0.3), DriftConfig())
    assert report.alarm and report.overall.drifted == ["f2"]
    assert any(r.startswith("f2: ks p") for r in report.reasons)
    report = run_drift(reference, _draw(rng, 5000, eu_share=0.6), DriftConfig())
    assert report.overall.drifted == ["region"]
    assert next(f for f in report.overall.features if f.feature == "region").test == "chi2"
    # a large shift crosses the PSI threshold too
    big = run_drift(reference, _draw(rng, 5000, shift=1.0), DriftConfig())
    assert next(f for f in big.overall.features if f.feature == "f2").psi >= 0.2


def test_drift_in_one_slice_is_reported_for_that_slice() -> None:
    rng = np.random.default_rng(13)
    reference = _draw(rng, 12_000)
    current = _draw(rng, 12_000)
    eu = current["region"] == "eu"
    current["f0"] = np.where(eu, current["f0"] + 0.5, current["f0"])
    report = run_drift(reference, current, DriftConfig(slice_by="region", features=("f0", "f1")))
    by_slice = {s.slice: s.drifted for s in report.slices}
    assert by_slice["region=eu"] == ["f0"] and by_slice["region=us"] == [] and by_slice["region=apac"] == []
    assert report.tests == 2 * 4  # two features, overall and three slices: alpha is shared by all


def test_psi_of_a_hand_worked_example() -> None:
    # reference deciles of 0..9 put each value in its own bin; the current sample puts half
    # of its mass in the top bin and spreads the rest evenly over the other nine
    reference = np.arange(10.0).repeat(100)
    current = np.concatenate([np.full(500, 9.0), np.arange(9.0).repeat(500 // 9 + 1)[:500]])
    p = np.full(10, 0.1)
    q = np.bincount(current.astype(int), minlength=10) / len(current)
    assert psi(reference, current) == pytest.approx(float(np.sum((q - p) * np.log(q / p))), rel=1e-9)
    assert psi(reference, reference) == 0.0


def test_ece_of_a_hand_worked_example() -> None:
    # bins of width 0.1: {0.9, 0.9} acc 0.5 → 2/5·0.4; {0.8} acc 1 → 1/5·0.2;
    # {0.6} acc 1 → 1/5·0.4; {0.3} acc 0 → 1/5·0.3; total 0.16 + 0.04 + 0.08 + 0.06 = 0.34
    value, bins = ece(np.array([0.9, 0.9, 0.8, 0.6, 0.3]), np.array([1, 0, 1, 1, 0]))
    assert value == pytest.approx(0.34)
    assert [b.count for b in bins] == [0, 0, 0, 1, 0, 0, 1, 0, 1, 2]
    assert bins[9].accuracy == 0.5 and bins[9].confidence == pytest.approx(0.9)
    assert ece(np.array([1.0, 1.0]), np.array([1, 1]))[0] == 0.0  # confidence 1 is in the last bin


def test_concept_drift_and_calibration_when_labels_exist() -> None:
    rng = np.random.default_rng(14)
    n = 6000

    def labelled(error_rate: float) -> dict[str, np.ndarray]:
        label = rng.integers(0, 3, n)
        wrong = rng.random(n) < error_rate
        return {
            "x": rng.standard_normal(n),
            "label": label,
            "prediction": np.where(wrong, (label + 1) % 3, label),
            "confidence": np.full(n, 0.9),
        }

    cfg = DriftConfig(label="label", prediction="prediction", confidence="confidence")
    same = run_drift(labelled(0.1), labelled(0.1), cfg)
    assert not same.alarm and same.calibration is not None and same.calibration["ece"] < 0.03
    worse = run_drift(labelled(0.1), labelled(0.2), cfg)
    assert worse.alarm and worse.concept is not None and worse.concept["drifted"]
    assert worse.calibration is not None and worse.calibration["ece"] == pytest.approx(0.1, abs=0.02)
    assert [f.feature for f in worse.overall.features] == ["x"]  # label columns are not features


def test_bad_tables_are_refused() -> None:
    a = {"x": np.zeros(10), "y": np.zeros(10)}
    with pytest.raises(DriftInputError, match="missing.*y"):
        run_drift(a, {"x": np.zeros(10)})
    with pytest.raises(DriftInputError, match="different lengths"):
        run_drift(a, {"x": np.zeros(10), "y": np.zeros(3)})
    with pytest.raises(DriftInputError, match="empty"):
        run_drift(a, {"x": np.zeros(0), "y": np.zeros(0)})


def _csv(path: Path, table: dict[str, np.ndarray]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(table)
        w.writerows(zip(*table.values(), strict=True))
    return path


def test_the_cli_on_csv_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(15)
    ref = _csv(tmp_path / "ref.csv", _draw(rng, 3000))
    same = _csv(tmp_path / "same.csv", _draw(rng, 3000))
    shifted = _csv(tmp_path / "shifted.csv", _draw(rng, 3000, shift=0.5))
    out = tmp_path / "report"
    assert main(["drift", "run", "--reference", str(ref), "--current", str(same), "--out", str(out)]) == 0
    assert "no drift" in capsys.readouterr().out
    args = [
        "drift",
        "run",
        "--reference",
        str(ref),
        "--current",
        str(shifted),
        "--out",
        str(out),
        "--slice-by",
        "region",
    ]
    assert main(args) == 1
    assert "drift: f2:" in capsys.readouterr().out
    saved = json.loads((out / "drift.json").read_text())
    assert saved["alarm"] and "f2" in saved["overall"]["drifted"] and len(saved["slices"]) == 3
    page = (out / "drift.html").read_text()
    assert 'id="psi"' in page and "DRIFT" in page
    bad = tmp_path / "bad.csv"
    bad.write_text("f0,f1\n1,2\n3\n")
    assert main(["drift", "run", "--reference", str(ref), "--current", str(bad)]) == 2
    assert "bad.csv:3: 1 fields, the header has 2" in capsys.readouterr().err


def test_ks_matches_scipy() -> None:
    from scipy import stats as sps

    from shared.drift.stats import ks

    rng = np.random.default_rng(16)
    for n1, n2, shift in ((1000, 1200, 0.0), (5000, 5000, 0.1), (300, 4000, 0.2)):
        a, b = rng.standard_normal(n1), rng.standard_normal(n2) + shift
        got, want = ks(a, b), sps.ks_2samp(a, b, method="asymp")
        assert got[0] == pytest.approx(float(want.statistic), abs=1e-12)
        assert got[1] == pytest.approx(float(want.pvalue), rel=0.1)
    ties = np.array([0.0, 0.0, 1.0, 1.0, 2.0])
    assert ks(ties, ties)[0] == 0.0
