"""Cloud gateway benchmarks, each against a baseline measured in the same run.

1. Routing overhead: closed-loop throughput of 32 concurrent callers through
   `Gateway.infer` with a canary (10 %), then an A/B experiment (50/50), sticky per
   caller, against the same model's backend called directly (goal >= 0.9).
   1b. With TIDEGATE_BENCH_PG_URL: the same load through one replicated gateway, then
   through two replicas (callers alternating; both in this process, so one interpreter and
   these two cores: the cost of replication, not its capacity), the canary decided from the
   shared store, against one gateway that is not replicated, each with its tick running
   (goal >= 0.9).
2. Shadow cost to callers: p99 latency at a fixed offered load (open loop, about 30 % of
   this machine's capacity) with 100 % of traffic mirrored to a candidate, against no
   mirroring (goal <= 1.1), for a model that fits the CPU cache and one that does not (the
   mirror on the next core then competes for memory bandwidth, which no CPU priority
   arbitrates).
   2b. The same with the candidate on a shadow worker process (here on the same two cores),
   and with a sink that answers without inferring: the hand-off alone, as with the worker
   on another host (goal <= 1.1).
3. Dynamic batching: throughput at 32 concurrent callers with batches of up to 32,
   against batch-1 serving of the same model (goal >= 3).
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
import zlib
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import print_table, write_result
from builder.samples import make_mlp
from cloud_serving import shadow_worker
from cloud_serving.backends import OnnxBackend
from cloud_serving.canary import CanarySpec
from cloud_serving.config import ServingConfig
from cloud_serving.experiments import ExperimentSpec
from cloud_serving.gateway import Gateway
from cloud_serving.shadow import ShadowBudget
from shared.net import free_port

FEATURES = 512


def _config(model: Path, candidate: Path, *, max_batch: int = 32) -> ServingConfig:
    batching = {"max_batch": max_batch, "max_delay_us": 2000, "max_queue": 100_000, "concurrency": 2}
    return ServingConfig.model_validate(
        {
            "gateway": {"failure_dir": str(model.parent / "failures")},
            "models": {
                "m": {
                    "production": "1",
                    "timeout_ms": 60_000,
                    "versions": {
                        "1": {"path": str(model), "batching": batching},
                        "2": {"path": str(candidate), "batching": batching},
                    },
                }
            },
        }
    )


async def _closed_loop(call: Any, clients: int, seconds: float) -> float:
    x = np.random.default_rng(0).standard_normal((256, FEATURES)).astype(np.float32)
    done = 0
    stop = time.perf_counter() + seconds

    async def client(n: int) -> None:
        nonlocal done
        i = n
        while time.perf_counter() < stop:
            await call(x[i % 256], f"caller-{n}-{i % 50}")
            done += 1
            i += clients

    t0 = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return done / (time.perf_counter() - t0)


async def _open_loop(call: Any, rate: float, seconds: float) -> list[float]:
    """Requests at a fixed rate regardless of how fast they finish: the caller's latency."""
    x = np.random.default_rng(1).standard_normal((256, FEATURES)).astype(np.float32)
    latencies: list[float] = []

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        await call(x[i % 256], f"k{i % 1000}")
        latencies.append(time.perf_counter() - t0)

    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return latencies


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)] * 1000


