"""Gateway replicas as processes (issue 18): the same closed-loop load over HTTP through one
`tidegate serve` that is not replicated, through one replicated one, and through two
replicated ones with the callers alternating between them (sticky by key), each running a
10 % canary from the shared store on PostgreSQL. `bench/cloud_serving.py` measures the same
three in one process (the replication's cost on one interpreter); this is what replicas are
in production: processes, each with its own interpreter.

The load comes from a separate process speaking HTTP/1.1 keep-alive over raw sockets with
the requests encoded once, so the caller costs as little of the two cores as it can; it
shares them with the gateways all the same. Rounds interleave the three cases and each
figure is the median of its rounds, so a noisy minute on this shared machine lands on all.

    TIDEGATE_BENCH_PG_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test \\
        python -m bench.gateway_replicas [--seconds 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import print_table, write_result
from bench.fleet_campaign import _fresh_database
from builder.samples import make_mlp
from shared.net import free_port
from shared.procs import stop_process

FEATURES = 512
KEY, ADMIN = "bench-caller-key", "bench-admin-key"
CALLERS = 32


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _config(work: Path, model: Path, url: str | None, replica: str) -> Path:
    batching = "{ max_batch = 32, max_delay_us = 2000, max_queue = 100000, concurrency = 2 }"
    replication = (
        f'\n[gateway.replication]\nurl = "{url}"\nreplica_id = "{replica}"\nlease_s = 5\n' if url else ""
    )
    path = work / f"{replica}.toml"
    path.write_text(
        f"""
[gateway]
api_keys_sha256 = ["{_sha(KEY)}"]
admin_keys_sha256 = ["{_sha(ADMIN)}"]
failure_dir = "{work / "failures"}"
tick_s = 1.0
{replication}
[models.m]
production = "1"
timeout_ms = 60000
versions."1" = {{ path = "{model}", batching = {batching} }}
versions."2" = {{ path = "{model}", batching = {batching} }}
"""
    )
    return path


def _serve(config: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tidegate", "serve", "--config", str(config), "--port", str(port)],
            stdout=out,
            stderr=out,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    stop_process(proc, grace_s=5)
    raise RuntimeError(f"{config.name} did not become ready: {log.read_text()[-1500:]}")


def _start_canary(urls: list[str]) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    body = {
        "candidate": "2",
        "steps": [10, 100],
        "bake_s": 3600,
        "override_reason": "bench",
        "max_latency_increase": None,
        "max_error_increase": None,
    }
    r = httpx.post(urls[0] + "/v1/admin/models/m/canary", json=body, headers=admin, timeout=30)
    r.raise_for_status()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = [httpx.get(u + "/v1/admin/models/m", headers=admin, timeout=5).json() for u in urls]
        if all((s.get("canary") or {}).get("candidate") == "2" for s in states):
            return
        time.sleep(0.2)
    raise RuntimeError("a replica did not adopt the canary within 30 s")


def _requests(ports: list[int]) -> list[tuple[int, bytes]]:
    """One pre-encoded request per (caller key): the port its key alternates to, and the bytes."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(CALLERS * 8):
        key = f"caller-{i % CALLERS}-{i // CALLERS}"
        body = json.dumps({"inputs": rng.standard_normal(FEATURES).astype(np.float32).tolist(), "key": key})
        port = ports[zlib.crc32(key.encode()) % len(ports)]
        head = (
            f"POST /v1/models/m/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        out.append((port, head.encode() + body.encode()))
    return out


async def _caller(n: int, requests: list[tuple[int, bytes]], stop: float, done: list[int]) -> None:
    conns: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
    i = n
    while time.perf_counter() < stop:
        port, data = requests[i % len(requests)]
        if port not in conns:
            conns[port] = await asyncio.open_connection("127.0.0.1", port)
        reader, writer = conns[port]
        writer.write(data)
        status = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        if b" 200 " not in status:
            raise RuntimeError(f"the gateway answered {status!r}")
        done[0] += 1
        i += CALLERS
    for _, writer in conns.values():
        writer.close()


def _load(ports: list[int], seconds: float, out: Any) -> None:
    """The load generator's process: `CALLERS` closed-loop callers for `seconds`; req/s."""
    requests = _requests(ports)
    done = [0]

    async def main() -> float:
        t0 = time.perf_counter()
        stop = t0 + seconds
        await asyncio.gather(*(_caller(n, requests, stop, done) for n in range(CALLERS)))
        return done[0] / (time.perf_counter() - t0)

    out.put(asyncio.run(main()))


def _measure(ports: list[int], seconds: float) -> float:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_load, args=(ports, seconds, queue))
    proc.start()
    rate = float(queue.get(timeout=seconds + 120))
    proc.join(30)
    return rate


def _case(work: Path, model: Path, pg_url: str, replicas: int, seconds: float) -> float:
    with _fresh_database(pg_url) as url:
        procs: list[subprocess.Popen[bytes]] = []
        urls: list[str] = []
        try:
            for i in range(max(1, replicas)):
                config = _config(work, model, url if replicas else None, f"bench-{replicas}-{i}")
                proc, base = _serve(config, work / f"bench-{replicas}-{i}.log")
                procs.append(proc)
                urls.append(base)
            _start_canary(urls)
            _measure([int(u.rsplit(":", 1)[1]) for u in urls], 2.0)  # warm-up: connections, batchers
            return _measure([int(u.rsplit(":", 1)[1]) for u in urls], seconds)
        finally:
            for proc in procs:
                stop_process(proc, grace_s=10)


def run(pg_url: str, seconds: float = 8.0, rounds: int = 3) -> list[dict[str, Any]]:
    measured: dict[int, list[float]] = {0: [], 1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-gw-replicas-") as tmp:
        work = Path(tmp)
        model = make_mlp(work / "light.onnx", features=FEATURES, hidden=1024, layers=3, seed=0)
        for _ in range(rounds):
            for replicas in (0, 1, 2):
                measured[replicas].append(_case(work, model, pg_url, replicas, seconds))
    base = statistics.median(measured[0])
    rows = [
        {
            "case": f"MLP 512-1024x3 over HTTP: {CALLERS} callers, canary 10 %, {shape}",
            "baseline": "one `tidegate serve`, not replicated, its tick running",
            "baseline req/s": round(base, 1),
            "req/s": round(statistics.median(measured[n]), 1),
            "ratio": round(statistics.median(measured[n]) / base, 3),
            "rounds req/s": [round(v, 1) for v in measured[n]],
            "goal": ">= 0.9",
        }
        for n, shape in ((1, "one replicated process"), (2, "callers alternating between 2 replicas"))
    ]
    rows[0]["baseline rounds req/s"] = [round(v, 1) for v in measured[0]]
    print_table("gateway replicas as processes (store on PostgreSQL; the load from its own process)", rows)
    write_result(
        "gateway_replicas",
        rows,
        notes=f"medians of {rounds} interleaved rounds of {seconds:g} s; load generator in its own process",
    )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="gateway replicas as processes")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    url = os.environ.get("TIDEGATE_BENCH_PG_URL")
    if not url:
        raise SystemExit("set TIDEGATE_BENCH_PG_URL (a PostgreSQL server the bench may create databases on)")
    run(url, args.seconds, args.rounds)
