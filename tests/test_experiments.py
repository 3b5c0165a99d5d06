"""Experiment statistics: the sequential test keeps its false-positive rate however often it
is peeked at (the naive test does not), it still finds real effects, the split check flags
a mismatch, the sample-size plan matches the textbook, and the bandit finds the best arm."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from cloud_serving.experiments import MSPRT, Thompson, naive_z_p_value, regret, sample_size, srm_p_value

ALPHA = 0.05


def _peeking_experiments(
    effect: float, experiments: int, batches: int, batch: int, seed: int
) -> tuple[float, float]:
    """Share of experiments rejected by mSPRT and by a naive z-test, both peeked after every
    batch, on Bernoulli data with base rate 0.2 and the given absolute effect."""
    rng = np.random.default_rng(seed)
    ctl = rng.random((experiments, batches * batch)) < 0.2
    trt = rng.random((experiments, batches * batch)) < 0.2 + effect
    msprt_hits = naive_hits = 0
    for e in range(experiments):
        test = MSPRT(alpha=ALPHA, tau2=0.02**2)
        c, t = np.cumsum(ctl[e]), np.cumsum(trt[e])
        naive = False
        for b in range(1, batches + 1):
            n = b * batch
            sc, st = float(c[n - 1]), float(t[n - 1])  # Bernoulli: the sum of squares is the sum
            test.update(n, st, st, sc, sc)
            naive = naive or naive_z_p_value(n, st, st, sc, sc) <= ALPHA
        msprt_hits += test.rejected
        naive_hits += naive
    return msprt_hits / experiments, naive_hits / experiments


def test_the_sequential_test_keeps_alpha_under_peeking_and_the_naive_one_does_not() -> None:
    msprt, naive = _peeking_experiments(0.0, experiments=1000, batches=20, batch=100, seed=7)
    se = math.sqrt(ALPHA * (1 - ALPHA) / 1000)
    assert msprt <= ALPHA + 3 * se  # always valid: at most alpha (up to sampling noise)
    assert naive > 2 * ALPHA  # peeking at a fixed-horizon test inflates its false positives


def test_the_sequential_test_finds_a_real_effect() -> None:
    hits, _ = _peeking_experiments(0.03, experiments=200, batches=20, batch=400, seed=11)
    assert hits > 0.8


def test_the_confidence_interval_covers_the_truth_and_narrows() -> None:
    rng = np.random.default_rng(3)
    t = rng.random(20_000) < 0.25
    c = rng.random(20_000) < 0.20
    test = MSPRT(alpha=ALPHA, tau2=0.02**2)
    widths = []
    for n in (1000, 5000, 20_000):
        lo, hi = test.confidence_interval(
            n, float(t[:n].sum()), float(t[:n].sum()), float(c[:n].sum()), float(c[:n].sum())
        )
        widths.append(hi - lo)
    assert lo < 0.05 < hi and widths[0] > widths[1] > widths[2]


def test_sample_ratio_mismatch() -> None:
    assert srm_p_value({"a": 5000, "b": 5000}, {"a": 0.5, "b": 0.5}) > 0.5
    assert srm_p_value({"a": 5000, "b": 5400}, {"a": 0.5, "b": 0.5}) < 0.001
    assert srm_p_value({"a": 9000, "b": 1000}, {"a": 0.9, "b": 0.1}) > 0.5
    assert 0.04 < srm_p_value({"a": 1000, "b": 1000, "c": 1090}, {"a": 1, "b": 1, "c": 1}) < 0.15
    # chi-square with 1 dof at the 3.841 critical value is p = 0.05
    n = 10_000
    b = int(n / 2 + math.sqrt(3.841 * n / 4))
    assert abs(srm_p_value({"a": n - b, "b": b}, {"a": 1, "b": 1}) - 0.05) < 0.005


def test_sample_size_matches_the_textbook() -> None:
    assert abs(sample_size(0.10, 0.02) - 3841) / 3841 < 0.01  # 10 % -> 12 %, alpha 0.05, power 0.8
    assert sample_size(0.10, 0.01) > 3.5 * sample_size(0.10, 0.02)  # quarter the variance budget
    with pytest.raises(ValueError):
        sample_size(0.99, 0.05)


def test_thompson_sampling_converges_to_the_best_arm() -> None:
    rates = {"a": 0.05, "b": 0.10, "c": 0.15}
    rng = random.Random(5)
    bandit = Thompson(list(rates), burn_in=150, seed=5)
    late: list[str] = []
    for i in range(6000):
        arm = bandit.choose()
        bandit.update(arm, rng.random() < rates[arm])
        if i >= 5000:
            late.append(arm)
    assert late.count("c") / len(late) > 0.8
    pulls = {a: s["pulls"] for a, s in bandit.summary().items()}
    uniform = regret({a: 2000 for a in rates}, rates)
    assert regret(pulls, rates) < uniform / 3


def test_an_experiment_admits_only_its_cohort_and_time_window() -> None:
    from cloud_serving.experiments import ExperimentSpec

    spec = ExperimentSpec(control="a", treatment="b", cohort={"region": ("eu", "uk")}, hours_utc=(22, 6))
    assert spec.admits({"region": "eu"}, 23) and spec.admits({"region": "uk"}, 3)
    assert not spec.admits({"region": "us"}, 23)  # outside the cohort
    assert not spec.admits({"region": "eu"}, 12)  # outside the (overnight) window
    assert not spec.admits({}, 23)
    assert ExperimentSpec(control="a", treatment="b").admits({}, 12)
