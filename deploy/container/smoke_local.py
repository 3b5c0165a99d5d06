"""Run deploy/compose.yaml here, on the images build-local.sh made, and check it works.

    deploy/container/build-local.sh
    .venv/bin/python deploy/container/smoke_local.py [--keep]

Every service but Grafana (compose.local.yaml), then: every /readyz answers ready,
Prometheus scrapes both fleet servers and both gateways, the two fleet servers split the 64
jobs partitions, a SIGKILLed fleet server's partitions go to the other, a SIGKILLed gateway
leaves the other ready, and the HIL bench runs its smoke suites in a container of the same
Tidegate image (`--target container://localhost/tidegate:0.1.0`, 1 CPU, 1200 MiB). Not part
of `make test` (it builds nothing, but starts ten containers and needs the images); the
figures it prints are quoted in docs/SCALING.md.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SERVICES = [
    "postgres",
    "mosquitto",
    "migrate",
    "fleet-1",
    "fleet-2",
    "fleet-api",
    "shadow-worker",
    "gateway-1",
    "gateway-2",
    "prometheus",
]
READY = {"fleet-api": 8700, "fleet-1": 8701, "fleet-2": 8702, "gateway-1": 8801, "gateway-2": 8802}


def get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read().decode()
    except OSError as exc:
        return getattr(exc, "code", 0) or 0, str(exc)


def wait(what: str, check: Any, timeout_s: float = 90.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if check():
            return time.monotonic() - t0
        time.sleep(0.5)
    raise SystemExit(f"FAILED: {what} not within {timeout_s:g} s")


def metric(port: int, name: str) -> float | None:
    code, text = get(f"http://127.0.0.1:{port}/metrics")
    for line in text.splitlines() if code == 200 else []:
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the services running")
    args = parser.parse_args()
    compose = shutil.which("podman-compose")
    if compose is None:
        raise SystemExit("needs podman-compose (pip install podman-compose)")
    work = Path(tempfile.mkdtemp(prefix="tidegate-compose-"))
    deploy = shutil.copytree(ROOT / "deploy", work / "deploy")
    from builder.samples import make_classifier

    models = deploy / "models"
    make_classifier(models / "classifier-1.3.0.onnx", seed=0)
    make_classifier(models / "classifier-1.4.0.onnx", seed=1)
    for p in [models, *models.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)  # the gateways run as uid 10001
    env = {**os.environ, "TIDEGATE_SHADOW_AUTHKEY": secrets.token_hex(32)}
    files = ["-f", "compose.yaml", "-f", "compose.local.yaml"]
    results: dict[str, Any] = {}

    def podman(*argv: str) -> str:
        return subprocess.run(["podman", *argv], check=True, capture_output=True, text=True, env=env).stdout

    try:
        t0 = time.monotonic()
        up = [compose, *files, "up", "-d", *SERVICES]
        subprocess.run(up, cwd=deploy, env=env, check=True, stdout=subprocess.DEVNULL)
        for name, port in READY.items():
            wait(f"{name} ready", lambda port=port: get(f"http://127.0.0.1:{port}/readyz")[0] == 200)
        results["all_ready_s"] = round(time.monotonic() - t0, 1)

        def scraped() -> bool:
            code, text = get("http://127.0.0.1:9090/api/v1/targets")
            targets = json.loads(text)["data"]["activeTargets"] if code == 200 else []
            results["prometheus_targets"] = sorted(
                f"{t['labels']['instance']} {t['health']}" for t in targets
            )
            return len(targets) == 4 and all(t["health"] == "up" for t in targets)

        wait("prometheus scraping all four", scraped)

        def held() -> list[float | None]:
            return [metric(port, "tidegate_jobs_partitions_held") for port in (8701, 8702)]

        wait("the fleet servers splitting the partitions", lambda: held() == [32, 32])
        results["partitions_before"] = held()
        project = deploy.name
        podman("kill", "-s", "KILL", f"{project}_fleet-1_1")
        results["fleet_failover_s"] = round(
            wait("fleet-2 taking every partition", lambda: held()[1] == 64), 1
        )
        podman("kill", "-s", "KILL", f"{project}_gateway-1_1")
        time.sleep(6)  # past the release-state lease
        results["gateway_2_after_kill"] = get("http://127.0.0.1:8802/readyz")
        # The HIL bench, with the same image as the rig.
        bundle_dir = work / "bundle"
        build = [sys.executable, "-m", "tidegate", "build", str(models / "classifier-1.3.0.onnx")]
        build += ["--name", "classifier", "--version", "1.3.0", "--sku", "edge-cpu", "--out", str(bundle_dir)]
        subprocess.run(build, check=True, capture_output=True)
        bundle = next(bundle_dir.rglob("*.bundle"))
        socket = work / "podman.sock"
        service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{socket}"], env=env)
        try:
            wait("the podman API", socket.exists, 30)
            bench = [
                sys.executable,
                "-m",
                "tidegate",
                "hil",
                "run",
                "--bundle",
                str(bundle),
                "--suite",
                "smoke",
            ]
            bench += [
                "--target",
                "container://localhost/tidegate:0.1.0",
                "--container-engine",
                f"unix://{socket}",
            ]
            bench += ["--container-cpus", "1", "--container-memory", "1200m", "--remote-python", "python3"]
            bench += ["--runs", "50", "--out", str(work / "hil")]
            hil = subprocess.run(bench, check=False, capture_output=True, text=True)
        finally:
            service.terminate()
            service.wait(10)
        report = json.loads((work / "hil" / "report.json").read_text())
        results["hil"] = {
            "exit": hil.returncode,
            "rig": {k: report["rig"].get(k) for k in ("os", "python", "cpu_limit", "memory_limit_mb")},
            "results": {r["name"]: r["status"] for r in report["results"]},
            "latency": next((r["figures"] for r in report["results"] if r["name"] == "latency"), None),
        }
    finally:
        if not args.keep:
            down = [compose, *files, "down", "-t", "2"]
            subprocess.run(down, cwd=deploy, env=env, check=False, capture_output=True)
            subprocess.run(
                ["podman", "pod", "rm", "-f", f"pod_{deploy.name}"], check=False, capture_output=True
            )
    print(json.dumps(results, indent=2))
    ok = (
        results.get("partitions_before") == [32, 32]
        and results.get("gateway_2_after_kill", (0,))[0] == 200
        and results.get("hil", {}).get("exit") == 0
    )
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
