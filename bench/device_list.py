"""The device list at fleet scale: GET /api/v1/devices with the filters operators use, over
100,000 registered devices, on PostgreSQL (TIDEGATE_BENCH_PG_URL) and SQLite.

The API runs in this process (FastAPI's test client: the route, the query, the JSON; no
network), each database fresh. Queries mix the filters (region, SKU, active version, firmware,
a name fragment) with cursor pages deep into the fleet. Reported: p50 and p99 latency per
database and the SQLite/PostgreSQL ratio of the same run. Goal (issue 19): p99 <= 100 ms on
PostgreSQL.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from bench.common import print_table, write_result
from bench.fleet_campaign import _fresh_database
from fleet_server.app import create_app
from fleet_server.auth.service import Role, create_token
from fleet_server.db import Database
from fleet_server.devices.service import register_devices
from fleet_server.migrate import upgrade

DEVICES = int(os.environ.get("TIDEGATE_BENCH_DEVICES", "100000"))
QUERIES = 300
REGIONS = ["eu-west", "eu-central", "us-east", "us-west", "ap-south", "ap-east"]
SKUS = ["edge-cpu", "edge-gpu", "edge-npu"]


def _fill(db: Database, n: int) -> None:
    now = datetime.now(UTC)
    rng = random.Random(7)
    for start in range(0, n, 5000):
        batch = [
            {
                "thing_name": f"veh-{i:07d}",
                "sku": SKUS[i % len(SKUS)],
                "region": REGIONS[i % len(REGIONS)],
                "firmware": f"4.{rng.randrange(4)}.0",
            }
            for i in range(start, min(n, start + 5000))
        ]
        with db.session() as s:
            register_devices(s, batch, now=now)


def _queries(n: int, rng: random.Random) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(QUERIES):
        kind = i % 5
        if kind == 0:
            out.append({"region": rng.choice(REGIONS), "limit": 100})
        elif kind == 1:
            out.append({"sku": rng.choice(SKUS), "region": rng.choice(REGIONS), "limit": 100})
        elif kind == 2:
            out.append({"firmware": f"4.{rng.randrange(4)}.0", "limit": 100})
        elif kind == 3:
            out.append({"name": f"{rng.randrange(n):07d}"[:5], "limit": 100})
        else:  # a cursor page deep into the fleet
            out.append({"after": f"veh-{rng.randrange(n):07d}", "region": rng.choice(REGIONS), "limit": 100})
    return out


def measure(url: str, n: int) -> dict[str, Any]:
    db = Database(url)
    upgrade(db)
    t0 = time.perf_counter()
    _fill(db, n)
    fill_s = time.perf_counter() - t0
    with db.session() as s:
        token = create_token(s, name="bench", role=Role.VIEWER, now=datetime.now(UTC))
    client = TestClient(create_app(db))
    h = {"Authorization": f"Bearer {token}"}
    rng = random.Random(11)
    for q in _queries(n, rng)[:20]:  # warm the plan cache and the pool
        client.get("/api/v1/devices", params=q, headers=h).raise_for_status()
    times = []
    for q in _queries(n, rng):
        s0 = time.perf_counter()
        client.get("/api/v1/devices", params=q, headers=h).raise_for_status()
        times.append((time.perf_counter() - s0) * 1000)
    db.engine.dispose()
    times.sort()
    return {
        "devices": n,
        "p50_ms": statistics.median(times),
        "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))],
        "queries": len(times),
        "fill_s": fill_s,
    }


def run(n: int = DEVICES) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-devices-") as tmp:
        urls = {"sqlite": f"sqlite:///{Path(tmp) / 'fleet.db'}"}
        if pg := os.environ.get("TIDEGATE_BENCH_PG_URL"):
            urls["postgresql"] = pg
        for name, url in urls.items():
            with _fresh_database(url) as fresh:
                rows.append({"database": name, **measure(fresh, n)})
    if len(rows) == 2:
        for r in rows:
            r["p99 vs postgresql"] = r["p99_ms"] / rows[1]["p99_ms"]
    print_table(f"GET /api/v1/devices with filters, {n} devices", rows)
    write_result(
        "device_list",
        rows,
        notes="in-process API (test client), fresh databases, mixed filters and deep cursor pages; "
        "goal p99 <= 100 ms on PostgreSQL",
    )
    return rows


if __name__ == "__main__":
    run()
