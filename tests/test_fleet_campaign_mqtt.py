"""Campaigns over 200 simulated devices on a real Mosquitto: the jobs bridge and the scheduler
run against the broker with a clock that runs 60x faster (one simulated minute per second),
and the limits are checked on the timestamps the server recorded."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fleet_server.campaigns import service
from fleet_server.campaigns.models import CampaignDecision
from fleet_server.campaigns.spec import CampaignSpec
from fleet_server.db import Database
from fleet_server.devices.service import register_device
from fleet_server.jobs.bridge import JobsBridge
from fleet_server.jobs.models import JobExecution
from fleet_server.scheduler import CampaignScheduler
from fleet_server.sim.fleet import SimSettings, SimulatedFleet
from tests.mqtt_helpers import MOSQUITTO, Broker

pytestmark = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto binary not installed")

START = datetime(2026, 11, 24, 11, 58, tzinfo=UTC)
FACTOR = 60.0


class ScaledClock:
    """Simulated time: START plus real elapsed time times FACTOR."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self) -> datetime:
        return START + timedelta(seconds=(time.monotonic() - self.t0) * FACTOR)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    broker = Broker(tmp_path / "broker").start()
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    from fleet_server.migrate import upgrade

    upgrade(db)
    clock = ScaledClock()
    bridge = JobsBridge(
        db, port=broker.port, clock=clock, sweep_interval_s=1.0, renotify_after=timedelta(minutes=30)
    ).start()
    scheduler = CampaignScheduler(db, bridge.publish, clock, interval_s=0.1)
    things = [f"sim-{i:03d}" for i in range(200)]
    with db.session() as s:
        for t in things:
            register_device(s, thing_name=t, sku="edge-cpu", now=clock())
    yield {
        "db": db,
        "clock": clock,
        "bridge": bridge,
        "scheduler": scheduler,
        "broker": broker,
        "things": things,
    }
    scheduler.stop()
    bridge.stop()
    broker.stop()


def launch(st: dict[str, Any], spec: dict[str, Any], **sim: Any) -> tuple[str, SimulatedFleet]:
    fleet = SimulatedFleet(
        st["things"], SimSettings(port=st["broker"].port, install_s=(0.05, 0.3), **sim)
    ).start()
    with st["db"].session() as s:
        c = service.create(s, spec=CampaignSpec.model_validate(spec), actor="op", now=st["clock"]())
        service.submit(s, campaign_id=c.id, actor="op", now=st["clock"]())
        service.approve(
            s, campaign_id=c.id, actor="admin", now=st["clock"](), override_reason="test fleet: no bench"
        )
        cid = c.id
    st["scheduler"].start()
    return cid, fleet


