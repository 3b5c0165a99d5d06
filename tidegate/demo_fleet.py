"""The fleet part of `tidegate demo` (steps 3-5): the fleet server on an embedded Mosquitto,
three real agent daemons (each its own device root and A/B slots) and a simulated fleet, a
gated campaign with preconditions and a device-local blackout window, and a bad release the
gates stop while the devices roll back by themselves."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from agent.config import AgentConfig
from agent.device import DeviceConfig, DeviceRoot
from agent.runtime import AgentDaemon
from fleet_server.auth.service import Role, create_token
from fleet_server.broker import EmbeddedBroker
from fleet_server.db import Database
from fleet_server.migrate import upgrade
from fleet_server.server import FleetServer
from fleet_server.settings import Settings
from fleet_server.sim.fleet import SimSettings, SimulatedFleet
from shared.errors import TidegateError
from shared.net import free_port
from shared.trust import UpdateRepository

Say = Callable[[str, str], None]
SKU = "edge-cpu-x86"
VEHICLES = ("vehicle-a", "vehicle-b", "vehicle-c")
BLACKOUT_TZ = "Asia/Tokyo"  # vehicle-c's local time zone


class _Daemon:
    """A real agent daemon (the one `tidegate agent run` starts) in its own thread and loop."""

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
    """The vehicle state file the agent reads for its preconditions (CAN bus, in a car)."""
    state = {
        "battery_pct": 80,
        "parked": parked,
        "ignition": "off" if parked else "on",
        "network": "wifi",
        "updated_at": datetime.now(UTC).isoformat(),
    }
    path.write_text(json.dumps(state))


@dataclass
class Fleet:
    """What steps 3-5 share: the running server, its broker, the daemons and the simulator."""

    workdir: Path
    url: str
    token: str
    http: httpx.Client
    db: Database
    broker_port: int
    daemons: dict[str, _Daemon] = field(default_factory=dict)
    sim: SimulatedFleet | None = None
    simulated: list[str] = field(default_factory=list)
    campaigns: dict[str, str] = field(default_factory=dict)  # story name → campaign id

    @property
    def dashboard(self) -> str:
        return f"{self.url}/#token={self.token}"


def _wait_http(http: httpx.Client, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if http.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise TidegateError("the fleet server did not answer /healthz within 30 s")


@contextmanager
def running_fleet(
    workdir: Path, repo: UpdateRepository, say: Say, bench_keys: dict[str, str] | None = None
) -> Iterator[Fleet]:
    """Step 3: the server (API, dashboard, /repo, jobs bridge, scheduler) on an embedded
    Mosquitto, stopped with everything it started when the block ends (Ctrl-C included)."""
    root = workdir / "fleet"
    root.mkdir()
    with EmbeddedBroker(root / "broker") as broker:
        db = Database(f"sqlite:///{root / 'fleet.db'}")
        upgrade(db)
        with db.session() as s:
            token = create_token(s, name="demo-admin", role=Role.ADMIN, now=datetime.now(UTC))
        # The demo's bench host signs its reports; its CPU SKU is benched on a simulated zone.
        settings = Settings(
            database_url=db.url,
            mqtt_port=broker.port,
            repository_dir=repo.dir,
            sweep_interval_s=1,
            bench_keys=bench_keys or {},
            bench_simulated_thermal_skus=["edge-cpu-x86"],
        )
        port = free_port()
        server = FleetServer(db, settings, host="127.0.0.1", port=port, tick_s=0.5)
        server.start_in_thread()
        url = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        fleet = Fleet(workdir, url, token, http, db, broker.port)
        try:
            _wait_http(http)
            say(
                "fleet", f"fleet server up with Mosquitto on port {broker.port}; dashboard: {fleet.dashboard}"
            )
            yield fleet
        finally:
            for d in fleet.daemons.values():
                d.stop()
            if fleet.sim is not None:
                fleet.sim.stop()
            server.http.should_exit = True
            time.sleep(0.5)
            http.close()


def announce(fleet: Fleet, say: Say) -> None:
    say("fleet", f"fleet server up on an embedded Mosquitto (port {fleet.broker_port}): {fleet.url}")


def _seed_putting_one_vehicle_per_wave(spec: dict[str, Any], things: list[str]) -> int:
    """The campaign's membership is a seeded shuffle; the demo picks the seed that puts
    vehicle-a in wave 1, vehicle-b in wave 2 and vehicle-c in wave 3, so each wave has a
    real agent to watch."""
    from fleet_server.campaigns.planner import order_members, wave_bounds
    from fleet_server.campaigns.spec import CampaignSpec

    bounds = wave_bounds(CampaignSpec.model_validate(spec), len(things))
    for seed in range(100_000):
        order = order_members(things, seed)
        waves = [next(i for i, b in enumerate(bounds) if order.index(v) < b) for v in VEHICLES]
        if waves == [0, 1, 2]:
            return seed
    raise TidegateError("no seed puts one vehicle in each wave")


def register_release(fleet: Fleet, bundle: Path, say: Say) -> dict[str, Any]:
    r = fleet.http.post("/api/v1/releases", content=bundle.read_bytes())
    if r.status_code >= 400:
        raise TidegateError(f"registering {bundle.name}: HTTP {r.status_code}: {r.text[:200]}")
    release: dict[str, Any] = r.json()
    say("fleet", f"release {release['name']} {release['version']} registered ({release['target']})")
    return release


def start_devices(fleet: Fleet, repo: UpdateRepository, say: Say, *, simulated: int) -> None:
    """Three real agents — vehicle-a parked, vehicle-b driving, vehicle-c parked in Tokyo —
    and `simulated` protocol-accurate devices of the same SKU (a tenth of them wait on a low
    battery until the end of the campaign)."""
    root = fleet.workdir / "fleet"
    trusted = (repo.metadata_dir / "1.root.json").read_bytes()
    for i, name in enumerate(VEHICLES):
        device = root / name
        DeviceRoot.provision(device, DeviceConfig(device_id=name, sku=SKU), trusted)
        vehicle = root / f"{name}.json"
        _vehicle(vehicle, parked=name != "vehicle-b")
        thermal = root / f"{name}-thermal" / "thermal_zone0"
        thermal.mkdir(parents=True)
        (thermal / "temp").write_text("48000")
        (thermal / "type").write_text("soc")
        cfg = AgentConfig.model_validate(
            {
                "device": {"root": str(device)},
                "mqtt": {"port": fleet.broker_port},
                "jobs": {"poll_s": 2, "progress_interval_s": 0.5, "precondition_recheck_s": 0.5},
                "vehicle": {"state_file": str(vehicle)},
                "thermal": {"root": str(thermal.parent)},
                "telemetry": {"beacon_interval_s": 2},
                "health": {"port": 0},
            }
        )
        attributes = {"timezone": BLACKOUT_TZ if name == "vehicle-c" else "Europe/Berlin"}
        fleet.http.post(
            "/api/v1/devices",
            json={
                "thing_name": name,
                "sku": SKU,
                "region": "north" if i % 2 else "south",
                "attributes": attributes,
            },
        ).raise_for_status()
        fleet.daemons[name] = _Daemon(cfg).start()
    say(
        "fleet",
        f"three agent daemons online, each with its own device root and A/B slots under {root}: "
        f"vehicle-a parked, vehicle-b driving, vehicle-c parked ({BLACKOUT_TZ})",
    )
    things = fleet.simulated = [f"sim-{i:04d}" for i in range(simulated)]
    fleet.http.post(
        "/api/v1/devices/batch",
        json={"devices": [{"thing_name": t, "sku": SKU, "region": "south"} for t in things]},
    ).raise_for_status()
    fleet.sim = SimulatedFleet(
        things, SimSettings(port=fleet.broker_port, install_s=(0.2, 1.0), unmet_rate=0.1, seed=11)
    )
    fleet.sim.start()
    fleet.sim.poll_all()
    say(
        "fleet",
        f"{simulated} simulated devices online ({SKU}, the agent's Jobs protocol, one MQTT connection)",
    )


def _create(fleet: Fleet, spec: dict[str, Any], override: str | None = None) -> str:
    r = fleet.http.post("/api/v1/campaigns", json=spec)
    if r.status_code >= 400:
        raise TidegateError(f"creating campaign: HTTP {r.status_code}: {r.text[:300]}")
    cid = str(r.json()["id"])
    fleet.http.post(f"/api/v1/campaigns/{cid}/submit").raise_for_status()
    body = {"override_reason": override} if override else None
    r = fleet.http.post(f"/api/v1/campaigns/{cid}/approve", json=body)
    if r.status_code >= 400:
        raise TidegateError(f"approving campaign {cid}: HTTP {r.status_code}: {r.text[:300]}")
    return cid


def _waves(c: dict[str, Any]) -> str:
    return " | ".join(
        f"wave {w['index'] + 1}: " + ", ".join(f"{k} {v}" for k, v in sorted(w["counts"].items()))
        for w in c["waves"]
    )


def _status(fleet: Fleet, thing: str) -> dict[str, Any]:
    from agent.engine import Agent

    return Agent(fleet.workdir / "fleet" / thing).status()


def rollout(fleet: Fleet, release: dict[str, Any], say: Say) -> dict[str, Any]:
    """Step 4: the good release in three gated waves; the device-side precondition (parked)
    holds vehicle-b until it parks, a blackout window in vehicle-c's local time defers it
    until the window closes, and the simulated devices with a flat battery wait too."""
    tokyo = datetime.now(ZoneInfo(BLACKOUT_TZ))
    # Open now in Tokyo until the end of this minute, or of the next one when less than 25 s
    # are left: still open when the campaign reaches its last wave, closed soon after.
    minutes = 1 if tokyo.second <= 35 else 2
    spec = {
        "name": f"{release['name']} {release['version']} to {SKU}",
        "target": release["target"],
        "repository": f"{fleet.url}/repo",
        "cohort": {"sku": SKU},
        "waves": [{"count": 3, "soak_s": 2}, {"percent": 40, "soak_s": 2}, {"percent": 100}],
        "success_gate": {
            "conditions": [
                {"metric": "success_rate", "comparator": ">=", "threshold": 0.95, "min_samples": 3}
            ]
        },
        "preconditions": {"require_parked": True, "min_battery_pct": 30},
        "blackouts": [
            {
                "cron": f"{tokyo.minute} {tokyo.hour} * * *",
                "duration_minutes": minutes,
                "timezone": "device",
            }
        ],
        "max_concurrent": 100,
    }
    spec["seed"] = _seed_putting_one_vehicle_per_wave(spec, [*VEHICLES, *fleet.simulated])
    cid = fleet.campaigns["rollout"] = _create(fleet, spec)
    say(
        "campaign",
        f"campaign {cid} approved (the bench gate passed): waves of 3 devices, 40 %, 100 %, success "
        f"gate 95 %; devices must be parked with 30 % battery; blackout "
        f"{tokyo.hour:02d}:{tokyo.minute:02d} for {minutes} min in each device's local time",
    )
    say("campaign", f"watch it live: {fleet.dashboard}")
    seen: set[str] = set()
    parked_b = False
    charged = time.monotonic()
    t0 = time.monotonic()
    c: dict[str, Any] = {}
    while time.monotonic() - t0 < 180:
        c = fleet.http.get(f"/api/v1/campaigns/{cid}").json()
        for d in fleet.http.get(f"/api/v1/campaigns/{cid}/decisions").json():
            key = f"{d['at']} {d['kind']} {d['message']}"
            if key not in seen and d["kind"] in (
                "started",
                "advanced",
                "deferred",
                "completed",
                "paused",
            ):
                say("campaign", f"{d['kind']}: {d['message']}")
            seen.add(key)
        if c["state"] in ("completed", "paused", "canceled"):
            break
        if not parked_b and (unmet := _unmet(fleet, "vehicle-b")):
            say("campaign", f"{_waves(c)}; vehicle-b waits, reporting '{unmet}'")
            time.sleep(1)
            _vehicle(fleet.workdir / "fleet" / "vehicle-b.json", parked=True)
            say("campaign", "vehicle-b parks; its install starts")
            parked_b = True
        if fleet.sim is not None and fleet.sim.stats.waiting and time.monotonic() - charged > 6:
            n = fleet.sim.satisfy()
            say("campaign", f"{n} simulated devices waiting on a flat battery are charged; they install")
            charged = time.monotonic()
        time.sleep(0.5)
    took = time.monotonic() - t0
    say("campaign", f"{c['state']} in {took:.0f} s — {_waves(c)}")
    if c["state"] != "completed":
        raise TidegateError(f"campaign {cid} ended {c['state']}: {c.get('paused_reason')}")
    _await_versions(fleet, release["version"])
    for name in VEHICLES:
        st = _status(fleet, name)
        say("fleet", f"{name}: runs {st['active_version']} from slot {st['active_slot']} (committed)")
    return c


def _unmet(fleet: Fleet, thing: str) -> str | None:
    """Why `thing` waits, as operators read it: its execution's statusDetails.unmet."""
    rows = fleet.http.get("/api/v1/executions", params={"thing": thing, "status": "IN_PROGRESS"}).json()
    unmet = (rows[0]["status_details"] or {}).get("unmet") if rows else None
    return str(unmet) if unmet is not None else None


