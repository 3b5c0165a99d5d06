"""Release judgement on the model: what it costs.

1. Gate evaluation: one canary tick (`Canary.tick`: the absolute conditions, and the
   comparisons with production: two-proportion on errors, Mann-Whitney U on latency) with
   100,000 latency samples a side. Target: under 50 ms. Baseline in the same run: numpy
   sorting the 200,000 samples once (the least any rank test must do).
2. Shadow diffs for the detector: frames a second the mirror's KPI code (IoU matching per
   class, NMS stability, every metadata slice) compares, against the frames a second the
   gateway answers on the same model in the same run. The diff must keep up with 100 %
   mirroring: ratio >= 1.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import best_of, print_table, write_result
from cloud_serving.canary import Canary, CanarySpec
from cloud_serving.diffs import SlicedDiff, Task, TaskSpec


def gate_tick(samples: int = 100_000) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    spec = CanarySpec(steps=(50, 100), bake_s=60, window_s=300, slo_p95_ms=1e3, slo_p99_ms=1e3)
    c = Canary.begin("m", "a", "b", spec, t0)
    for baseline in (False, True):
        lat = rng.lognormal(0, 0.3, samples)
        for i, ms in enumerate(lat):
            c.record(
                t0 + timedelta(seconds=120 * i / samples), ok=True, latency_ms=float(ms), baseline=baseline
            )
    now = t0 + timedelta(seconds=121)
    ticks = []
    for _ in range(7):
        c.state = type(c.state)(step=0, step_started_at=t0)  # baked: every tick looks at the comparisons
        t = time.perf_counter()
        d = c.tick(now)
        ticks.append(time.perf_counter() - t)
    all_lat = np.concatenate([c.sides[s].columns()["latency_ms"].value for s in ("candidate", "baseline")])
    baseline_s = best_of(lambda: np.sort(all_lat), repeat=5)
    tick_s = float(np.median(ticks))
    return {
        "case": f"canary tick, {samples:,} latency samples a side (absolute + relative gates)",
        "value": tick_s * 1000,
        "unit": "ms (median of 7)",
        "target": "< 50 ms",
        "baseline": "numpy sort of both sides' samples",
        "baseline value": baseline_s * 1000,
        "ratio to baseline": tick_s / baseline_s,
        "decision": d.action.value,
    }


def detector_diffs(frames: int = 4000) -> dict[str, Any]:
    from builder.samples import make_multibox_detector
    from cloud_serving.config import ServingConfig
    from cloud_serving.gateway import Gateway

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_multibox_detector(d / "a.onnx", seed=0)
        make_multibox_detector(d / "b.onnx", seed=0, drift=0.05)
        cfg = ServingConfig.model_validate(
            {
                "models": {
                    "det": {
                        "production": "a",
                        "scores_output": "scores",
                        "task": {"kind": "detection"},
                        "versions": {"a": {"path": str(d / "a.onnx")}, "b": {"path": str(d / "b.onnx")}},
                    }
                }
            }
        )
        x = np.random.default_rng(1).standard_normal((frames, 32)).astype(np.float32)

        async def serve() -> tuple[float, list[dict[str, Any]], list[dict[str, Any]]]:
            gw = Gateway(cfg)
            await gw.start(tick=False)
            try:

                async def one(i: int) -> Any:
                    return await gw.infer("det", x[i], key=str(i))

                t = time.perf_counter()
                answers = []
                for start in range(0, frames, 64):  # 64 callers at a time
                    answers += await asyncio.gather(*(one(i) for i in range(start, min(start + 64, frames))))
                took = time.perf_counter() - t
                st = gw.model("det")
                cand = [await gw._run(st, "b", x[i]) for i in range(frames)]
            finally:
                await gw.stop()
            return took, [a.outputs for a in answers], [c.outputs for c in cand]

        served_s, prod, cand = asyncio.run(serve())
    spec = TaskSpec(task=Task.DETECTION, scores_output="scores")
    slices = [
        ["weather=rain", f"region=r{i % 4}", "time=night" if i % 2 else "time=day"] for i in range(frames)
    ]

    batch = 32  # as the gateway hands them to the mirror (32 samples or 20 ms)
    batches = [
        (
            {k: np.stack([p[k] for p in prod[i : i + batch]]) for k in prod[0]},
            {k: np.stack([c[k] for c in cand[i : i + batch]]) for k in cand[0]},
            slices[i : i + batch],
        )
        for i in range(0, frames, batch)
    ]

    def diff_all() -> None:
        acc = SlicedDiff(spec)
        for p, c, s in batches:
            acc.add_batch(p, c, s)
        acc.rows()

    diff_s = best_of(diff_all, repeat=3)
    boxes = sum(int((p["scores"].max(axis=1) >= 0.5).sum()) for p in prod)
    return {
        "case": f"detector shadow diffs, {frames:,} frames ({boxes:,} production boxes) in batches of "
        f"{batch}, 3 slices each",
        "value": frames / diff_s,
        "unit": "frames/s compared",
        "target": "ratio >= 1",
        "baseline": "gateway answers/s on the production detector, 64 concurrent callers",
        "baseline value": frames / served_s,
        "ratio to baseline": served_s / diff_s,
        "decision": f"{boxes / diff_s:,.0f} boxes/s",
    }


def run() -> list[dict[str, Any]]:
    rows = [gate_tick(), detector_diffs()]
    print_table("release gates: canary tick and shadow diffs", rows)
    write_result(
        "release_gates",
        rows,
        notes="one process; the shadow's diff code timed alone (the gateway runs it in the mirror's process)",
    )
    return rows


if __name__ == "__main__":
    run()