async def _run(work: Path, seconds: float) -> list[dict[str, Any]]:
    light = make_mlp(work / "light.onnx", features=FEATURES, hidden=1024, layers=3, seed=0)
    model = make_mlp(work / "m1.onnx", features=FEATURES, hidden=2048, layers=4, seed=0)
    candidate = make_mlp(work / "m2.onnx", features=FEATURES, hidden=2048, layers=4, seed=1)
    rows: list[dict[str, Any]] = []

    # 1. routing overhead, for a light and a heavier model
    for label, m in (("MLP 512-1024x3, 2.6M MACs", light), ("MLP 512-2048x4, 13.6M MACs", model)):
        direct = OnnxBackend("1", m, max_batch=32, max_delay_us=2000, max_queue=100_000)
        await direct.start()
        base = await _closed_loop(lambda x, key: direct.infer(x), 32, seconds)  # noqa: B023
        await direct.stop()
        gw = await Gateway(_config(m, m), seed=0).start(tick=False)
        single = await _closed_loop(lambda x, key: gw.infer("m", x, key=key), 32, seconds)  # noqa: B023
        gw.start_canary("m", "2", CanarySpec(steps=(10, 100), bake_s=3600), override_reason="bench")
        routed = await _closed_loop(lambda x, key: gw.infer("m", x, key=key), 32, seconds)  # noqa: B023
        await gw.rollback("m", "bench")
        gw.start_experiment("m", ExperimentSpec(control="1", treatment="2", mde=0.05))
        ab = await _closed_loop(lambda x, key: gw.infer("m", x, key=key), 32, seconds)  # noqa: B023
        await gw.stop()
        for case, value in (
            ("gateway, one version", single),
            ("gateway, canary 10 % (2 versions loaded)", routed),
            ("gateway, A/B experiment 50/50 (2 versions)", ab),
        ):
            rows.append(
                {
                    "case": f"{label}: 32 callers, {case}",
                    "baseline": "the model's backend, no routing",
                    "baseline req/s": base,
                    "req/s": value,
                    "ratio": value / base,
                    "goal": ">= 0.9",
                }
            )

    # 1b. replicas (PostgreSQL only): the same total load through one replicated gateway and
    #     through two replicas of one (callers alternating), each running the canary from the
    #     shared store with its tick, leases and sample hand-off, against the direct backend.
    if pg_url := os.environ.get("TIDEGATE_BENCH_PG_URL"):
        rows += await _replica_rows(light, pg_url, seconds)

    # 2. shadow: caller p99 at a fixed offered load (about 30 % of capacity), alternating
    #    runs without and with the mirror (this machine is shared: noise comes in bursts),
    #    each mirrored run once the mirror has loaded its candidate.
    light_candidate = make_mlp(work / "light2.onnx", features=FEATURES, hidden=1024, layers=3, seed=1)
    capacity = {light: rows[0]["baseline req/s"], model: rows[3]["baseline req/s"]}
    for label, m, cand in (
        ("MLP 512-1024x3 (10 MB, fits the cache)", light, light_candidate),
        ("MLP 512-2048x4 (54 MB, memory-bound)", model, candidate),
    ):
        rate = max(50.0, capacity[m] * 0.3)
        gw = await Gateway(_config(m, cand), seed=0).start(tick=False)
        plain, mirrored, compared, _ = await _shadow_runs(gw, rate, seconds)
        await gw.stop()
        rows.append(
            _shadow_row(
                f"{label}: caller p99 at {rate:,.0f} req/s with 100 % shadow", rate, plain, mirrored, compared
            )
        )

    # 2b. shadow on a worker process (`tidegate serve shadow-worker`, here on the same two
    #     cores at SCHED_IDLE), and on a sink that answers without running the candidate:
    #     the hand-off alone, as with the worker on another host.
    rate = max(50.0, capacity[light] * 0.3)
    for label, target in (
        ("worker process on the same 2 cores", _worker),
        ("hand-off alone (a sink)", _sink),
    ):
        rows.append(await _remote_shadow_row(label, target, light, light_candidate, rate, seconds, 3))

    # 3. dynamic batching
    one = OnnxBackend("1", model, max_batch=1, max_delay_us=0, max_queue=100_000)
    await one.start()
    single = await _closed_loop(lambda x, key: one.infer(x), 32, seconds)
    await one.stop()
    batched_backend = OnnxBackend("1", model, max_batch=32, max_delay_us=2000, max_queue=100_000)
    await batched_backend.start()
    batched = await _closed_loop(lambda x, key: batched_backend.infer(x), 32, seconds)
    await batched_backend.stop()
    rows.append(
        {
            "case": "MLP 512-2048x4: 32 callers, dynamic batching (max 32, 2 ms)",
            "baseline": "batch-1 serving",
            "baseline req/s": single,
            "req/s": batched,
            "ratio": batched / single,
            "goal": ">= 3",
        }
    )
    return rows


async def _alternate(gateways: list[Gateway], x: Any, key: str) -> Any:
    return await gateways[zlib.crc32(key.encode()) % len(gateways)].infer("m", x, key=key)


