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

Then the same on the broker configuration `tidegate server ca broker-config` generates
(mutual TLS, the ACL, the guard plugin limiting each device's connection to 10 publishes a
second in bursts of 100), Mosquitto started from it as written: 300 devices, each on its own
certificate and connection (`SimTls`), the server on its service identity, no flood vs a
flood of `jobs/get` (1,000 and 5,000 a second) and of beacons (5,000). The guard refuses the flood at the
broker, so the server never reads it.

Reported: the campaign's duration from the server's own record, each run against the
baseline of its section, and what the flooder was sent back (accepted vs RequestThrottled).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
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
from fleet_server.sim.fleet import SimSettings, SimTls, SimulatedFleet
from tests.mqtt_helpers import generated_broker

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
TLS_DEVICES = 300  # a connection (and a network thread) each
TLS_RUNS = ((None, 0), ("get", 1000), ("get", 5000), ("beacon", 5000))
TLS_REPEATS = 3


def _run(
    work: Path,
    broker_port: int,
    *,
    flood: str | None,
    rate: int,
    limit: bool,
    devices: int = DEVICES,
    pki: Path | None = None,
    attempt: int = 0,
) -> dict[str, Any]:
    """One campaign, flooded or not; with `pki`, over the generated broker's mutual TLS."""
    os.environ.pop("TIDEGATE_JOBS_DEVICE_RATE_PER_S", None)
    if not limit:
        os.environ["TIDEGATE_JOBS_DEVICE_RATE_PER_S"] = "1e9"
    db = f"sqlite:///{work}/fleet-{flood}-{rate}-{int(limit)}-{int(pki is not None)}-{attempt}.db"
    env: dict[str, str] = {}
    tls_args: list[str] = []
    tls: SimTls | None = None
    if pki is not None:
        service = pki / "services" / "tidegate-fleet-server"
        env = {
            "TIDEGATE_MQTT_CLIENT_ID": "tidegate-fleet-server",  # the guard: the certificate's name
            "TIDEGATE_MQTT_CA_FILE": str(pki / "ca.pem"),
            "TIDEGATE_MQTT_CERT_FILE": f"{service}.pem",
            "TIDEGATE_MQTT_KEY_FILE": f"{service}.key",
        }
        tls_args = [str(pki / "ca.pem"), str(pki / "devices")]
        tls = SimTls(pki / "ca.pem", pki / "devices")
    try:
        with server_process(work, db, broker_port, tick_s=0.5, env=env) as api:
            things = [f"sim-{i:04d}" for i in range(devices)]
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
                        *tls_args,
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert flooder.stdout is not None and flooder.stdout.readline().strip() == "ready"
                time.sleep(2.0)  # the flood is on before the campaign starts
            fleet = SimulatedFleet(
                things, SimSettings(port=broker_port, install_s=(0.05, 0.2), seed=1, retry_s=10.0, tls=tls)
            )
            try:
                fleet.start()
                time.sleep(1.0)
                spec = {
                    "name": "flood bench",
                    "target": "bench-model-1.0.0.bundle",
                    "repository": "http://127.0.0.1/repo",
                    "cohort": {"sku": "bench"},
                    "waves": [{"percent": 100}],
                    "max_concurrent": devices,
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
        "broker": "generated (TLS, guard)" if pki is not None else "embedded",
        "devices": devices,
        "flood": f"{flood} {rate}/s" if flood else "none",
        "limit": "5/s, burst 50" if limit else "off",
        "state": body["state"],
        "campaign_s": (finished - started).total_seconds() if finished else float("nan"),
        "flood_sent": answers["sent"],
        "flood_accepted": answers["answered"],
        "flood_throttled": answers["codes"].count("RequestThrottled"),
        "others_retries": fleet.stats.retries,
    }


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-flood-") as tmp:
        work = Path(tmp)
        with EmbeddedBroker(work / "broker") as broker:
            for flood, rate, limit in RUNS:
                rows.append(_run(work, broker.port, flood=flood, rate=rate, limit=limit))
        things = [*(f"sim-{i:04d}" for i in range(TLS_DEVICES)), "flood-1"]
        pki, generated, port = generated_broker(things, work / "broker-tls.log")
        try:
            tls_rows = []
            for flood, rate in TLS_RUNS:  # campaigns of about a second: the median of three
                tries = [
                    _run(
                        work,
                        port,
                        flood=flood,
                        rate=rate,
                        limit=True,
                        devices=TLS_DEVICES,
                        pki=pki,
                        attempt=i,
                    )
                    for i in range(TLS_REPEATS)
                ]
                times = sorted(t["campaign_s"] for t in tries)
                row = tries[0] | {"campaign_s": statistics.median(times), "campaign_s_range": times}
                row["state"] = ",".join(sorted({t["state"] for t in tries}))
                row["others_retries"] = sum(t["others_retries"] for t in tries)
                tls_rows.append(row)
        finally:
            generated.terminate()
            generated.wait(10)
            shutil.rmtree(pki.parent, ignore_errors=True)
    for section in (rows, tls_rows):
        base = section[0]["campaign_s"]
        for r in section:
            r["vs no flood"] = r["campaign_s"] / base if base else float("nan")
    print_table(f"A flooding device vs a {DEVICES}-device campaign (embedded broker)", rows)
    print_table(f"The same vs {TLS_DEVICES} devices on the generated broker (TLS, guard)", tls_rows)
    rows += tls_rows
    write_result(
        "jobs_flood",
        rows,
        notes=f"server in its own process, {DEVICES} simulated devices on one connection (embedded "
        f"broker), then {TLS_DEVICES} on a connection and certificate each (generated broker), one "
        f"flooder process; ratios against the no-flood run of the same section (generated broker: "
        f"medians of {TLS_REPEATS}); gave up after {GIVE_UP_S} s",
    )
    return rows


if __name__ == "__main__":
    run()
