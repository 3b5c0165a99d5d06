"""The HIL container rig's CPU quota standing in for a smaller SoC: the latency suite's p50
and p95 for one bundle on this machine (`--target local`) and in a container rig at 2, 1 and
0.5 CPUs (`--container-cpus`), through podman's Docker API, in one run. The probe runs the
model on one thread (an MLP of 13.6M MACs, a few ms a run), so a quota of 1 CPU or more
should cost it little and 0.5 should show the CFS throttling a half-core SoC would. Ratios
are against the local run of the same run.

    python -m bench.hil_container        (needs podman and runc: .ci/run installs them)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import print_table, write_result
from builder.samples import make_mlp, write_inference_config, write_selftest
from tests.container_engine import PODMAN, RUNC, host_mounts, host_tree_image, podman_engine
from tests.helpers import build_bundle, self_test
from tidegate.cli import main as tidegate

RUNS = 400
QUOTAS = (2.0, 1.0, 0.5)


def _latency(argv: list[str], out: Path) -> dict[str, Any]:
    code = tidegate(["hil", "run", *argv, "--suite", "latency", "--runs", str(RUNS), "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    if code != 0 and not report.get("results"):
        raise RuntimeError(f"the bench run failed: {report.get('incomplete_reason')}")
    result = next(r for r in report["results"] if r["name"] == "latency")
    return {
        "p50_ms": result["figures"]["p50_ms"],
        "p95_ms": result["figures"]["p95_ms"],
        "rig": report["rig"],
    }


def run() -> list[dict[str, Any]]:
    if PODMAN is None or RUNC is None:
        print("hil_container: podman and runc are needed (apt-get install podman runc); skipped")
        return []
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-hil-") as tmp:
        d = Path(tmp)
        payload = d / "payload"
        model = make_mlp(payload / "model.onnx", features=512, hidden=2048, layers=4)  # ~4 ms a run
        write_inference_config(model, payload / "inference_config.json")
        write_selftest(model, payload / "selftest")
        bundle = build_bundle(
            payload,
            d / "mlp.bundle",
            name="mlp",
            version="1.0.0",
            skus=["edge-cpu"],
            self_test=self_test(latency_budget_ms=10_000.0),
        )
        pyz = d / "probe.pyz"
        tidegate(["hil", "probe-package", "--out", str(pyz)])
        local = _latency(["--bundle", str(bundle), "--probe", str(pyz)], d / "local")
        rows = [
            {
                "rig": "this machine (local)",
                "p50 ms": local["p50_ms"],
                "p95 ms": local["p95_ms"],
                "p95 ratio": 1.0,
            }
        ]
        (d / "engine").mkdir()
        with podman_engine(d / "engine") as url:
            image = host_tree_image(url)
            mounts = [arg for m in host_mounts() for arg in ("--container-mount", m)]
            for cpus in QUOTAS:
                argv = ["--bundle", str(bundle), "--probe", str(pyz), "--target", f"container://{image}"]
                argv += ["--container-engine", url, "--container-cpus", f"{cpus:g}"]
                argv += ["--container-memory", "1200m", "--remote-python", sys.executable, *mounts]
                got = _latency(argv, d / f"cpus-{cpus:g}")
                rows.append(
                    {
                        "rig": f"container, {got['rig'].get('cpu_limit')} CPUs (cgroup), 1200 MiB",
                        "p50 ms": got["p50_ms"],
                        "p95 ms": got["p95_ms"],
                        "p95 ratio": got["p95_ms"] / local["p95_ms"],
                    }
                )
    print_table(f"HIL latency suite ({RUNS} runs, MLP 512-2048x4, one thread) by rig", rows)
    write_result("hil_container", rows, notes="latency suite p95 in a container rig against local, same run")
    return rows


if __name__ == "__main__":
    run()
