"""Fleet server at scale: a 10,000-device campaign in 5 waves, no soak.

The server runs as its own process (`tidegate server run`, as in production), the devices
are `SimulatedFleet` agents sharing one MQTT connection in this process, and both talk
through a private Mosquitto. Reported:

* devices/s completed (campaign start to completion, from the server's own record),
* status updates/s processed (UpdateJobExecution requests the server accepted, over the
  campaign and in its busiest second),
* p99 latency of `GET /api/v1/campaigns/{id}` polled during the run,
* the broker's own loopback rate in the same run (one QoS 1 publisher to one subscriber,
  through the same Mosquitto): the ceiling any MQTT service on this machine could reach.

Goal (issue 5): >= 2,000 status updates/s and the whole campaign in under 60 s.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import print_table, write_result
from fleet_server.broker import EmbeddedBroker
from fleet_server.sim.fleet import SimSettings, SimulatedFleet
from shared.net import free_port
from shared.procs import stop_process

WAVES = [int(p) for p in os.environ.get("TIDEGATE_BENCH_WAVES", "20,40,60,80,100").split(",")]


def broker_loopback(port: int, n: int = 50_000) -> float:
    """Messages/s from one QoS 1 publisher to one subscriber through the broker."""
    got = threading.Event()
    count = 0

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        nonlocal count
        count += 1
        if count == n:
            got.set()

    sub = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-sub", protocol=mqtt.MQTTv5
    )
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe("bench/loop/#", qos=1)
    sub.loop_start()
    pub = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5
    )
    pub.max_inflight_messages_set(1000)
    pub.max_queued_messages_set(0)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    time.sleep(0.3)
    body = json.dumps(
        {"status": "IN_PROGRESS", "statusDetails": {"step": "downloading"}, "expectedVersion": 2}
    )
    t0 = time.perf_counter()
    for i in range(n):
        pub.publish(f"bench/loop/thing-{i % 1000:04d}/update", body, qos=1)
    got.wait(120)
    rate = count / (time.perf_counter() - t0)
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()
    return rate


@contextmanager
def _fresh_database(url: str) -> Iterator[str]:
    """SQLite files are fresh already; on a PostgreSQL server, a new database for the run."""
    if url.startswith("sqlite"):
        yield url
        return
    from sqlalchemy import create_engine, make_url, text

    name = f"tidegate_bench_{os.getpid()}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _counters(api: httpx.Client) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in api.get("/metrics").raise_for_status().text.splitlines():
        if line.startswith("tidegate_") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


def _register(api: httpx.Client, n: int, sku: str) -> list[str]:
    """Register the simulated fleet through the API (POST /api/v1/devices/batch), as an
    operator's provisioning script would."""
    things = [f"sim-{i:06d}" for i in range(n)]
    for start in range(0, n, 10_000):
        chunk = [{"thing_name": t, "sku": sku} for t in things[start : start + 10_000]]
        api.post("/api/v1/devices/batch", json={"devices": chunk}).raise_for_status()
    return things


def start_campaign(
    api: httpx.Client, spec: dict[str, Any], why: str = "benchmark fleet: no bench report"
) -> str:
    """Create, submit and approve a campaign through the API (an override: no bench report);
    returns its id."""
    cid: str = api.post("/api/v1/campaigns", json=spec).raise_for_status().json()["id"]
    api.post(f"/api/v1/campaigns/{cid}/submit").raise_for_status()
    api.post(f"/api/v1/campaigns/{cid}/approve", json={"override_reason": why}).raise_for_status()
    return cid


def _tidegate(*args: str, env: dict[str, str]) -> str:
    exe = Path(sys.executable).with_name("tidegate")
    return subprocess.run([str(exe), *args], env=env, check=True, capture_output=True, text=True).stdout


@contextmanager
def server_process(
    work: Path, db_url: str, broker_port: int, *, tick_s: float = 1.0, env: dict[str, str] | None = None
) -> Iterator[httpx.Client]:
    """`tidegate server run` in its own process with an admin token made by the CLI; yields
    an authenticated API client once /readyz answers, and stops the server afterwards. `env`
    adds to (or overrides) the server's TIDEGATE_* settings (a TLS identity, a client id)."""
    with server_processes(work, db_url, broker_port, tick_s=tick_s, env=env) as apis:
        yield apis[0]


