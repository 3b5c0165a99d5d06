"""The documented fleet-scale run (docs/SCALING.md): 50,000 simulated devices through one
campaign on one machine, as an operator would run it.

* the fleet server as its own process (`tidegate server run`), on PostgreSQL when
  `TIDEGATE_BENCH_PG_URL` is set (a fresh database), else SQLite; a private Mosquitto;
* the devices registered through the API (`POST /api/v1/devices/batch`, 5,000 per call) and
  run by `tidegate sim`'s engine: 2 % fail their install (retried once after a backoff, and
  fail again), 10 % report unmet preconditions and wait; every 15 s the waiting ones meet
  them (a car parks, a battery charges) and install, so a wave waits up to 15 s for them;
* four waves (1 %, 10 %, 50 %, 100 %) with a rate ramp: 1,000/min at first, doubling every
  500 successes, capped at 60,000/min; success gate 95 %, error gate 5 %;
* measured: registration rate, the time each wave started, the campaign's duration,
  completed devices per second, status updates per second, the server's CPU seconds and
  resident memory (its own /metrics), the campaign GET's latency while it runs, on the full
  server and (PostgreSQL) on an API-only replica (`server run --api-only`) beside it, timed
  once a second each from a prober process of its own (not the simulator's).

    TIDEGATE_BENCH_PG_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test \\
        python -m bench.fleet_scale --devices 50000
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import print_table, write_result
from bench.fleet_campaign import _counters, _fresh_database, server_processes, start_campaign
from fleet_server.broker import EmbeddedBroker
from fleet_server.sim.fleet import SimSettings, SimulatedFleet

SKU = "scale-sku"
CHARGE_EVERY_S = 15.0


def run_scale(work: Path, devices: int, db_url: str, broker_port: int) -> dict[str, Any]:
    things = [f"scale-{i:06d}" for i in range(devices)]
    fleet = SimulatedFleet(
        things,
        # Requests unanswered for 10 s are sent again, as the agent's jobs client times out
        # (agent.jobs): the simulator's 3 s default, meant for replica failover tests, turned
        # a busy server's queue at 100,000 devices into a storm of duplicates.
        SimSettings(
            port=broker_port, install_s=(0.5, 3.0), fail_rate=0.02, unmet_rate=0.10, seed=50, retry_s=10.0
        ),
    )
    # On PostgreSQL an API-only replica too: the campaign's GET is timed on both, the full
    # server (its requests wait for an interpreter shared with the jobs bridge and the
    # scheduler) and one that serves only the API.
    api_only = 1 if db_url.startswith("postgresql") else 0
    with server_processes(work, db_url, broker_port, api_only=api_only) as apis:
        try:
            return _run(apis[0], fleet, things, apis[1] if api_only else None)
        finally:
            fleet.stop()


def _probe(urls: list[str], headers: dict[str, str], stop: Any, out: Any) -> None:
    """Time `GET url` on each URL once a second until `stop` is set; the latencies (s) per URL
    into `out`. A process of its own, as an operator's browser is: timed from the bench
    process, a request also waited for the interpreter of the simulator's 100,000 devices."""
    latencies: list[list[float]] = [[] for _ in urls]
    with httpx.Client(headers=headers, timeout=30) as client:
        while not stop.is_set():
            for i, url in enumerate(urls):
                s0 = time.perf_counter()
                try:
                    client.get(url).raise_for_status().json()
                except httpx.HTTPError:
                    latencies[i].append(30.0)  # counted as the timeout: a failure is not fast
                    continue
                latencies[i].append(time.perf_counter() - s0)
            stop.wait(1.0)
    out.put(latencies)


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds (nan for none)."""
    if not latencies:
        return float("nan"), float("nan")
    ordered = sorted(latencies)
    return statistics.median(ordered) * 1000, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


def _run(
    api: httpx.Client, fleet: SimulatedFleet, things: list[str], api_only: httpx.Client | None
) -> dict[str, Any]:
    devices = len(things)
    t0 = time.perf_counter()
    for i in range(0, devices, 5000):
        batch = [
            {"thing_name": t, "sku": SKU, "region": "eu" if j % 2 else "us"}
            for j, t in enumerate(things[i : i + 5000])
        ]
        api.post("/api/v1/devices/batch", json={"devices": batch}).raise_for_status()
    register_s = time.perf_counter() - t0
    fleet.start()
    requests = _counters(api).get("tidegate_jobs_requests_total", 0)
    fleet.poll_all()
    deadline = time.monotonic() + 900  # the fleet's first polls answered before the campaign starts
    while _counters(api).get("tidegate_jobs_requests_total", 0) < requests + devices:
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not answer the fleet's first polls within 900 s")
        time.sleep(1.0)
    spec = {
        "name": f"scale {devices}",
        "target": "classifier/1.0.0/scale-sku.bundle",
        "repository": "https://updates.example.com/repo",
        "cohort": {"sku": SKU},
        "waves": [{"percent": 1}, {"percent": 10}, {"percent": 50}, {"percent": 100}],
        "max_concurrent": 20_000,
        "rate": {
            "base_rate_per_minute": 1000,
            "increment_factor": 2,
            "increase_after_succeeded": 500,
            "maximum_per_minute": 60_000,
        },
        "success_gate": {
            "conditions": [
                {"metric": "success_rate", "comparator": ">=", "threshold": 0.95, "min_samples": 50}
            ]
        },
        "retry": {"criteria": [{"failure_type": "FAILED", "retries": 1}], "backoff_s": 5},
        "preconditions": {"min_battery_pct": 30},
    }
    cid = start_campaign(api, spec, "simulated fleet: no bench report")
    before = _counters(api)
    ctx = multiprocessing.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    urls = [f"{c.base_url}/api/v1/campaigns/{cid}" for c in (api, *([api_only] if api_only else []))]
    prober = ctx.Process(target=_probe, args=(urls, dict(api.headers), stop, out), daemon=True)
    prober.start()
    charged = 0
    last_charge = time.monotonic()
    t0 = time.monotonic()
    body: dict[str, Any] = {}
    while time.monotonic() - t0 < 3600:
        body = api.get(f"/api/v1/campaigns/{cid}").raise_for_status().json()
        if body["state"] not in ("scheduled", "running"):
            break
        # The devices waiting on their preconditions meet them every CHARGE_EVERY_S (cars park).
        if fleet.stats.waiting and time.monotonic() - last_charge >= CHARGE_EVERY_S:
            charged += fleet.satisfy()
            last_charge = time.monotonic()
        time.sleep(1.0)
    stop.set()
    timed: list[list[float]] = out.get(timeout=60)
    prober.join(10)
    latencies, api_only_latencies = timed[0], (timed[1] if len(timed) > 1 else [])
    after = _counters(api)
    decisions = api.get(f"/api/v1/campaigns/{cid}/decisions").json()
    started = datetime.fromisoformat(body["started_at"])
    finished = datetime.fromisoformat(body["finished_at"]) if body.get("finished_at") else None
    waves_at = {
        d["message"].split("starting wave ")[1]: (datetime.fromisoformat(d["at"]) - started).total_seconds()
        for d in decisions
        if d["kind"] == "advanced" and "starting wave " in d["message"]
    }
    counts = Counter[str]()
    for w in body["waves"]:
        counts.update(w["counts"])
    duration = (finished - started).total_seconds() if finished else float("nan")
    per_second = Counter(int(t) for t in fleet.update_accepted_at)
    p50, p99 = _percentiles(latencies)
    api_p50, api_p99 = _percentiles(api_only_latencies)
    return {
        "devices": devices,
        "state": body["state"],
        "register_s": register_s,
        "registered_per_s": devices / register_s,
        "campaign_s": duration,
        "wave_started_s": {"1": 0.0, **waves_at},
        "waited_on_preconditions": charged,
        "counts": dict(counts),
        "retry_rounds": sum(1 for d in decisions if d["kind"] == "retried"),
        "devices_per_s": (counts.get("SUCCEEDED", 0) + counts.get("FAILED", 0)) / duration
        if finished
        else 0.0,
        "updates_accepted": len(fleet.update_accepted_at),
        "updates_per_s": len(fleet.update_accepted_at) / duration if finished else 0.0,
        "updates_per_s_peak": max(per_second.values(), default=0),
        "server_cpu_s": after.get("tidegate_process_cpu_seconds_total", 0)
        - before.get("tidegate_process_cpu_seconds_total", 0),
        "server_rss_mb": after.get("tidegate_process_resident_memory_bytes", 0) / 2**20,
        "server_busy_s": after["tidegate_jobs_busy_seconds_total"]
        - before["tidegate_jobs_busy_seconds_total"],
        "api_p50_ms": p50,
        "api_p99_ms": p99,
        "api_only_p50_ms": api_p50,
        "api_only_p99_ms": api_p99,
        "requests_handled": (
            handled := after.get("tidegate_jobs_requests_total", 0)
            - before.get("tidegate_jobs_requests_total", 0)
        ),
        "requests_per_device": handled / devices,
        "sim_retries": fleet.stats.retries,
        "holds": sum(1 for d in decisions if d["kind"] == "held"),
        "rejected": dict(fleet.stats.rejected),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--devices",
        default="50000",
        help="fleet sizes, comma-separated (e.g. 10000,100000): each its own server, database and "
        "campaign, one after the other in this run, and the larger's time as a multiple of the first's",
    )
    args = parser.parse_args()
    sizes = [int(n) for n in str(args.devices).split(",")]
    rows: list[dict[str, Any]] = []
    for devices in sizes:
        with tempfile.TemporaryDirectory(prefix="tidegate-scale-") as tmp:
            work = Path(tmp)
            url = os.environ.get("TIDEGATE_BENCH_PG_URL") or f"sqlite:///{work}/fleet.db"
            with EmbeddedBroker(work / "broker") as broker, _fresh_database(url) as fresh:
                r = {"database": url.split(":", 1)[0], **run_scale(work, devices, fresh, broker.port)}
            log = work / "broker" / "mosquitto.log"  # messages the broker dropped (queue bounds)
            r["broker_drop_notices"] = sum("dropped" in line for line in log.open()) if log.exists() else 0
        r["campaign_s_ratio"] = r["campaign_s"] / rows[0]["campaign_s"] if rows else 1.0
        r["size_ratio"] = devices / sizes[0]
        rows.append(r)
        print("waves started at (s):", r["wave_started_s"])
        print("final counts:", r["counts"], "rejected:", r["rejected"])
    shown = [{k: v for k, v in r.items() if k not in ("rejected", "wave_started_s", "counts")} for r in rows]
    print_table(f"Fleet at scale: {', '.join(str(n) for n in sizes)} simulated devices", shown)
    write_result(
        "fleet_scale",
        rows,
        notes="server in its own process; simulator in the bench process; one Mosquitto; "
        "campaign_s_ratio: each size's campaign time over the first size's, same run",
    )


if __name__ == "__main__":
    main()
