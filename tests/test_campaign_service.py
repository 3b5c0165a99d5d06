"""Campaigns in the database (SQLite and PostgreSQL): lifecycle, ticks that queue real job
executions, simulated devices answering through the AWS IoT Jobs protocol handler."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from fleet_server.campaigns import service
from fleet_server.campaigns.models import CampaignDecision
from fleet_server.campaigns.spec import CampaignSpec
from fleet_server.db import Database
from fleet_server.devices.models import Device
from fleet_server.devices.service import register_device
from fleet_server.jobs import protocol
from fleet_server.jobs.models import ExecutionEvent, JobExecution

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def fleet(db: Database, n: int, sku: str = "edge-cpu") -> list[str]:
    things = [f"car-{i:03d}" for i in range(n)]
    with db.session() as s:
        for i, t in enumerate(things):
            register_device(s, thing_name=t, sku=sku, region="eu" if i % 2 else "us", now=T0)
        register_device(s, thing_name="other-sku-car", sku="edge-gpu", now=T0)
    return things


def make(db: Database, **kw: object) -> str:
    raw: dict[str, object] = {
        "name": "roll",
        "target": "classifier",
        "repository": "http://repo",
        "cohort": {"sku": "edge-cpu"},
        "waves": [{"percent": 10}, {"percent": 100}],
        "max_concurrent": 100,
    }
    raw.update(kw)
    with db.session() as s:
        c = service.create(s, spec=CampaignSpec.model_validate(raw), actor="op", now=T0)
        service.submit(s, campaign_id=c.id, actor="op", now=T0)
        service.approve(s, campaign_id=c.id, actor="admin", now=T0, override_reason="test fleet: no bench")
        return c.id


def devices_answer(db: Database, now: datetime, fail: set[str] = frozenset()) -> int:  # type: ignore[assignment]
    """Every device with a queued execution starts it and reports, as the agent would."""
    with db.session() as s:
        queued = s.scalars(select(JobExecution).where(JobExecution.status == "QUEUED")).all()
        things = sorted({e.thing_name for e in queued})
    for t in things:
        with db.session() as s:
            out = protocol.handle(s, f"$aws/things/{t}/jobs/start-next", b"{}", now)
        ex = out[0].payload["execution"]
        status = "FAILED" if t in fail else "SUCCEEDED"
        body = {"status": status, "expectedVersion": ex["versionNumber"], "statusDetails": {"reason": "sim"}}
        with db.session() as s:
            reply = protocol.handle(
                s, f"$aws/things/{t}/jobs/{ex['jobId']}/update", json.dumps(body).encode(), now
            )
        assert reply[0].topic.endswith("accepted"), reply[0].payload
    return len(things)


def state(db: Database, cid: str) -> tuple[str, int]:
    with db.session() as s:
        c = service.get(s, cid)
        return c.state, c.wave


def test_a_campaign_runs_wave_by_wave_to_completion(db: Database) -> None:
    things = fleet(db, 40)
    cid = make(db)
    now = T0
    with db.session() as s:
        out = service.tick(s, campaign_id=cid, now=now)
    assert state(db, cid) == ("running", 0)
    notified = {o.topic.split("/")[2] for o in out if o.topic.endswith("notify-next")}
    assert len(notified) == 4 and notified <= set(things)  # 10 % of 40, seeded random members
    with db.session() as s:  # ticking again queues nobody twice
        assert service.tick(s, campaign_id=cid, now=now) == []
    for _ in range(10):
        now += timedelta(minutes=1)
        devices_answer(db, now)
        with db.session() as s:
            service.tick(s, campaign_id=cid, now=now)
        if state(db, cid)[0] == "completed":
            break
    assert state(db, cid) == ("completed", 1)
    with db.session() as s:
        rows = s.scalars(select(JobExecution).where(JobExecution.job_id == cid)).all()
        assert len(rows) == 40 and {r.status for r in rows} == {"SUCCEEDED"}
        assert "other-sku-car" not in {r.thing_name for r in rows}
        kinds = [
            d.kind
            for d in s.scalars(
                select(CampaignDecision)
                .where(CampaignDecision.campaign_id == cid)
                .order_by(CampaignDecision.id)
            ).all()
        ]
        assert kinds[:5] == ["created", "waiting_for_approval", "override", "scheduled", "started"]
        assert "advanced" in kinds and kinds[-1] == "completed"
        doc = rows[0].document
        assert (
            doc["operation"] == "tidegate.install" and doc["campaign"] == cid and doc["skus"] == ["edge-cpu"]
        )


def test_failures_pause_the_campaign_and_record_why(db: Database) -> None:
    fleet(db, 100)
    cid = make(
        db,
        waves=[{"percent": 20}, {"percent": 100}],
        error_gate={
            "conditions": [
                {"metric": "failure_rate", "comparator": "<=", "threshold": 0.05, "min_samples": 10}
            ]
        },
    )
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=T0)
        first = s.scalars(select(JobExecution.thing_name).where(JobExecution.job_id == cid)).all()
    devices_answer(db, T0 + timedelta(minutes=1), fail=set(first[:3]))
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=T0 + timedelta(minutes=1))
        c = service.get(s, cid)
        assert c.state == "paused" and c.paused_reason is not None
        assert c.paused_reason.startswith("error gate: failure_rate")
    with db.session() as s:
        assert service.tick(s, campaign_id=cid, now=T0 + timedelta(minutes=2)) == []  # paused: nothing moves
        assert s.query(JobExecution).filter(JobExecution.job_id == cid).count() == 20


def test_operator_actions_and_illegal_transitions(db: Database) -> None:
    fleet(db, 20)
    with db.session() as s:
        c = service.create(
            s,
            spec=CampaignSpec.model_validate(
                {
                    "name": "x",
                    "target": "t",
                    "repository": "r",
                    "cohort": {"sku": "edge-cpu", "regions": ["eu"]},
                    "waves": [{"count": 2, "manual_advance": True}, {"percent": 100}],
                }
            ),
            actor="op",
            now=T0,
        )
        cid = c.id
        with pytest.raises(service.CampaignError, match="is draft; it cannot be approved"):
            service.approve(s, campaign_id=cid, actor="admin", now=T0, override_reason="test fleet: no bench")
    with db.session() as s:
        service.submit(s, campaign_id=cid, actor="op", now=T0)
        service.approve(s, campaign_id=cid, actor="admin", now=T0, override_reason="test fleet: no bench")
        service.tick(s, campaign_id=cid, now=T0)
    assert len(service_members(db, cid)) == 10  # the region filter: eu only
    devices_answer(db, T0 + timedelta(minutes=1))
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=T0 + timedelta(minutes=1))
    assert state(db, cid) == ("running", 0)  # passed, but waits for an operator
    with db.session() as s:
        service.next_wave(s, campaign_id=cid, actor="op", now=T0 + timedelta(minutes=2))
        service.tick(s, campaign_id=cid, now=T0 + timedelta(minutes=2))
    assert state(db, cid) == ("running", 1)
    last = "on its last wave .2 of 2.: there is no next"
    with db.session() as s, pytest.raises(service.CampaignError, match=last):
        service.next_wave(s, campaign_id=cid, actor="op", now=T0 + timedelta(minutes=2))
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=T0 + timedelta(minutes=3))  # queues wave 2
        service.pause(s, campaign_id=cid, actor="op", now=T0 + timedelta(minutes=3), reason="look at logs")
        service.resume(s, campaign_id=cid, actor="op", now=T0 + timedelta(minutes=4))
        out = service.cancel(s, campaign_id=cid, actor="op", now=T0 + timedelta(minutes=5), force=False)
        assert out  # devices whose queue changed are notified
    with db.session() as s:
        statuses = {e.status for e in s.scalars(select(JobExecution).where(JobExecution.job_id == cid)).all()}
        assert statuses == {"SUCCEEDED", "CANCELED"}
        with pytest.raises(service.CampaignError, match="is canceled"):
            service.resume(s, campaign_id=cid, actor="op", now=T0)
        with pytest.raises(service.CampaignNotFoundError):
            service.get(s, "nope")


def service_members(db: Database, cid: str) -> list[str]:
    with db.session() as s:
        return list(service.get(s, cid).members)


def test_continuous_targeting_picks_up_devices_that_join_later(db: Database) -> None:
    fleet(db, 10)
    cid = make(db, targeting="continuous", waves=[{"percent": 100}])
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=T0)
        register_device(s, thing_name="late-car", sku="edge-cpu", now=T0)
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=T0 + timedelta(minutes=1))
        assert "late-car" in service.get(s, cid).members
        assert s.query(JobExecution).filter(JobExecution.thing_name == "late-car").count() == 1


def test_a_failed_device_is_retried_with_the_next_execution_number(db: Database) -> None:
    things = fleet(db, 4)
    cid = make(
        db,
        waves=[{"percent": 100}],
        retry={"criteria": [{"failure_type": "FAILED", "retries": 1}], "backoff_s": 120},
        error_gate={"conditions": [{"metric": "failure_rate", "comparator": "<=", "threshold": 1.0}]},
        success_gate={"conditions": [{"metric": "success_rate", "comparator": ">=", "threshold": 0.5}]},
    )
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=T0)
    devices_answer(db, T0 + timedelta(minutes=1), fail={things[0]})
    with db.session() as s:  # within the backoff: nothing, and the campaign does not finish
        assert service.tick(s, campaign_id=cid, now=T0 + timedelta(minutes=2)) == []
    assert state(db, cid) == ("running", 0)
    with db.session() as s:
        out = service.tick(s, campaign_id=cid, now=T0 + timedelta(minutes=3, seconds=1))
    nxt = next(o.payload for o in out if o.topic == f"$aws/things/{things[0]}/jobs/notify-next")
    assert nxt["execution"]["executionNumber"] == 2 and nxt["execution"]["status"] == "QUEUED"
    devices_answer(db, T0 + timedelta(minutes=4), fail={things[0]})  # fails again: retries spent
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=T0 + timedelta(hours=1))
        ex = s.scalars(select(JobExecution).where(JobExecution.thing_name == things[0])).one()
        assert (ex.status, ex.execution_number) == ("FAILED", 2)
        trail = [
            (e.from_status, e.to_status)
            for e in s.scalars(
                select(ExecutionEvent).where(ExecutionEvent.execution_id == ex.id).order_by(ExecutionEvent.id)
            )
        ]
        assert trail == [
            (None, "QUEUED"),
            ("QUEUED", "IN_PROGRESS"),
            ("IN_PROGRESS", "FAILED"),
            ("FAILED", "QUEUED"),
            ("QUEUED", "IN_PROGRESS"),
            ("IN_PROGRESS", "FAILED"),
        ]
    assert state(db, cid) == ("completed", 0)  # 3 of 4 >= 50 %

    # the failed device is retried as a new campaign, which needs approval like any other
    with db.session() as s:
        new = service.retry_failed(s, campaign_id=cid, actor="op", now=T0 + timedelta(hours=2))
        new_id = new.id
        assert new.state == "draft" and new.spec["cohort"]["things"] == [things[0]]
        assert new.spec["name"] == "retry of roll"
    with db.session() as s:
        service.submit(s, campaign_id=new_id, actor="op", now=T0)
        service.approve(s, campaign_id=new_id, actor="admin", now=T0, override_reason="test fleet: no bench")
        service.tick(s, campaign_id=new_id, now=T0 + timedelta(hours=2))
        assert service.get(s, new_id).members == [things[0]]
        with pytest.raises(service.CampaignError, match="no failed devices"):
            service.retry_failed(s, campaign_id=new_id, actor="op", now=T0)


def test_static_groups_target_a_campaign(db: Database) -> None:
    from fleet_server.devices import service as devices

    things = fleet(db, 10)
    with db.session() as s:
        devices.create_group(s, name="pilot", description="test cars", things=things[:3], now=T0)
        assert devices.change_members(s, name="pilot", add=[things[5]], remove=[things[0]]) == [
            things[1],
            things[2],
            things[5],
        ]
    with db.session() as s, pytest.raises(devices.GroupError, match="unknown device"):
        devices.change_members(s, name="pilot", add=["ghost"], remove=[things[1]])
    with db.session() as s:  # nothing changed by the refused request
        assert devices.group_members(s, "pilot") == [things[1], things[2], things[5]]
    with pytest.raises(service.CampaignError, match="group 'nope'"):
        make(db, cohort={"sku": "edge-cpu", "groups": ["nope"]})
    cid = make(db, cohort={"sku": "edge-cpu", "groups": ["pilot"]}, waves=[{"percent": 100}])
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=T0)
    assert sorted(service_members(db, cid)) == [things[1], things[2], things[5]]


def test_schedule_and_server_preconditions(db: Database) -> None:
    things = fleet(db, 6)
    with db.session() as s:
        for t in things[:4]:
            s.get(Device, t).last_seen_at = T0 + timedelta(hours=1)  # type: ignore[union-attr]
    start = T0 + timedelta(hours=1)
    cid = make(
        db,
        waves=[{"percent": 100}],
        schedule={
            "start_at": start.isoformat(),
            "end_at": (start + timedelta(hours=1)).isoformat(),
            "end_behavior": "force_cancel",
        },
        server_preconditions={"online_within_s": 600},
    )
    with db.session() as s:
        assert service.tick(s, campaign_id=cid, now=T0) == []
    assert state(db, cid) == ("scheduled", 0)  # not before its start time
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=start)
        queued = set(s.scalars(select(JobExecution.thing_name).where(JobExecution.job_id == cid)).all())
    assert queued == set(things[:4])  # the two never seen online are deferred
    with db.session() as s:
        s.get(Device, things[4]).last_seen_at = start + timedelta(minutes=5)  # type: ignore[union-attr]
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=start + timedelta(minutes=6))
        assert s.query(JobExecution).filter(JobExecution.thing_name == things[4]).count() == 1
    with db.session() as s:  # the end time: force_cancel cancels queued and in-progress executions
        service.tick(s, campaign_id=cid, now=start + timedelta(hours=1))
        statuses = {e.status for e in s.scalars(select(JobExecution).where(JobExecution.job_id == cid)).all()}
    assert statuses == {"CANCELED"} and state(db, cid) == ("canceled", 0)


def test_kpis_time_to_mitigation_and_defect_escape_rate(db: Database) -> None:
    from fleet_server.campaigns.kpis import load
    from shared.kpis import summarise

    fleet(db, 100)
    gate = {
        "conditions": [{"metric": "failure_rate", "comparator": "<=", "threshold": 0.05, "min_samples": 10}]
    }
    # A: failures in the first wave; the gates pause it two minutes after the first report
    a = make(db, name="a", waves=[{"percent": 20}, {"percent": 100}], error_gate=gate)
    with db.session() as s:
        service.tick(s, campaign_id=a, now=T0)
        first = s.scalars(select(JobExecution.thing_name).where(JobExecution.job_id == a)).all()
    devices_answer(db, T0 + timedelta(minutes=1), fail=set(first[:3]))
    with db.session() as s:
        service.tick(s, campaign_id=a, now=T0 + timedelta(minutes=3))
        assert service.get(s, a).state == "paused"
    # B: an operator pauses it: not a mitigation by the system
    b = make(db, name="b", waves=[{"percent": 100}])
    with db.session() as s:
        service.tick(s, campaign_id=b, now=T0)
    devices_answer(db, T0 + timedelta(minutes=1))
    with db.session() as s:
        if service.get(s, b).state == "running":
            service.pause(s, campaign_id=b, actor="op", now=T0 + timedelta(minutes=2), reason="lunch")
    # C: past its first wave when the alerts pause it: the defect escaped
    c = make(db, name="c", waves=[{"percent": 10}, {"percent": 100}])
    now = T0
    for _ in range(3):  # wave 0 queued and installed; wave 1 opened, queued and installed
        with db.session() as s:
            service.tick(s, campaign_id=c, now=now)
        devices_answer(db, now + timedelta(seconds=30))
        now += timedelta(minutes=1)
    with db.session() as s:
        assert service.get(s, c).wave >= 1 and service.get(s, c).state == "running"
        service.pause(
            s, campaign_id=c, actor="alerts", now=now + timedelta(minutes=10), reason="alert score-drift"
        )
    with db.session() as s:
        found = {m.subject: m for m in load(s)}
    assert set(found) == {a, c}
    assert found[a].seconds == 120 and not found[a].escaped and found[a].exposed == 17
    assert found[c].escaped and found[c].by == "alerts" and found[c].exposed > 10
    kpis = summarise(list(found.values()))
    assert kpis["mitigations"] == 2 and kpis["defect_escape_rate"] == 0.5
    assert kpis["time_to_mitigation_s"]["p50"] == 120
    import asyncio

    import httpx

    from fleet_server.app import create_app
    from fleet_server.auth.service import Role, create_token

    with db.session() as s:
        token = create_token(s, name="viewer", role=Role.VIEWER, now=T0)

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(db))
        async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as client:
            return await client.get("/api/v1/campaigns/kpis", headers={"Authorization": f"Bearer {token}"})

    r = asyncio.run(get())
    assert r.status_code == 200 and r.json()["mitigations"] == 2 and r.json()["defect_escape_rate"] == 0.5


def test_a_blackout_window_in_device_local_time_defers_only_the_devices_inside_it(db: Database) -> None:
    """18:00-20:00 local: at 10:00 UTC it is 19:00 in Tokyo, so the Tokyo car waits (with the
    reason in the decision log) while the others install; it is notified once its window
    closes."""
    things = fleet(db, 4)
    with db.session() as s:
        s.get(Device, things[3]).attributes = {"timezone": "Asia/Tokyo"}  # type: ignore[union-attr]
        s.get(Device, things[2]).attributes = {"timezone": "Not/AZone"}  # unknown zone: read as UTC
    cid = make(
        db,
        waves=[{"percent": 100}],
        blackouts=[{"cron": "0 18 * * *", "duration_minutes": 120, "timezone": "device"}],
    )
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=T0)
        queued = set(s.scalars(select(JobExecution.thing_name).where(JobExecution.job_id == cid)).all())
        log = [
            d.message for d in s.scalars(select(CampaignDecision).where(CampaignDecision.campaign_id == cid))
        ]
    assert queued == set(things[:3])
    assert any(
        f"blackout window '0 18 * * *' open in the device's local time (Asia/Tokyo) (1: {things[3]})" in m
        for m in log
    )
    assert devices_answer(db, T0) == 3
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=T0 + timedelta(minutes=59))  # 19:59 in Tokyo: still closed to it
        assert s.query(JobExecution).filter(JobExecution.thing_name == things[3]).count() == 0
    assert state(db, cid) == ("running", 0)  # the others are done, but the campaign waits for it
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=T0 + timedelta(hours=1))  # 20:00 in Tokyo: the window closed
        assert s.query(JobExecution).filter(JobExecution.thing_name == things[3]).count() == 1
    assert devices_answer(db, T0 + timedelta(hours=1)) == 1
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=T0 + timedelta(hours=1, seconds=1))
    assert state(db, cid)[0] == "completed"
    with pytest.raises(ValueError, match="unknown time zone"):
        CampaignSpec.model_validate(
            {
                "name": "x",
                "target": "t",
                "repository": "r",
                "cohort": {"sku": "edge-cpu"},
                "blackouts": [{"cron": "0 18 * * *", "duration_minutes": 60, "timezone": "Mars/Olympus"}],
            }
        )


def test_a_campaign_another_replica_is_ticking_is_left_to_it(db: Database) -> None:
    """Replicas share one PostgreSQL: a campaign is ticked by one at a time (a transaction
    advisory lock on its id, never waited for), so no decision is taken twice. SQLite serves
    one replica and has no such lock to take."""
    from sqlalchemy import text

    from fleet_server.jobs.protocol import Outgoing
    from fleet_server.scheduler import CampaignScheduler

    fleet(db, 4)
    cid = make(db, waves=[{"percent": 100}])
    published: list[Outgoing] = []
    scheduler = CampaignScheduler(db, published.extend, lambda: T0)
    if db.url.startswith("postgresql"):
        with db.engine.connect() as other:  # the other replica, mid-tick on this campaign
            other.execute(text("SELECT pg_advisory_lock(hashtext(:k))"), {"k": f"campaign:{cid}"})
            scheduler.tick_all()
            assert scheduler.skipped == 1 and state(db, cid)[0] == "scheduled"
            with db.session() as s:
                assert s.query(JobExecution).filter(JobExecution.job_id == cid).count() == 0
            other.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": f"campaign:{cid}"})
    scheduler.tick_all()
    assert state(db, cid)[0] == "running" and published  # its lock free: ticked, devices notified


def _reference(s: Any, c: Any, spec: CampaignSpec, now: datetime) -> Any:
    """The member-by-member CampaignState the tick built before it let the database count."""
    from fleet_server.campaigns.planner import CampaignState, MemberState

    rows = {r.thing_name: r for r in s.scalars(select(JobExecution).where(JobExecution.job_id == c.id))}
    unmet = service._unmet(s, spec, [t for t in c.members if t not in rows], now)
    members = tuple(
        MemberState(
            t,
            ex.status,
            ex.queued_at,
            ex.last_updated_at if ex.status in TERMINAL else None,
            ex.execution_number,
        )
        if (ex := rows.get(t)) is not None
        else MemberState(t, None, unmet=unmet.get(t))
        for t in c.members
    )
    return CampaignState(c.wave, c.wave_started_at, members, c.advance_requested)


TERMINAL = {"SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "CANCELED", "REMOVED"}


@pytest.mark.parametrize("notified_share", [0.6, 1.0])
def test_the_counts_a_tick_decides_on_equal_the_member_by_member_reduction(
    db: Database, notified_share: float
) -> None:
    """The tick has the database count the executions (one grouped query) instead of walking
    every member; on a random campaign in every state the counts equal the planner's own
    reduction of the member list, and so does the decision taken on them."""
    import random

    from fleet_server.campaigns.planner import count_members, order_members, plan_tick, wave_bounds

    rng = random.Random(int(notified_share * 10))
    fleet(db, 150)
    cid = make(
        db,
        waves=[{"percent": 10}, {"percent": 40}, {"percent": 100}],
        max_concurrent=400,
        retry={"criteria": [{"failure_type": "FAILED", "retries": 1}], "backoff_s": 5},
        server_preconditions={"regions": ["eu"]},  # the "us" half is deferred while not notified
    )
    now = T0 + timedelta(minutes=10)
    with db.session() as s:
        c = service.get(s, cid)  # running in wave 2, its executions made up below
        spec = CampaignSpec.model_validate(c.spec)
        c.state, c.started_at, c.wave, c.wave_started_at = "running", T0, 1, T0
        c.members = order_members(service.cohort_things(s, spec.cohort), spec.seed)
        bound = wave_bounds(spec, len(c.members))[1]
        chosen = [
            t for i, t in enumerate(c.members[:bound]) if i < bound * notified_share or rng.random() < 0.1
        ]
        chosen += [t for t in c.members[bound:] if rng.random() < 0.05]  # stray later-wave rows
        for t in chosen:
            status = rng.choice(
                [
                    "QUEUED",
                    "IN_PROGRESS",
                    "SUCCEEDED",
                    "SUCCEEDED",
                    "FAILED",
                    "TIMED_OUT",
                    "REJECTED",
                    "CANCELED",
                ]
            )
            queued = now - timedelta(seconds=rng.choice([5, 30, 59, 61, 90, 300]))
            s.add(
                JobExecution(
                    job_id=cid,
                    thing_name=t,
                    campaign_id=cid,
                    status=status,
                    status_details={},
                    document={},
                    version_number=2,
                    execution_number=rng.choice([1, 1, 2]),
                    queued_at=queued,
                    last_updated_at=queued + timedelta(seconds=rng.randint(0, 50)),
                    wave=0
                    if c.members.index(t) < wave_bounds(spec, len(c.members))[0]
                    else (1 if t in c.members[:bound] else 2),
                )
            )
        s.flush()
        counted = service.counts(s, c, spec, now)
        reference = count_members(spec, _reference(s, c, spec, now), now)
    by_thing = lambda ms: sorted(ms, key=lambda m: m.thing)  # noqa: E731
    assert counted.settled == reference.settled and counted.notified == reference.notified == len(chosen)
    assert (counted.in_flight, counted.succeeded, counted.queued_last_minute, counted.last_done) == (
        reference.in_flight,
        reference.succeeded,
        reference.queued_last_minute,
        reference.last_done,
    )
    assert by_thing(counted.retrying) == by_thing(reference.retrying) and counted.retrying
    assert counted.deferred == reference.deferred and counted.ready == reference.ready
    assert bool(counted.ready or counted.deferred) is (notified_share < 1)
    assert sum(counted.settled.values()) > 0 and counted.queued_last_minute > 0
    a, b = plan_tick(spec, counted, now), plan_tick(spec, reference, now)
    assert (a.queue, sorted(a.retry), a.pause_reason, a.advance_to, a.log) == (
        b.queue,
        sorted(b.retry),
        b.pause_reason,
        b.advance_to,
        b.log,
    )


def test_a_running_campaign_is_shown_from_its_last_tick_and_counted_afresh_when_that_stops(
    db: Database,
) -> None:
    """The API reads a running campaign's counts from the view its tick keeps (one row, not a
    count over every execution); a view no tick has renewed for VIEW_STALE_S is not served,
    nor is one of a campaign that is not ticked (paused)."""
    fleet(db, 20)
    cid = make(db)
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=T0)  # wave 1: 2 devices queued
    devices_answer(db, T0 + timedelta(seconds=1))

    def shown(at: datetime) -> tuple[dict[str, int], datetime]:
        with db.session() as s:
            body, counts_at = service.view(s, service.get(s, cid), at)
        return body["waves"][0]["counts"], counts_at

    assert shown(T0 + timedelta(seconds=1.2)) == ({"QUEUED": 2}, T0)  # as of the tick
    with db.session() as s:  # the wave passed: the campaign moved on, so the view is re-counted
        service.tick(s, campaign_id=cid, now=T0 + timedelta(seconds=1.8))
    counts, at = shown(T0 + timedelta(seconds=2))
    assert counts == {"SUCCEEDED": 2} and at == T0 + timedelta(seconds=1.8)
    with db.session() as s:  # wave 2 in flight, nothing moved: re-counted after VIEW_EVERY_S
        service.tick(s, campaign_id=cid, now=T0 + timedelta(seconds=2.5))
    assert shown(T0 + timedelta(seconds=3))[1] == T0 + timedelta(seconds=1.8)
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=T0 + timedelta(seconds=4))
    assert shown(T0 + timedelta(seconds=4))[1] == T0 + timedelta(seconds=4)
    stale = T0 + timedelta(seconds=4 + service.VIEW_STALE_S)
    assert shown(stale)[1] == stale  # no tick for VIEW_STALE_S: counted at the request
    with db.session() as s:
        service.pause(s, campaign_id=cid, actor="op", now=T0 + timedelta(seconds=5), reason="look")
    devices_answer(db, T0 + timedelta(seconds=5))
    with db.session() as s:
        body, at = service.view(s, service.get(s, cid), T0 + timedelta(seconds=6))
    assert at == T0 + timedelta(seconds=6) and body["waves"][1]["counts"].get("SUCCEEDED", 0) > 0


def test_a_busy_jobs_service_holds_notifications_and_says_so_once(db: Database) -> None:
    """Ticks while the jobs service is saturated notify nobody and record one "held" decision
    (not one per tick); the first tick with room notifies the wave as before."""
    fleet(db, 40)
    cid = make(db)
    busy = "96% of the last 5 s spent answering devices"
    for i in range(3):
        with db.session() as s:
            assert service.tick(s, campaign_id=cid, now=T0 + timedelta(seconds=i), busy=busy) == []
    with db.session() as s:
        assert s.scalar(select(JobExecution.id).where(JobExecution.job_id == cid).limit(1)) is None
        held = s.scalars(
            select(CampaignDecision.message).where(
                CampaignDecision.campaign_id == cid, CampaignDecision.kind == "held"
            )
        ).all()
    assert held == [f"jobs service busy ({busy}): no device notified this tick"]
    with db.session() as s:
        out = service.tick(s, campaign_id=cid, now=T0 + timedelta(seconds=3))
    assert len([o for o in out if o.topic.endswith("notify-next")]) == 4