def _await_versions(fleet: Fleet, version: str, seconds: float = 30) -> None:
    """The agents' next beacons carry the version they now run."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(
        fleet.http.get(f"/api/v1/devices/{n}").json().get("active_version") != version for n in VEHICLES
    ):
        time.sleep(0.5)


def bad_release(fleet: Fleet, release: dict[str, Any], good: str, say: Say) -> dict[str, Any]:
    """Step 5: a release whose self-test fails on the device. The first wave's device installs
    it into its inactive slot, flips, fails its self-test and flips back by itself; the error
    gate stops the campaign before anyone else gets it."""
    spec = {
        "name": f"{release['name']} {release['version']} (hotfix, bench skipped)",
        "target": release["target"],
        "repository": f"{fleet.url}/repo",
        "cohort": {"sku": SKU, "things": list(VEHICLES)},
        "waves": [{"count": 1, "soak_s": 5}, {"percent": 100}],
        "seed": 3,
    }
    cid = fleet.campaigns["bad"] = _create(
        fleet, spec, override="hotfix requested by the on-call; the bench run was skipped"
    )
    say(
        "campaign",
        f"campaign {cid}: {release['version']} to the three vehicles, approved without a bench report "
        "(the override is recorded in the audit log)",
    )
    t0 = time.monotonic()
    c: dict[str, Any] = {}
    while time.monotonic() - t0 < 120:
        c = fleet.http.get(f"/api/v1/campaigns/{cid}").json()
        if c["state"] in ("paused", "completed", "canceled"):
            break
        time.sleep(0.5)
    if c["state"] != "paused":
        raise TidegateError(f"campaign {cid} should have been stopped by its gates; it is {c['state']}")
    say("campaign", f"stopped by the gates after {time.monotonic() - t0:.0f} s: {c['paused_reason']}")
    say("campaign", _waves(c))
    _await_versions(fleet, good)
    for name in VEHICLES:
        st = _status(fleet, name)
        slots = ", ".join(
            f"{k}: {v['status']} {v['bundle']['version'] if v['bundle'] else ''}".strip()
            for k, v in st["slots"].items()
        )
        say("fleet", f"{name}: runs {st['active_version']} ({slots})")
    for receipt in _receipts(fleet, release["version"]):
        say("fleet", f"{receipt['device_id']}'s receipt: {receipt['outcome']}: {receipt['reason']}")
        if tail := receipt.get("log_tail"):  # the device's own log for that install, redacted
            say("fleet", f"  from {receipt['device_id']}'s own log: {tail[-1][:140]}")
    kpis = fleet.http.get("/api/v1/campaigns/kpis").json()
    say(
        "kpis",
        f"{kpis['mitigations']} defective release stopped by the system; time to mitigation "
        f"{kpis['time_to_mitigation_s']['p50']:.1f} s; defect escape rate {kpis['defect_escape_rate']:.0%}",
    )
    return c


def _receipts(fleet: Fleet, version: str, seconds: float = 15) -> list[dict[str, Any]]:
    """The install receipts the devices sent for `version` (they follow the job's status)."""
    deadline = time.monotonic() + seconds
    while True:
        rows = fleet.http.get("/api/v1/receipts", params={"version": version}).json()
        got = [r["receipt"] for r in rows]
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def export_records(fleet: Fleet, out: Path) -> dict[str, Path]:
    """The campaigns with their decision logs, the devices' install receipts and the failure
    cohort of the stopped campaign, as JSON files an operator can attach to a report."""
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for story, cid in fleet.campaigns.items():
        body = {
            "campaign": fleet.http.get(f"/api/v1/campaigns/{cid}").json(),
            "decisions": fleet.http.get(f"/api/v1/campaigns/{cid}/decisions").json(),
        }
        paths[f"campaign-{story}"] = out / f"campaign-{story}.json"
        paths[f"campaign-{story}"].write_text(json.dumps(body, indent=2) + "\n")
    if "bad" in fleet.campaigns:
        cohort = fleet.http.get(f"/api/v1/campaigns/{fleet.campaigns['bad']}/cohorts/failure").json()
        paths["failure-cohort"] = out / "failure-cohort.json"
        paths["failure-cohort"].write_text(json.dumps(cohort, indent=2) + "\n")
    rows = fleet.http.get("/api/v1/receipts", params={"limit": 1000}).json()
    receipts = [{"thing": r["thing_name"], "seq": r["seq"], **r["receipt"]} for r in reversed(rows)]
    paths["receipts"] = out / "receipts.json"
    paths["receipts"].write_text(json.dumps(receipts, indent=2, default=str) + "\n")
    return paths