def wait_state(st: dict[str, Any], cid: str, states: set[str], timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with st["db"].session() as s:
            state = service.get(s, cid).state
        if state in states:
            return state
        time.sleep(0.1)
    raise AssertionError(f"campaign stayed {state}")


BASE: dict[str, Any] = {
    "name": "v2",
    "target": "classifier",
    "repository": "http://repo",
    "cohort": {"sku": "edge-cpu"},
    "success_gate": {
        "conditions": [{"metric": "success_rate", "comparator": ">=", "threshold": 0.95, "min_samples": 10}]
    },
    "error_gate": {
        "conditions": [{"metric": "failure_rate", "comparator": "<=", "threshold": 0.05, "min_samples": 10}]
    },
}


def test_waves_gates_concurrency_rate_and_blackout_hold(stack: dict[str, Any]) -> None:
    spec = {
        **BASE,
        "waves": [{"percent": 5, "soak_s": 30}, {"percent": 25}, {"percent": 100}],
        "max_concurrent": 25,
        "rate": {
            "maximum_per_minute": 60,
            "base_rate_per_minute": 15,
            "increment_factor": 2,
            "increase_after_succeeded": 20,
        },
        "blackouts": [{"cron": "0 12 * * *", "duration_minutes": 2}],
    }  # 12:00-12:02 simulated
    cid, fleet = launch(stack, spec)
    try:
        assert wait_state(stack, cid, {"completed", "paused"}) == "completed"
    finally:
        fleet.stop()
    db: Database = stack["db"]
    with db.session() as s:
        rows = s.scalars(select(JobExecution).where(JobExecution.job_id == cid)).all()
        members = service.get(s, cid).members
        advanced = [
            d.at
            for d in s.scalars(
                select(CampaignDecision)
                .where(CampaignDecision.campaign_id == cid, CampaignDecision.kind == "advanced")
                .order_by(CampaignDecision.id)
            )
        ]
    assert len(rows) == 200 and {r.status for r in rows} == {"SUCCEEDED"}
    queued = sorted(r.queued_at for r in rows)
    done = {r.thing_name: r.last_updated_at for r in rows}
    started = {r.thing_name: r.queued_at for r in rows}
    # concurrency: at no queue instant were more than 25 executions unfinished
    for t in queued:
        assert sum(1 for th in started if started[th] <= t < done[th]) <= 25
    # rate: never more than 60 notified in any (simulated) minute; the ramp starts at 15
    for t in queued:
        assert sum(1 for x in queued if t - timedelta(minutes=1) < x <= t) <= 60
    assert sum(1 for x in queued if x < queued[0] + timedelta(minutes=1)) <= 15
    # blackout: nobody notified 12:00-12:02
    window = (START.replace(hour=12, minute=0), START.replace(hour=12, minute=2))
    assert not [x for x in queued if window[0] <= x < window[1]]
    assert queued[-1] > window[1]  # the campaign really ran across the window
    # waves in order, each after the previous passed: wave 1 (10 devices) alone, then soak
    assert len(advanced) == 2
    first_wave = set(members[:10])
    assert {th for th in started if started[th] < advanced[0]} == first_wave
    assert advanced[0] - max(done[t] for t in first_wave) >= timedelta(seconds=30)
    assert fleet.stats.rejected == {}


def test_a_failing_wave_stops_the_campaign_and_pause_resume(stack: dict[str, Any]) -> None:
    spec = {**BASE, "waves": [{"percent": 10}, {"percent": 100}], "max_concurrent": 100}
    cid, fleet = launch(stack, spec, fail_rate=0.3, seed=5)
    try:
        assert wait_state(stack, cid, {"paused", "completed"}) == "paused"
        db: Database = stack["db"]
        with db.session() as s:
            c = service.get(s, cid)
            assert c.paused_reason is not None and c.paused_reason.startswith("error gate: failure_rate")
            count = s.query(JobExecution).filter(JobExecution.job_id == cid).count()
        assert count <= 20  # the first wave (20 devices) only: the rest were never notified
        time.sleep(0.5)
        with db.session() as s:
            assert s.query(JobExecution).filter(JobExecution.job_id == cid).count() == count
            service.resume(s, campaign_id=cid, actor="op", now=stack["clock"]())
        assert wait_state(stack, cid, {"paused"}) == "paused"  # still failing: stopped again
        with db.session() as s:
            kinds = [
                d.kind for d in s.scalars(select(CampaignDecision).where(CampaignDecision.campaign_id == cid))
            ]
        assert kinds.count("paused") == 2 and "running" in kinds
    finally:
        fleet.stop()


def test_a_flooding_device_is_throttled_and_the_campaign_completes(stack: dict[str, Any]) -> None:
    """One device (its own process) sends 500 `get` requests a second, thousands of times what
    the protocol needs, for the whole campaign (a rate that leaves the rest of the suite its
    CPU; bench/jobs_flood.py goes to 5,000 a second): it is answered RequestThrottled (AWS's code), what
    reaches the database is bounded by its bucket, and the 200 others complete as without it
    (their completion times with and without a flood are measured in bench/jobs_flood.py)."""
    import json
    import subprocess
    import sys

    bridge: JobsBridge = stack["bridge"]
    with stack["db"].session() as s:
        register_device(s, thing_name="flood-1", sku="other-sku", now=stack["clock"]())
    flooder = subprocess.Popen(
        [sys.executable, "-m", "fleet_server.sim.flood", str(stack["broker"].port), "500"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert flooder.stdout is not None and flooder.stdout.readline().strip() == "ready"
    t0 = time.monotonic()  # the flood's start: what the bucket may admit is counted from here
    time.sleep(1.5)  # the flood is on before the campaign starts, however fast the campaign is
    spec = {**BASE, "waves": [{"percent": 100}], "max_concurrent": 200}
    cid, fleet = launch(stack, spec)
    try:
        assert wait_state(stack, cid, {"completed", "paused"}) == "completed"
    finally:
        fleet.stop()
        flooder.terminate()
        out, _ = flooder.communicate(timeout=30)
    elapsed = time.monotonic() - t0
    flood = json.loads(out.strip().splitlines()[-1])
    with stack["db"].session() as s:
        rows = s.scalars(select(JobExecution).where(JobExecution.job_id == cid)).all()
    assert len(rows) == 200 and {r.status for r in rows} == {"SUCCEEDED"}
    assert fleet.stats.rejected == {}  # none of the others was ever throttled
    limited = bridge.limiter.throttled + bridge.limiter.dropped
    assert flood["sent"] > 500  # the flood ran for the whole campaign
    assert limited >= flood["sent"] - flood["answered"] - 50  # it reached the bridge and was cut there
    assert 0 < flood["answered"] <= bridge.limiter.rate * elapsed + bridge.limiter.burst  # a bucket's worth
    assert flood["codes"] and set(flood["codes"]) == {"RequestThrottled"}
    assert len(flood["codes"]) <= elapsed + 2  # told about once a second, not once per message