@contextmanager
def server_processes(
    work: Path,
    db_url: str,
    broker_port: int,
    *,
    tick_s: float = 1.0,
    replicas: int = 1,
    env: dict[str, str] | None = None,
    api_only: int = 0,
) -> Iterator[list[httpx.Client]]:
    """`replicas` fleet-server processes on one database (each its own MQTT client id), then
    `api_only` more with `--api-only` (PostgreSQL), one API client each, in that order, once
    every one is ready (its partitions leased)."""
    ports = [free_port() for _ in range(replicas + api_only)]
    base = {**os.environ, "TIDEGATE_DATABASE_URL": db_url, "TIDEGATE_MQTT_PORT": str(broker_port)}
    _tidegate("server", "migrate", env=base)
    token = _tidegate("server", "token", "create", "--role", "admin", "--name", "bench", env=base).strip()
    exe = str(Path(sys.executable).with_name("tidegate"))
    servers: list[subprocess.Popen[bytes]] = []
    apis: list[httpx.Client] = []
    try:
        for i, port in enumerate(ports):
            with (work / f"server-{i}.log").open("wb") as log:
                servers.append(
                    subprocess.Popen(
                        [exe, "server", "run", "--port", str(port), "--tick-s", str(tick_s)]
                        + (["--api-only"] if i >= replicas else []),
                        env={**base, "TIDEGATE_MQTT_CLIENT_ID": f"bench-server-{port}", **(env or {})},
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                    )
                )
            apis.append(
                httpx.Client(
                    base_url=f"http://127.0.0.1:{port}",
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=httpx.Timeout(60.0),
                )
            )
        deadline = time.monotonic() + 60
        for api, server in zip(apis, servers, strict=True):
            while True:
                try:
                    if api.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("a fleet server did not come up; see server-*.log")
                time.sleep(0.2)
        if replicas > 1:  # the partitions shared out before the campaign starts
            time.sleep(4.0)
        yield apis
    finally:
        for api in apis:
            api.close()
        for server in servers:
            stop_process(server, grace_s=30)


def campaign(work: Path, devices: int, db_url: str, broker_port: int, *, replicas: int = 1) -> dict[str, Any]:
    sku = "bench-sku"
    with server_processes(work, db_url, broker_port, tick_s=0.5, replicas=replicas) as apis:
        things = _register(apis[0], devices, sku)
        fleet = SimulatedFleet(things, SimSettings(port=broker_port, install_s=(0.05, 0.2), seed=1))
        try:
            return _campaign(apis, fleet, devices, sku)
        finally:
            fleet.stop()


def _summed(apis: list[httpx.Client]) -> dict[str, float]:
    total: Counter[str] = Counter()
    for api in apis:
        total.update(_counters(api))
    return dict(total)