async def _replica_rows(model: Path, pg_url: str, seconds: float) -> list[dict[str, Any]]:
    """The same closed loop through one gateway with its canary and tick (not replicated),
    then through one replicated gateway, then through two replicas, callers alternating."""
    from bench.fleet_campaign import _fresh_database

    measured: dict[int, float] = {}
    for replicas in (0, 1, 2):
        with _fresh_database(pg_url) as url:
            gateways = []
            for i in range(max(1, replicas)):
                raw = _config(model, model).model_dump()
                if replicas:
                    raw["gateway"]["replication"] = {"url": url, "replica_id": f"bench-{i}", "lease_s": 5}
                gateways.append(await Gateway(ServingConfig.model_validate(raw), seed=i).start())
            try:
                async with gateways[0].replicated():
                    gateways[0].start_canary(
                        "m", "2", CanarySpec(steps=(10, 100), bake_s=3600), override_reason="bench"
                    )
                deadline = time.monotonic() + 30
                while any(g.models["m"].weights != gateways[0].models["m"].weights for g in gateways):
                    if time.monotonic() > deadline:
                        raise RuntimeError("a replica did not adopt the canary within 30 s")
                    await asyncio.sleep(0.1)
                measured[replicas] = await _closed_loop(partial(_alternate, gateways), 32, seconds)
            finally:
                for g in gateways:
                    await g.stop()
    return [
        {
            "case": f"MLP 512-1024x3: 32 callers, canary 10 %, {shape} (store on PostgreSQL)",
            "baseline": "one gateway, not replicated, its tick running",
            "baseline req/s": measured[0],
            "req/s": measured[n],
            "ratio": measured[n] / measured[0],
            "goal": ">= 0.9",
        }
        for n, shape in ((1, "one replicated gateway"), (2, "callers alternating between 2 replicas"))
    ]


ShadowRuns = tuple[list[list[float]], list[list[float]], int, int]


async def _shadow_runs(gw: Gateway, rate: float, seconds: float, rounds: int = 3) -> ShadowRuns:
    """Caller latencies without and with a 100 % shadow, per round, alternating `rounds`
    times (this machine is shared: noise comes in bursts), each mirrored run once the mirror
    is ready; the samples compared and dropped."""
    await _open_loop(lambda x, key: gw.infer("m", x, key=key), rate, 1.0)  # warm-up
    plain: list[list[float]] = []
    mirrored: list[list[float]] = []
    compared = dropped = 0
    for _ in range(rounds):
        plain.append(await _open_loop(lambda x, key: gw.infer("m", x, key=key), rate, seconds))
        budget = ShadowBudget(max_diff_rate=1.0, min_samples=10**9)
        gw.start_shadow("m", "2", share=1.0, budget=budget, queue_max=4096)
        shadow = gw.model("m").shadow
        assert shadow is not None
        await asyncio.to_thread(shadow.ready.wait, 60)
        mirrored.append(await _open_loop(lambda x, key: gw.infer("m", x, key=key), rate, seconds))
        compared += (await gw.stop_shadow("m"))["compared"]
        dropped += shadow.stats.dropped
    return plain, mirrored, compared, dropped


def _shadow_row(
    case: str, rate: float, plain: list[list[float]], mirrored: list[list[float]], compared: int
) -> dict[str, Any]:
    """The pooled p99s, and the median of each round's ratio to the plain run beside it (a
    burst of noise lands on one pair, not on the figure)."""
    pooled_plain = [v for r in plain for v in r]
    pooled_mirrored = [v for r in mirrored for v in r]
    per_round = [_p99(m) / _p99(p) for p, m in zip(plain, mirrored, strict=True)]
    return {
        "case": f"{case} (compared {compared})",
        "baseline": "no shadow",
        "baseline req/s": rate,
        "req/s": rate,
        "ratio": _p99(pooled_mirrored) / _p99(pooled_plain),
        "median round ratio": statistics.median(per_round),
        "round ratios": [round(r, 2) for r in per_round],
        "goal": "<= 1.1",
        "baseline p99 ms": _p99(pooled_plain),
        "p99 ms": _p99(pooled_mirrored),
    }


