"""Agent runtime benchmarks.

1. Local batcher throughput with 1, 8 and 32 concurrent callers, as a ratio
   to calling the model one request at a time in the same run (goal >= 3x at 32).
2. Idle footprint of the daemon: RSS and CPU over an idle window with a
   beacon every 10 s, against a private Mosquitto (goal < 1% of one core).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from agent.batcher import DynamicBatcher, OnnxRunner
from bench.common import print_table, write_result
from shared.bundle import read_bundle
from shared.trust import UpdateRepository
from tests.helpers import build_bundle
from tests.mqtt_helpers import MOSQUITTO, Broker

REQUESTS = 4000


MODELS = {
    # name: (features, hidden, layers); both are "small CPU models", of different weight
    "mlp-256x512x3 (0.7M params)": (256, 512, 3),
    "mlp-512x1024x3 (2.6M params)": (512, 1024, 3),
}


def _slot(work: Path, features: int, hidden: int, layers: int) -> Path:
    from builder.samples import make_mlp, write_inference_config, write_selftest

    payload = work / "payload"
    make_mlp(payload / "model.onnx", features=features, hidden=hidden, layers=layers)
    write_inference_config(payload / "model.onnx", payload / "inference_config.json")
    write_selftest(payload / "model.onnx", payload / "selftest")
    bundle = build_bundle(payload, work / "mlp.bundle")
    slot = work / "slot"
    slot.mkdir()
    manifest = read_bundle(bundle, slot)
    (slot / "bundle.json").write_bytes(manifest.to_json_bytes())
    return slot


def batcher_throughput(work: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i, (name, dims) in enumerate(MODELS.items()):
        rows += _batcher_rows(work / f"m{i}", name, *dims)
    return rows


def _batcher_rows(work: Path, name: str, features: int, hidden: int, layers: int) -> list[dict[str, Any]]:
    slot = _slot(work, features, hidden, layers)
    runner = OnnxRunner(slot, threads=1)
    x = np.random.default_rng(0).standard_normal((REQUESTS, features)).astype(np.float32)
    for i in range(50):
        runner.run_batch(x[i : i + 1])
    t0 = time.perf_counter()
    for i in range(REQUESTS):
        runner.run_batch(x[i : i + 1])
    baseline = REQUESTS / (time.perf_counter() - t0)
    rows = [
        {
            "model": name,
            "case": "one request at a time (baseline)",
            "callers": 1,
            "req/s": baseline,
            "x baseline": 1.0,
        }
    ]
    for callers in (1, 8, 32):

        async def go(callers: int = callers) -> float:
            b = DynamicBatcher(runner, max_batch=16, max_delay_ms=2, max_queue=4096, concurrency=2)
            b.start()
            per = REQUESTS // callers

            async def caller(k: int) -> None:
                for i in range(per):
                    await b.infer(x[(k * per + i) % REQUESTS])

            t = time.perf_counter()
            await asyncio.gather(*(caller(k) for k in range(callers)))
            elapsed = time.perf_counter() - t
            await b.stop()
            return per * callers / elapsed

        rate = asyncio.run(go())
        rows.append(
            {
                "model": "",
                "case": "dynamic batcher",
                "callers": callers,
                "req/s": rate,
                "x baseline": rate / baseline,
            }
        )
    return rows


def _cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def idle_footprint(work: Path, seconds: float) -> dict[str, Any]:
    broker = Broker(work / "broker").start()
    try:
        repo = UpdateRepository.init(work / "repo")
        device = work / "device"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tidegate",
                "agent",
                "provision",
                "--root",
                str(device),
                "--device-id",
                "idle-1",
                "--sku",
                "bench",
                "--trusted-root",
                str(repo.metadata_dir / "1.root.json"),
            ],
            check=True,
            capture_output=True,
        )
        thermal = work / "thermal" / "thermal_zone0"
        thermal.mkdir(parents=True)
        (thermal / "temp").write_text("45000")
        cfg = work / "agent.toml"
        cfg.write_text(
            f'[device]\nroot = "{device}"\n[mqtt]\nport = {broker.port}\n'
            "[telemetry]\nbeacon_interval_s = 10\n"
            f'[thermal]\nroot = "{work / "thermal"}"\npoll_s = 2\n[health]\nport = 0\n'
            f'[vehicle]\nstate_file = "{work / "vehicle.json"}"\n'
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "tidegate", "agent", "run", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(5)  # start-up (imports, first connect) is not idle
        cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = _cpu_seconds(proc.pid), time.monotonic()
        rss = _rss_mb(proc.pid)
        proc.terminate()
        proc.wait(30)
        return {
            "idle s": round(t1 - t0, 1),
            "CPU s": cpu1 - cpu0,
            "% of one core": 100 * (cpu1 - cpu0) / (t1 - t0),
            "RSS MiB": rss,
        }
    finally:
        broker.stop()


def run(idle_seconds: float = 60.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-agent-") as tmp:
        work = Path(tmp)
        rows = batcher_throughput(work / "batcher")
        print_table(f"local batcher, {REQUESTS} requests (goal >= 3x at 32 callers)", rows)
        idle: dict[str, Any] = {}
        if Path(MOSQUITTO).exists() or shutil.which("mosquitto"):
            idle = idle_footprint(work / "idle", idle_seconds)
            print_table("agent daemon idle footprint, beacons every 10 s (goal < 1% of one core)", [idle])
    write_result("agent_runtime", rows + ([idle] if idle else []), notes=json.dumps({"requests": REQUESTS}))
    return {"batcher": rows, "idle": idle}
