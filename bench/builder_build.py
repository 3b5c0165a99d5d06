"""Builder: build time per SKU for a ~25 MB model (fp32 and int8), and the int8 bundle's
size and inference latency as ratios to the fp32 one, measured in the same run.

Latency is the median of single-threaded ONNX Runtime runs of each SKU's built model on the
same inputs, at batch 1 and batch 32.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import print_table, write_result
from builder.build import BuildRequest, build
from builder.catalogue import load_catalogue
from builder.samples import make_mlp
from shared.bundle import read_bundle

SKUS = {"fp32": "edge-cpu-x86", "int8": "edge-cpu-arm64-int8"}


def _latency_ms(model: Path, batch: int, repeat: int = 200) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, sess.get_inputs()[0].shape[1])).astype(np.float32)
    name = sess.get_inputs()[0].name
    for _ in range(10):
        sess.run(None, {name: x})
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-build-") as tmp:
        work = Path(tmp)
        model = make_mlp(work / "model.onnx", features=1024, hidden=1536, layers=3, classes=10)
        cal = work / "cal.npz"
        np.savez(cal, input=np.random.default_rng(1).standard_normal((256, 1024)).astype(np.float32))
        measured: dict[str, dict[str, Any]] = {}
        for precision, sku in SKUS.items():
            t0 = time.perf_counter()
            result = build(
                BuildRequest(
                    model=model,
                    name="mlp",
                    version="1.0.0",
                    skus=[sku],
                    out=work / precision,
                    calibration=cal,
                ),
                load_catalogue(),
            )
            took = time.perf_counter() - t0
            r = result.skus[0]
            assert r.status == "built", r.reason
            slot = work / f"slot-{precision}"
            read_bundle(work / precision / sku / (r.bundle or ""), slot)
            measured[precision] = {
                "build_s": took,
                "bundle_mb": (r.bundle_size or 0) / 1e6,
                "lat1": _latency_ms(slot / "model.onnx", 1),
                "lat32": _latency_ms(slot / "model.onnx", 32),
                "max_abs_error": (r.agreement or {}).get("max_abs_error"),
                "top1": (r.agreement or {}).get("top1_agreement"),
            }
        base = measured["fp32"]
        for precision, m in measured.items():
            rows.append(
                {
                    "SKU": f"{SKUS[precision]} ({precision})",
                    "source MB": model.stat().st_size / 1e6,
                    "build s": m["build_s"],
                    "bundle MB": m["bundle_mb"],
                    "size x fp32": m["bundle_mb"] / base["bundle_mb"],
                    "p50 ms b=1": m["lat1"],
                    "latency x fp32 b=1": m["lat1"] / base["lat1"],
                    "p50 ms b=32": m["lat32"],
                    "latency x fp32 b=32": m["lat32"] / base["lat32"],
                    "max |Δ| vs fp32": m["max_abs_error"],
                    "top-1 agreement": m["top1"],
                }
            )
    print_table("builder: a ~25 MB MLP, fp32 and int8 SKUs (ratios to fp32 in the same run)", rows)
    write_result("builder_build", rows, notes="single-threaded ONNX Runtime latency, median of 200 runs")
    return rows


if __name__ == "__main__":
    run()