async def _remote_shadow_row(
    label: str, target: Any, model: Path, candidate: Path, rate: float, seconds: float, rounds: int
) -> dict[str, Any]:
    """Caller p99 without and with a 100 % shadow sent to `target` (a worker or a sink)."""
    port = free_port()
    proc = target(port)
    try:
        cfg = _config(model, candidate)
        cfg.gateway.shadow_worker = f"127.0.0.1:{port}"
        gw = await Gateway(cfg, seed=0).start(tick=False)
        plain, mirrored, compared, dropped = await _shadow_runs(gw, rate, seconds, rounds)
        await gw.stop()
    finally:
        proc.terminate()
        proc.join(10)
    case = f"MLP 512-1024x3: caller p99 at {rate:,.0f} req/s, 100 % shadow to a {label}, dropped {dropped}"
    return _shadow_row(case, rate, plain, mirrored, compared)


def shadow_handoff(seconds: float = 10.0, rounds: int = 7, rate: float | None = None) -> list[dict[str, Any]]:
    """The hand-off alone (a sink that answers without running the candidate: what a worker
    on another host costs the gateway), longer and in more rounds than `make bench` runs it."""
    os.environ.setdefault(shadow_worker.AUTHKEY_ENV, BENCH_KEY)

    async def go(work: Path) -> list[dict[str, Any]]:
        light = make_mlp(work / "light.onnx", features=FEATURES, hidden=1024, layers=3, seed=0)
        cand = make_mlp(work / "light2.onnx", features=FEATURES, hidden=1024, layers=3, seed=1)
        direct = OnnxBackend("1", light, max_batch=32, max_delay_us=2000, max_queue=100_000)
        await direct.start()
        capacity = await _closed_loop(lambda x, key: direct.infer(x), 32, 3.0)
        await direct.stop()
        offered = rate if rate is not None else max(50.0, capacity * 0.3)
        sink = "hand-off alone (a sink)"
        row = await _remote_shadow_row(sink, _sink, light, cand, offered, seconds, rounds)
        return [row]

    with tempfile.TemporaryDirectory(prefix="tidegate-bench-handoff-") as tmp:
        rows = asyncio.run(go(Path(tmp)))
    print_table(f"shadow hand-off, {rounds} rounds of {seconds:g} s each way", rows)
    write_result("shadow_handoff", rows, notes=f"{rounds} alternating rounds of {seconds:g} s")
    return rows


BENCH_KEY = "tidegate-bench-shadow-key-0123456789"


def _worker(port: int) -> Any:
    """`tidegate serve shadow-worker`'s own loop, in a process of its own."""
    proc = multiprocessing.get_context("spawn").Process(
        target=shadow_worker.serve, args=("127.0.0.1", port, BENCH_KEY.encode()), daemon=True
    )
    proc.start()
    _wait_port(port)
    return proc


def _sink_loop(port: int) -> None:
    from multiprocessing.connection import Listener

    from cloud_serving.diffs import TaskSpec
    from cloud_serving.shadow import ShadowStats

    with Listener(("127.0.0.1", port), authkey=BENCH_KEY.encode()) as listener:
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError):  # the readiness probe's bare connect
                continue
            conn.recv()  # the candidate: not run
            kpis = ShadowStats(TaskSpec()).kpis()
            done = 0
            conn.send((done, kpis, []))
            while (packed := conn.recv()) is not None:
                done += len(packed[2]) if isinstance(packed, tuple) else len(packed)
                if not conn.poll(0):
                    conn.send((done, kpis, []))
            conn.send((done, kpis, []))
            conn.close()


def _sink(port: int) -> Any:
    proc = multiprocessing.get_context("spawn").Process(target=_sink_loop, args=(port,), daemon=True)
    proc.start()
    _wait_port(port)
    return proc


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def run(seconds: float = 5.0) -> list[dict[str, Any]]:
    os.environ.setdefault(shadow_worker.AUTHKEY_ENV, BENCH_KEY)
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-serving-") as tmp:
        rows = asyncio.run(_run(Path(tmp), seconds))
    print_table("cloud gateway (single-threaded ONNX Runtime per batch, one pool of 2 threads)", rows)
    write_result(
        "cloud_serving", rows, notes="in-process; each ratio against a baseline measured in the same run"
    )
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["handoff"]:  # [RATE]: requests per second (default 30 % of capacity)
        shadow_handoff(rate=float(sys.argv[2]) if len(sys.argv) > 2 else None)
    else:
        run()
