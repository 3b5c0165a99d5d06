"""One flooding device against a campaign: what it costs the others.

The fleet server runs as its own process (`tidegate server run`), 1,000 `SimulatedFleet`
devices run a one-wave campaign, and one more device (`fleet_server.sim.flood`, its own
process) sends 1,000 or 5,000 messages a second for the whole campaign: `jobs/get` requests,
or valid health beacons (which the server would store). All runs in one go, same machine,
same broker: no flood (the baseline), then each flood with the bridge's per-device limit
(the default: 5 a second, bursts of 50) and, at 5,000 a second, with it lifted
(TIDEGATE_JOBS_DEVICE_RATE_PER_S=1e9), to show what the limit saves. On a 2-core machine the
flooder, the broker and the server share the cores: what remains with the limit on is the
cost of carrying and reading the flood, which only a broker-side per-client limit removes.

Reported: the campaign's duration from the server's own record, each run against the
baseline, and what the flooder was sent back (accepted vs RequestThrottled).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import print_table, write_result
from bench.fleet_campaign import server_process, start_campaign
from fleet_server.broker import EmbeddedBroker
from fleet_server.sim.fleet import SimSettings, SimulatedFleet

DEVICES = 1000
GIVE_UP_S = 90  # a campaign not complete by then is reported as such
RUNS = (  # (what the flooder sends, how many a second, the bridge's limit on)
    (None, 0, True),
    ("get", 1000, True),
    ("get", 5000, True),
    ("get", 5000, False),
    ("beacon", 1000, True),
    ("beacon", 5000, True),
    ("beacon", 5000, False),
)


def _run(work: Path, broker_port: int, *, flood: str | None, rate: int, limit: bool) -> dict[str, Any]:
    os.environ.pop("TIDEGATE_JOBS_DEVICE_RATE_PER_S", None)
    if not limit:
        os.environ["TIDEGATE_JOBS_DEVICE_RATE_PER_S"] = "1e9"
    db = f"sqlite:///{work}/fleet-{flood}-{rate}-{int(limit)}.db"
    try:
        with server_process(work, db, broker_port, tick_s=0.5) as api:
            things = [f"sim-{i:04d}" for i in range(DEVICES)]
            api.post(
                "/api/v1/devices/batch",
                json={
                    "devices": [
                        *({"thing_name": t, "sku": "bench"} for t in things),
                        {"thing_name": "flood-1", "sku": "elsewhere"},
                    ]
                },
            ).raise_for_status()
            flooder = None
            if flood:
                flooder = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fleet_server.sim.flood",
                        str(broker_port),
                        str(rate),
                        "flood-1",
                        flood,
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert flooder.stdout is not None and flooder.stdout.readline().strip() == "ready"
                time.sleep(2.0)  # the flood is on before the campaign starts
            fleet = SimulatedFleet(things, SimSettings(port=broker_port, install_s=(0.05, 0.2), seed=1))
            fleet.start()
            try:
                time.sleep(1.0)
                spec = {
                    "name": "flood bench",
                    "target": "bench-model-1.0.0.bundle",
                    "repository": "http://127.0.0.1/repo",
                    "cohort": {"sku": "bench"},
                    "waves": [{"percent": 100}],
                    "max_concurrent": DEVICES,
                    "rate": {"maximum_per_minute": 100_000},
                }
                cid = start_campaign(api, spec)
                deadline = time.monotonic() + GIVE_UP_S
                while time.monotonic() < deadline:
                    body = api.get(f"/api/v1/campaigns/{cid}").raise_for_status().json()
                    if body["state"] not in ("scheduled", "running"):
                        break
                    time.sleep(0.2)
            finally:
                fleet.stop()
                answers: dict[str, Any] = {"sent": 0, "answered": 0, "codes": []}
                if flooder is not None:
                    flooder.terminate()
                    out, _ = flooder.communicate(timeout=30)
                    answers = json.loads(out.strip().splitlines()[-1])
    finally:
        os.environ.pop("TIDEGATE_JOBS_DEVICE_RATE_PER_S", None)
    started = datetime.fromisoformat(body["started_at"])
    finished = datetime.fromisoformat(body["finished_at"]) if body["finished_at"] else None
    return {
        "flood": f"{flood} {rate}/s" if flood else "none",
        "limit": "5/s, burst 50" if limit else "off",
        "state": body["state"],
        "campaign_s": (finished - started).total_seconds() if finished else float("nan"),
        "flood_sent": answers["sent"],
        "flood_accepted": answers["answered"],
        "flood_throttled": answers["codes"].count("RequestThrottled"),
    }


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-flood-") as tmp:
        work = Path(tmp)
        with EmbeddedBroker(work / "broker") as broker:
            for flood, rate, limit in RUNS:
                rows.append(_run(work, broker.port, flood=flood, rate=rate, limit=limit))
    base = rows[0]["campaign_s"]
    for r in rows:
        r["vs no flood"] = r["campaign_s"] / base if base else float("nan")
    print_table(f"A flooding device vs a {DEVICES}-device campaign", rows)
    write_result(
        "jobs_flood",
        rows,
        notes=f"server in its own process, {DEVICES} simulated devices, one flooder process; "
        f"ratios against the no-flood run of the same invocation; gave up after {GIVE_UP_S} s",
    )
    return rows


if __name__ == "__main__":
    run()
