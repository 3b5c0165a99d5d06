"""Drift job throughput: `run_drift` on 1M current rows against 1M reference rows, 20 features
(18 numeric, 2 categorical), with a slice column of 4 values. Baseline in the same run: numpy
sorting every column of both tables once, the least any KS test must do."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.common import best_of, print_table, write_result
from shared.drift.job import DriftConfig, run_drift


def _table(rng: np.random.Generator, n: int, shift: float) -> dict[str, np.ndarray[Any, Any]]:
    t: dict[str, np.ndarray[Any, Any]] = {
        f"x{i}": rng.standard_normal(n) + (shift if i == 0 else 0) for i in range(18)
    }
    t["device_class"] = rng.choice(np.array(["a", "b", "c", "d", "e"]), n)
    t["firmware"] = rng.choice(np.array(["1.0", "1.1", "2.0"]), n)
    t["region"] = rng.choice(np.array(["eu", "us", "apac", "latam"]), n)
    return t


def run(rows: int = 1_000_000) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    reference, current = _table(rng, rows, 0.0), _table(rng, rows, 0.05)
    numeric = [k for k in reference if k.startswith("x")]
    baseline = best_of(lambda: [np.sort(t[k]) for t in (reference, current) for k in numeric], repeat=2)
    out: list[dict[str, Any]] = []
    for label, cfg in (
        ("20 features", DriftConfig()),
        ("20 features x (all + 4 region slices)", DriftConfig(slice_by="region")),
    ):
        t0 = time.perf_counter()
        report = run_drift(reference, current, cfg)
        took = time.perf_counter() - t0
        out.append(
            {
                "case": f"{rows:,} rows vs {rows:,}, {label}",
                "seconds": took,
                "rows/s": rows / took,
                "baseline": "numpy sort of the 18 numeric columns of both tables",
                "baseline s": baseline,
                "ratio to baseline": took / baseline,
                "alarm": report.alarm,
                "drifted": ",".join(report.overall.drifted),
            }
        )
    print_table("drift job (KS, PSI, chi-square; Bonferroni over the job)", out)
    write_result("drift", out, notes="single process; the x0 shift of 0.05 sd is found")
    return out


if __name__ == "__main__":
    run()
