"""The fleet part of `tidegate demo`: the fleet server (API, jobs over MQTT, scheduler) on an
embedded Mosquitto drives three real agent daemons through a gated campaign."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from agent.config import AgentConfig
from agent.device import DeviceConfig, DeviceRoot
from agent.runtime import AgentDaemon
from fleet_server.auth.service import Role, create_token
from fleet_server.broker import EmbeddedBroker
from fleet_server.db import Database
from fleet_server.jobs.models import JobExecution
from fleet_server.migrate import upgrade
from fleet_server.server import FleetServer
from fleet_server.settings import Settings
from shared.trust import UpdateRepository

Say = Callable[[str, str], None]


class _Daemon:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.daemon: AgentDaemon | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def go() -> None:
            self.loop = asyncio.get_running_loop()
            daemon = self.daemon = AgentDaemon(self.cfg)
            self.ready.set()
            await daemon.run()

        asyncio.run(go())

    def start(self) -> _Daemon:
        self.thread.start()
        self.ready.wait(30)
        return self

    def stop(self) -> None:
        if self.loop is not None and self.daemon is not None:
            self.loop.call_soon_threadsafe(self.daemon.stop)
        self.thread.join(10)


def _vehicle(path: Path, parked: bool) -> None:
    path.write_text(
        json.dumps(
            {
                "battery_pct": 80,
                "parked": parked,
                "ignition": "off" if parked else "on",
                "network": "wifi",
                "updated_at": datetime.now(UTC).isoformat(),
            }
        )
    )


def _bench(workdir: Path, repo: UpdateRepository, bundle: Path, http: httpx.Client, say: Say) -> None:
    """The HIL bench on this machine (the local target, a simulated thermal zone), its reports
    written and the verdict attached to the release: the gate campaigns then pass."""
    from hil import runner
    from hil.report import attach, write_all
    from hil.targets import LocalTarget

    target = LocalTarget()
    options = {
        "repo": str(repo.dir),
        "sku": "edge-cpu-x86",
        "latency": {"runs": 100},
        "thermal": {"soak_s": 6.0},
    }
    report, manifest = runner.start(bundle, target, "full", options)
    asyncio.run(runner.run(report, manifest, bundle, target))
    write_all(report, workdir / "hil-report")
    for r in report.results:
        say("hil", f"{r.name}: {r.status}: {r.reason}")
    attached = attach(http, report.to_json())
    say(
        "hil",
        f"bench report {attached['id']} ({'passing' if report.passed else 'failing'}) attached to "
        f"{manifest.name} {manifest.version} for edge-cpu-x86; HTML at {workdir / 'hil-report'}/report.html",
    )


def run_fleet(
    workdir: Path, repo: UpdateRepository, bundle: Path, say: Say, *, keep_running: bool = False
) -> None:
    fleet = workdir / "fleet"
    fleet.mkdir()
    with EmbeddedBroker(fleet / "broker") as broker:
        db = Database(f"sqlite:///{fleet / 'fleet.db'}")
        upgrade(db)
        with db.session() as s:
            token = create_token(s, name="demo-admin", role=Role.ADMIN, now=datetime.now(UTC))
        settings = Settings(
            database_url=db.url, mqtt_port=broker.port, repository_dir=repo.dir, sweep_interval_s=1
        )
        port = broker.port + 1 if broker.port < 65000 else broker.port - 1
        server = FleetServer(db, settings, host="127.0.0.1", port=port, tick_s=0.5)
        server.start_in_thread()
        url = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        say(
            "fleet", f"fleet server up: API and dashboard at {url}/#token=… , Mosquitto on port {broker.port}"
        )
        release = http.post("/api/v1/releases", content=bundle.read_bytes()).json()
        say("fleet", f"registered release {release['name']} {release['version']} ({release['stage']})")
        _bench(workdir, repo, bundle, http, say)
        daemons: list[_Daemon] = []
        try:
            for i, name in enumerate(("vehicle-a", "vehicle-b", "vehicle-c")):
                root = fleet / name
                DeviceRoot.provision(
                    root,
                    DeviceConfig(device_id=name, sku="edge-cpu-x86"),
                    (repo.metadata_dir / "1.root.json").read_bytes(),
                )
                vehicle = fleet / f"{name}.json"
                _vehicle(vehicle, parked=(i < 2))
                thermal = fleet / f"{name}-thermal" / "thermal_zone0"
                thermal.mkdir(parents=True)
                (thermal / "temp").write_text("48000")
                cfg = AgentConfig.model_validate(
                    {
                        "device": {"root": str(root)},
                        "mqtt": {"port": broker.port},
                        "jobs": {"poll_s": 2, "progress_interval_s": 0.5, "precondition_recheck_s": 0.5},
                        "vehicle": {"state_file": str(vehicle)},
                        "thermal": {"root": str(thermal.parent)},
                        "telemetry": {"beacon_interval_s": 2},
                        "health": {"port": 0},
                    }
                )
                http.post(
                    "/api/v1/devices",
                    json={"thing_name": name, "sku": "edge-cpu-x86", "region": "north" if i % 2 else "south"},
                ).raise_for_status()
                daemons.append(_Daemon(cfg).start())
            say("fleet", "three agent daemons online (vehicle-a, vehicle-b parked; vehicle-c driving)")
            spec: dict[str, Any] = {
                "name": f"{release['name']} {release['version']} to edge-cpu-x86",
                "target": release["target"],
                "repository": f"{url}/repo",
                "cohort": {"sku": "edge-cpu-x86"},
                "waves": [{"count": 1, "soak_s": 1}, {"percent": 100}],
                "success_gate": {
                    "conditions": [
                        {"metric": "success_rate", "comparator": ">=", "threshold": 1.0, "min_samples": 1}
                    ]
                },
                "preconditions": {"require_parked": True, "min_battery_pct": 30},
                "seed": 7,
            }
            cid = http.post("/api/v1/campaigns", json=spec).json()["id"]
            http.post(f"/api/v1/campaigns/{cid}/submit").raise_for_status()
            http.post(f"/api/v1/campaigns/{cid}/approve").raise_for_status()
            say(
                "campaign",
                f"campaign {cid} approved (bench gate passed): 1 device, then everyone; "
                "devices must be parked",
            )
            seen: set[str] = set()
            parked_c = False
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                c = http.get(f"/api/v1/campaigns/{cid}").json()
                for d in http.get(f"/api/v1/campaigns/{cid}/decisions").json():
                    key = f"{d['at']}{d['kind']}"
                    if key not in seen and d["kind"] in ("started", "advanced", "completed", "paused"):
                        say("campaign", f"{d['kind']}: {d['message']}")
                    seen.add(key)
                waves = " | ".join(
                    f"wave {w['index'] + 1}: " + ", ".join(f"{k} {v}" for k, v in w["counts"].items())
                    for w in c["waves"]
                )
                if c["state"] == "completed":
                    say("campaign", f"completed — {waves}")
                    break
                if not parked_c:
                    with db.session() as s:
                        waiting = s.scalars(
                            select(JobExecution).where(
                                JobExecution.thing_name == "vehicle-c", JobExecution.status == "IN_PROGRESS"
                            )
                        ).first()
                        unmet = (waiting.status_details or {}).get("unmet") if waiting is not None else None
                    if unmet:
                        say("campaign", f"{waves}; vehicle-c waits, reporting '{unmet}'")
                        time.sleep(2)
                        _vehicle(fleet / "vehicle-c.json", parked=True)
                        say("campaign", "vehicle-c parks; its install starts")
                        parked_c = True
                time.sleep(0.5)
            names = ("vehicle-a", "vehicle-b", "vehicle-c")
            deadline = time.monotonic() + 20  # the next beacon carries the new active version
            while time.monotonic() < deadline and any(
                http.get(f"/api/v1/devices/{n}").json().get("active_version") != release["version"]
                for n in names
            ):
                time.sleep(0.5)
            for name in names:
                d = http.get(f"/api/v1/devices/{name}").json()
                say("fleet", f"{name}: runs {d['active_version'] or '?'} (last beacon {d['last_seen_at']})")
            _at_scale(http, broker.port, say)
            if keep_running:
                say("fleet", f"dashboard: {url}/#token={token}  (Ctrl-C to stop)")
                while True:
                    time.sleep(3600)
        finally:
            for d in daemons:
                d.stop()
            server.http.should_exit = True
            time.sleep(0.5)


def _at_scale(
    http: httpx.Client, mqtt_port: int, say: Callable[[str, str], None], devices: int = 2000
) -> None:
    """The same server at fleet scale: simulated agents (`tidegate sim`'s engine) through a
    five-wave campaign with retries; the devices that still fail become a retry campaign."""
    from fleet_server.sim.fleet import SimSettings, SimulatedFleet

    things = [f"sim-{i:05d}" for i in range(devices)]
    http.post(
        "/api/v1/devices/batch", json={"devices": [{"thing_name": t, "sku": "sim-edge"} for t in things]}
    ).raise_for_status()
    sim = SimulatedFleet(things, SimSettings(port=mqtt_port, install_s=(0.05, 0.3), fail_rate=0.005, seed=3))
    sim.start()
    try:
        sim.poll_all()  # agents ask for work when they connect; the server marks them online
        say("scale", f"{devices} simulated devices online (one MQTT connection, the agent's protocol)")
        spec = {
            "name": f"scale test: {devices} simulated devices",
            "target": "classifier/1.3.0/sim-edge.bundle",
            "repository": "http://127.0.0.1/repo",
            "cohort": {"sku": "sim-edge"},
            "waves": [{"percent": p} for p in (5, 25, 50, 75, 100)],
            "max_concurrent": devices,
            "rate": {"maximum_per_minute": 100_000},
            "retry": {"criteria": [{"failure_type": "FAILED", "retries": 1}], "backoff_s": 1},
            "server_preconditions": {"online_within_s": 300},
        }
        cid = http.post("/api/v1/campaigns", json=spec).json()["id"]
        http.post(f"/api/v1/campaigns/{cid}/submit").raise_for_status()
        http.post(
            f"/api/v1/campaigns/{cid}/approve", json={"override_reason": "simulated fleet: no bench report"}
        ).raise_for_status()
        say("scale", "campaign: 5 waves, retry FAILED once after 1 s, only devices seen in the last 5 min")
        t0 = time.monotonic()
        c: dict[str, Any] = {}
        while time.monotonic() - t0 < 120:
            c = http.get(f"/api/v1/campaigns/{cid}").json()
            if c["state"] not in ("scheduled", "running"):
                break
            time.sleep(0.5)
        took = time.monotonic() - t0
        totals: dict[str, int] = {}
        for w in c["waves"]:
            for k, v in w["counts"].items():
                totals[k] = totals.get(k, 0) + v
        retried = [d for d in http.get(f"/api/v1/campaigns/{cid}/decisions").json() if d["kind"] == "retried"]
        say(
            "scale",
            f"{c['state']} in {took:.1f} s ({devices / took:,.0f} devices/s): "
            + ", ".join(f"{k} {v}" for k, v in sorted(totals.items()))
            + f"; {len(retried)} retry round(s)",
        )
        if totals.get("FAILED"):
            again = http.post(f"/api/v1/campaigns/{cid}/retry-failed").json()
            say(
                "scale",
                f"the {totals['FAILED']} devices that failed twice are campaign {again['id']} "
                f"({again['state']}; an operator submits it for approval)",
            )
    finally:
        sim.stop()