def _campaign(apis: list[httpx.Client], fleet: SimulatedFleet, devices: int, sku: str) -> dict[str, Any]:
    api = apis[0]
    fleet.start()
    time.sleep(1.0)  # the server's bridge subscribed before the first devices ask
    spec = {
        "name": f"bench {devices}",
        "target": "bench-model-1.0.0.bundle",
        "repository": "http://127.0.0.1/repo",
        "cohort": {"sku": sku},
        "waves": [{"percent": p} for p in WAVES],
        "max_concurrent": devices,
        "rate": {"maximum_per_minute": 100_000},
    }
    cid = start_campaign(api, spec)
    before = _summed(apis)
    latencies: list[float] = []
    state = ""
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        s0 = time.perf_counter()
        body = api.get(f"/api/v1/campaigns/{cid}").raise_for_status().json()
        latencies.append(time.perf_counter() - s0)
        state = body["state"]
        if state not in ("scheduled", "running"):
            break
        time.sleep(0.2)
    wall = time.monotonic() - t0
    after = _summed(apis)
    requests = after["tidegate_jobs_requests_total"] - before["tidegate_jobs_requests_total"]
    busy = after["tidegate_jobs_busy_seconds_total"] - before["tidegate_jobs_busy_seconds_total"]
    batches = after["tidegate_jobs_batches_total"] - before["tidegate_jobs_batches_total"]
    if os.environ.get("TIDEGATE_BENCH_VERBOSE"):
        for d in api.get(f"/api/v1/campaigns/{cid}/decisions").json():
            print(d["at"], d["kind"], d["message"][:100])
    started = datetime.fromisoformat(body["started_at"])
    finished = datetime.fromisoformat(body["finished_at"]) if body["finished_at"] else None
    duration = (finished - started).total_seconds() if finished else float("nan")
    per_second = Counter(int(t) for t in fleet.update_accepted_at)
    first = min(per_second, default=0)
    series = [per_second.get(first + i, 0) for i in range(max(per_second, default=0) - first + 1)]
    best5 = max((sum(series[i : i + 5]) / 5 for i in range(max(1, len(series) - 4))), default=0.0)
    counts = Counter[str]()
    for w in body["waves"]:
        counts.update(w["counts"])
    latencies.sort()
    return {
        "devices": devices,
        "state": state,
        "succeeded": counts.get("SUCCEEDED", 0),
        "campaign_s": duration,
        "devices_per_s": counts.get("SUCCEEDED", 0) / duration if finished else 0.0,
        "updates_accepted": len(fleet.update_accepted_at),
        "updates_per_s": len(fleet.update_accepted_at) / duration if finished else 0.0,
        "updates_per_s_peak": max(per_second.values(), default=0),
        "updates_per_s_best5": best5,
        "requests_accepted": len(fleet.update_accepted_at) + fleet.stats.started,
        "server_requests": requests,
        "server_busy_s": busy,
        "server_requests_per_busy_s": requests / busy if busy else 0.0,
        "mean_batch": requests / batches if batches else 0.0,
        "api_p50_ms": statistics.median(latencies) * 1000,
        "api_p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "api_calls": len(latencies),
        "rejected": dict(fleet.stats.rejected),
        "wall_s": wall,
    }


def run(devices: int = 10_000) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-fleet-") as tmp:
        work = Path(tmp)
        with EmbeddedBroker(work / "broker") as broker:
            loop = broker_loopback(broker.port)
            dbs = {"sqlite": f"sqlite:///{work}/fleet.db"}
            if pg := os.environ.get("TIDEGATE_BENCH_PG_URL"):
                dbs["postgresql"] = pg
            runs = [(name, url, 1) for name, url in dbs.items()]
            if pg:  # the second replica: for availability on two cores, and what it costs
                runs.append(("postgresql, 2 replicas", pg, 2))
            for name, url, replicas in runs:
                with _fresh_database(url) as fresh:
                    r = campaign(work, devices, fresh, broker.port, replicas=replicas)
                rows.append(
                    {
                        "database": name,
                        "devices": r["devices"],
                        "state": r["state"],
                        "campaign_s": r["campaign_s"],
                        "devices/s": r["devices_per_s"],
                        "updates/s": r["updates_per_s"],
                        "updates/s best 5 s": r["updates_per_s_best5"],
                        "updates/s peak 1 s": r["updates_per_s_peak"],
                        "requests/busy s": r["server_requests_per_busy_s"],
                        "mean batch": r["mean_batch"],
                        "api p99 ms": r["api_p99_ms"],
                        "broker loopback msg/s": loop,
                        "updates/s vs loopback": r["updates_per_s"] / loop,
                        **{
                            k: r[k]
                            for k in (
                                "succeeded",
                                "updates_accepted",
                                "requests_accepted",
                                "server_requests",
                                "server_busy_s",
                                "api_p50_ms",
                                "api_calls",
                                "rejected",
                            )
                        },
                    }
                )
    hidden = (
        "rejected",
        "api_calls",
        "api_p50_ms",
        "updates_accepted",
        "requests_accepted",
        "succeeded",
        "server_requests",
        "server_busy_s",
        "updates/s vs loopback",
    )
    shown = [{k: v for k, v in row.items() if k not in hidden} for row in rows]
    print_table(f"Fleet campaign: {devices} simulated devices, 5 waves, no soak", shown)
    write_result(
        "fleet_campaign",
        rows,
        notes="server in its own process; simulator in the bench process; one private Mosquitto; "
        "goal >= 2000 updates/s and campaign < 60 s",
    )
    return rows


if __name__ == "__main__":
    run(int(os.environ.get("TIDEGATE_BENCH_DEVICES", "10000")))
