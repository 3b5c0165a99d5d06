"""The campaign planner, pure: waves, gates, soak, concurrency, rate ramp, blackout windows.

A simulated fleet of 200 devices runs whole campaigns tick by tick under an
injected clock, and the recorded timestamps are checked against every limit.
"""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from fleet_server.campaigns.cron import CronError, Window
from fleet_server.campaigns.planner import CampaignState, MemberState, order_members, plan_tick, wave_bounds
from fleet_server.campaigns.spec import CampaignSpec

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)  # a Monday


def spec(**kw: Any) -> CampaignSpec:
    base: dict[str, Any] = {
        "name": "c",
        "target": "classifier",
        "repository": "http://repo",
        "cohort": {"sku": "edge-cpu"},
        "waves": [{"percent": 5}, {"percent": 25}, {"percent": 100}],
    }
    base.update(kw)
    return CampaignSpec.model_validate(base)


def test_wave_bounds_and_seeded_membership() -> None:
    s = spec()
    assert wave_bounds(s, 200) == [10, 50, 200]
    assert wave_bounds(spec(waves=[{"count": 3}, {"count": 500}]), 200) == [3, 200]
    things = [f"car-{i:03d}" for i in range(200)]
    a, b, c = order_members(things, 7), order_members(list(reversed(things)), 7), order_members(things, 8)
    assert a == b and a != c and sorted(a) == things


def test_spec_validation() -> None:
    assert wave_bounds(spec(waves=[{"count": 3}, {"percent": 1}, {"percent": 100}]), 200) == [3, 3, 200]
    with pytest.raises(ValidationError, match="cumulative"):
        spec(waves=[{"percent": 50}, {"percent": 10}])
    with pytest.raises(ValidationError, match="exactly one"):
        spec(waves=[{"percent": 5, "count": 3}])
    with pytest.raises(ValidationError, match="time zone"):
        spec(blackouts=[{"cron": "0 8 * * 1-5", "duration_minutes": 60, "timezone": "Mars/Olympus"}])
    with pytest.raises(ValidationError, match="5 fields"):
        spec(blackouts=[{"cron": "0 8 * *", "duration_minutes": 60}])
    with pytest.raises(ValidationError, match="extra"):
        spec(surprise=True)


def test_cron_windows() -> None:
    w = Window.parse("*/15 8-17 * * 1-5", 1)
    assert w.is_open(datetime(2026, 11, 23, 9, 30, 40, tzinfo=UTC))  # a Monday
    assert not w.is_open(datetime(2026, 11, 22, 9, 30, tzinfo=UTC))  # Sunday
    either = Window.parse("0 0 1 * 0", 1)  # day of month and weekday both restricted: either matches
    assert either.is_open(datetime(2026, 11, 29, 0, 0, tzinfo=UTC))  # Sunday, not the 1st
    w = Window.parse("0 9 * * 1-5", 120, "Europe/Berlin")  # 09:00-11:00 Berlin = 08:00-10:00 UTC in winter
    assert w.is_open(datetime(2026, 11, 23, 8, 30, tzinfo=UTC))
    assert not w.is_open(datetime(2026, 11, 23, 10, 0, tzinfo=UTC))
    with pytest.raises(CronError, match="bad minute"):
        Window.parse("61 * * * *", 10)


def test_a_window_in_a_device_time_zone_keeps_real_time_across_dst_changes() -> None:
    """Berlin's clocks go from 02:00 to 03:00 on 2026-03-29 and back from 03:00 to 02:00 on
    2026-10-25. A window's duration is real time, and a firing in a skipped or repeated hour
    happens once, as Debian's cron does it."""
    berlin = ZoneInfo("Europe/Berlin")
    night = Window.parse("0 1 * * *", 120, "Europe/Berlin")  # 01:00 CET = 00:00 UTC, for two hours
    assert night.is_open(datetime(2026, 3, 29, 3, 30, tzinfo=berlin))  # 01:30 UTC: 90 real minutes in
    assert night.is_open(datetime(2026, 3, 29, 3, 59, tzinfo=berlin))
    assert not night.is_open(datetime(2026, 3, 29, 4, 0, tzinfo=berlin))  # 02:00 UTC: two hours gone
    skipped = Window.parse("30 2 * * *", 30, "Europe/Berlin")  # 02:30 does not exist that night
    assert skipped.opened_within(datetime(2026, 3, 29, 3, 10, tzinfo=berlin)) == datetime(
        2026, 3, 29, 3, 0, tzinfo=berlin
    )  # it fires when the clocks jump, and the window runs its full half hour from there
    assert skipped.is_open(datetime(2026, 3, 29, 3, 29, tzinfo=berlin))
    assert not skipped.is_open(datetime(2026, 3, 29, 3, 30, tzinfo=berlin))
    autumn = Window.parse("30 2 * * *", 45, "Europe/Berlin")  # 02:30 happens twice on 2026-10-25
    first = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 CEST
    assert autumn.is_open(first + timedelta(minutes=44))
    assert not autumn.is_open(first + timedelta(minutes=60))  # 02:30 CET: not a second opening
    assert not autumn.is_open(first + timedelta(minutes=80))


def members(n: int, status: str | None = None, at: datetime = T0) -> tuple[MemberState, ...]:
    return tuple(
        MemberState(
            f"d{i:03d}",
            status,
            at if status else None,
            at if status and status not in ("QUEUED", "IN_PROGRESS") else None,
        )
        for i in range(n)
    )


def test_first_tick_queues_the_first_wave_within_the_cap() -> None:
    d = plan_tick(spec(max_concurrent=4), CampaignState(0, T0, members(200)), T0)
    assert d.queue == ["d000", "d001", "d002", "d003"] and d.advance_to is None and not d.pause_reason


def test_error_gate_pauses_with_the_reason() -> None:
    ms = list(members(200))
    for i in range(50):
        ms[i] = MemberState(ms[i].thing, "FAILED" if i < 5 else "SUCCEEDED", T0, T0)
    d = plan_tick(spec(), CampaignState(1, T0, tuple(ms)), T0 + timedelta(minutes=1))
    assert d.pause_reason is not None and d.pause_reason.startswith("error gate: failure_rate")
    assert "0.1 <= 0.05 breached over 50 samples" in d.pause_reason
    assert d.queue == []


def test_success_gate_soak_and_manual_advance() -> None:
    s = spec(waves=[{"percent": 5, "soak_s": 600, "manual_advance": True}, {"percent": 100}])
    done = tuple(MemberState(m.thing, "SUCCEEDED", T0, T0) for m in members(10)) + members(190)[10:]
    state = CampaignState(0, T0, done)
    d = plan_tick(s, state, T0 + timedelta(minutes=5))
    assert d.advance_to is None and any("soaking, 300s left" in line for line in d.log)
    d = plan_tick(s, state, T0 + timedelta(minutes=11))
    assert d.advance_to is None and any("waiting for an operator" in line for line in d.log)
    d = plan_tick(s, replace(state, advance_requested=True), T0 + timedelta(minutes=11))
    assert d.advance_to == 1


def test_wave_that_ends_below_its_success_gate_pauses() -> None:
    s = spec(
        waves=[{"count": 10}, {"count": 100}],
        error_gate={
            "conditions": [
                {"metric": "failure_rate", "comparator": "<=", "threshold": 0.5, "min_samples": 10}
            ]
        },
    )
    ms = tuple(MemberState(f"d{i:03d}", "FAILED" if i == 0 else "SUCCEEDED", T0, T0) for i in range(10))
    d = plan_tick(s, CampaignState(0, T0, ms + members(100)[10:]), T0)
    assert d.pause_reason is not None and "finished below its success gate" in d.pause_reason


# ---- a whole campaign, simulated ------------------------------------------------------------------


def simulate(
    s: CampaignSpec,
    n: int,
    *,
    fail: set[str] = frozenset(),
    minutes: int = 600,  # type: ignore[assignment]
    seed: int = 1,
) -> dict[str, Any]:
    """Tick every 30 s; a notified device starts at once and finishes 1-3 minutes later."""
    rng = random.Random(seed)
    things = order_members([f"car-{i:03d}" for i in range(n)], s.seed)
    status: dict[str, MemberState] = {t: MemberState(t, None) for t in things}
    finish_at: dict[str, datetime] = {}
    wave, wave_started, now = 0, T0, T0
    queued_log: list[tuple[datetime, str]] = []
    in_flight_log: list[int] = []
    waves_log: list[tuple[datetime, int]] = [(T0, 0)]
    outcome = "running"
    for _ in range(minutes * 2):
        for t, at in list(finish_at.items()):
            if now >= at:
                status[t] = MemberState(t, "FAILED" if t in fail else "SUCCEEDED", status[t].queued_at, at)
                del finish_at[t]
        d = plan_tick(s, CampaignState(wave, wave_started, tuple(status[t] for t in things)), now)
        for t in d.queue:
            status[t] = MemberState(t, "IN_PROGRESS", now)
            finish_at[t] = now + timedelta(seconds=rng.randint(60, 180))
            queued_log.append((now, t))
        in_flight_log.append(sum(1 for m in status.values() if m.status == "IN_PROGRESS"))
        if d.pause_reason:
            outcome = f"paused: {d.pause_reason}"
            break
        if d.complete:
            outcome = "complete"
            break
        if d.advance_to is not None:
            wave, wave_started = d.advance_to, now
            waves_log.append((now, wave))
        now += timedelta(seconds=30)
    return {
        "outcome": outcome,
        "queued": queued_log,
        "in_flight": in_flight_log,
        "waves": waves_log,
        "order": things,
        "status": status,
        "end": now,
    }


def test_a_200_device_campaign_holds_every_limit() -> None:
    s = spec(
        waves=[{"percent": 5, "soak_s": 300}, {"percent": 25}, {"percent": 100}],
        max_concurrent=20,
        rate={
            "maximum_per_minute": 40,
            "base_rate_per_minute": 5,
            "increment_factor": 2,
            "increase_after_succeeded": 10,
        },
        blackouts=[{"cron": "0 12 * * *", "duration_minutes": 60}],  # lunch: 12:00-13:00 UTC
        seed=42,
    )
    r = simulate(s, 200)
    assert r["outcome"] == "complete", r["outcome"]
    assert len(r["queued"]) == 200 and len({t for _, t in r["queued"]}) == 200  # each device exactly once
    assert max(r["in_flight"]) <= 20  # concurrency cap
    times = [at for at, _ in r["queued"]]
    for at in times:  # rate: never more than 40 queued in any minute
        assert sum(1 for x in times if at - timedelta(minutes=1) < x <= at) <= 40
    first_minute = [x for x in times if x < T0 + timedelta(minutes=1)]
    assert len(first_minute) <= 5  # the ramp starts at the base rate
    assert not [x for x in times if 12 <= x.hour < 13]  # nothing notified in the blackout window
    assert [w for _, w in r["waves"]] == [0, 1, 2]  # waves in order
    order = r["order"]
    first_wave = {t for t in order[:10]}
    wave2_start = r["waves"][1][0]
    assert {t for at, t in r["queued"] if at < wave2_start} == first_wave  # wave 1 alone until it passed
    wave1_done = max(m.finished_at for t, m in r["status"].items() if t in first_wave)
    assert wave2_start - wave1_done >= timedelta(seconds=300)  # soak


def test_a_failing_wave_stops_the_campaign() -> None:
    s = spec(
        waves=[{"percent": 10}, {"percent": 100}],
        max_concurrent=50,
        seed=3,
        error_gate={
            "conditions": [
                {"metric": "failure_rate", "comparator": "<=", "threshold": 0.05, "min_samples": 10}
            ]
        },
    )
    order = order_members([f"car-{i:03d}" for i in range(200)], 3)
    bad = set(order[:20:4])  # 5 of the first wave's 20 devices fail
    r = simulate(s, 200, fail=bad)
    assert r["outcome"].startswith("paused: error gate: failure_rate")
    assert len(r["queued"]) == 20  # nothing beyond the first wave was notified


# ---- retries, server-side preconditions, schedule ---------------------------------------------------


def test_retries_per_failure_type_with_exponential_backoff() -> None:
    s = spec(
        waves=[{"count": 3}],
        retry={
            "criteria": [{"failure_type": "TIMED_OUT", "retries": 2}, {"failure_type": "ALL", "retries": 1}],
            "backoff_s": 60,
            "backoff_factor": 3,
        },
    )
    assert s.retry.allowed("TIMED_OUT") == 2 and s.retry.allowed("FAILED") == 1
    assert s.retry.allowed("REJECTED") == 0  # a refusal is final
    assert [s.retry.delay(a).total_seconds() for a in (1, 2, 3)] == [60, 180, 540]
    ms = (
        MemberState("a", "TIMED_OUT", T0, T0, attempt=1),
        MemberState("b", "FAILED", T0, T0, attempt=1),
        MemberState("c", "REJECTED", T0, T0, attempt=1),
    )
    d = plan_tick(s, CampaignState(0, T0, ms), T0 + timedelta(seconds=30))
    assert d.retry == [] and not d.complete and not d.pause_reason  # still backing off: not judged yet
    d = plan_tick(s, CampaignState(0, T0, ms), T0 + timedelta(seconds=60))
    assert d.retry == ["a", "b"]
    # second failures: a (TIMED_OUT, 2 retries) waits 180 s more; b (FAILED, 1 retry) is final now
    ms2 = (
        MemberState("a", "TIMED_OUT", T0, T0 + timedelta(minutes=2), attempt=2),
        MemberState("b", "FAILED", T0, T0 + timedelta(minutes=2), attempt=2),
        ms[2],
    )
    d = plan_tick(s, CampaignState(0, T0, ms2), T0 + timedelta(minutes=4))
    assert d.retry == []
    d = plan_tick(s, CampaignState(0, T0, ms2), T0 + timedelta(minutes=5))
    assert d.retry == ["a"]
    ms3 = (MemberState("a", "TIMED_OUT", T0, T0 + timedelta(minutes=6), attempt=3), *ms2[1:])
    d = plan_tick(s, CampaignState(0, T0, ms3), T0 + timedelta(hours=5))
    assert d.retry == [] and d.pause_reason is not None  # every retry spent: now the gate judges


def test_retries_count_against_the_concurrency_cap() -> None:
    s = spec(
        waves=[{"count": 10}], max_concurrent=3, retry={"criteria": [{"failure_type": "ALL", "retries": 1}]}
    )
    ms = (
        MemberState("a", "FAILED", T0, T0),
        MemberState("b", "IN_PROGRESS", T0),
        *(MemberState(f"n{i}", None) for i in range(8)),
    )
    d = plan_tick(s, CampaignState(0, T0, ms), T0 + timedelta(hours=1))
    assert d.retry == ["a"] and d.queue == ["n0"]  # 3 - 1 in flight = 2: the retry first


def test_server_preconditions_defer_devices_without_holding_the_wave() -> None:
    pre = spec().server_preconditions.model_validate(
        {"online_within_s": 300, "firmware_min": "2.0.0", "regions": ["eu"]}
    )
    now = T0
    assert pre.unmet(now=now, last_seen_at=None, firmware="2.1.0", region="eu") == "offline"
    assert (
        pre.unmet(now=now, last_seen_at=now - timedelta(minutes=6), firmware="2.1.0", region="eu")
        == "offline"
    )
    assert pre.unmet(now=now, last_seen_at=now, firmware="1.9.9", region="eu") == "firmware 1.9.9 below 2.0.0"
    assert pre.unmet(now=now, last_seen_at=now, firmware=None, region="eu") == (
        "firmware unknown (needs 2.0.0; register it with the device)"  # not "below": nobody said
    )
    assert (
        pre.unmet(now=now, last_seen_at=now, firmware="banana", region="eu")
        == "firmware 'banana' is not a version"
    )
    assert pre.unmet(now=now, last_seen_at=now, firmware="2.0.0", region="us") == "region 'us' not allowed"
    assert pre.unmet(now=now, last_seen_at=now, firmware="2.0.0", region="eu") is None
    with pytest.raises(ValidationError, match="semantic version"):
        spec(server_preconditions={"firmware_min": "two"})

    s = spec(
        waves=[{"count": 4}, {"count": 8}],
        success_gate={
            "conditions": [{"metric": "success_rate", "comparator": ">=", "threshold": 1.0, "min_samples": 1}]
        },
    )
    ms = [MemberState(f"d{i}", None, unmet="offline" if i in (1, 5) else None) for i in range(8)]
    d = plan_tick(s, CampaignState(0, T0, tuple(ms)), T0)
    assert d.queue == ["d0", "d2", "d3"] and any(
        "deferred" in line and "offline (1: d1)" in line
        for line in d.log  # which device, by name
    )
    done = [MemberState(m.thing, "SUCCEEDED", T0, T0) if m.unmet is None else m for m in ms[:4]] + ms[4:]
    d = plan_tick(s, CampaignState(0, T0, tuple(done)), T0 + timedelta(minutes=1))
    assert d.advance_to == 1  # the offline device does not hold wave 1 back
    # it comes online in wave 2 and is notified then
    done[1] = MemberState("d1", None)
    d = plan_tick(s, CampaignState(1, T0, tuple(done)), T0 + timedelta(minutes=2))
    assert d.queue == ["d1", "d4", "d6", "d7"]
    # an all-deferred wave waits rather than failing its success gate
    d = plan_tick(
        s, CampaignState(0, T0, tuple(MemberState(f"d{i}", None, unmet="offline") for i in range(8))), T0
    )
    assert d.queue == [] and d.pause_reason is None and not d.complete
    assert any("offline (4: d0, d1, d2 and 1 more)" in line for line in d.log)  # a wave of 4, named


def test_schedule_start_and_end_behaviour() -> None:
    from fleet_server.campaigns.planner import plan_start

    start, end = T0 + timedelta(hours=2), T0 + timedelta(hours=4)
    s = spec(schedule={"start_at": start.isoformat(), "end_at": end.isoformat(), "end_behavior": "cancel"})
    assert not plan_start(s, T0) and plan_start(s, start)
    d = plan_tick(s, CampaignState(0, start, members(200)), start)
    assert d.queue and d.end is None
    d = plan_tick(s, CampaignState(0, start, members(200)), end)
    assert d.end == "cancel" and d.queue == [] and "end time" in d.log[-1]
    with pytest.raises(ValidationError, match="time zone"):
        spec(schedule={"start_at": "2026-12-01T02:00:00"})
    with pytest.raises(ValidationError, match="after start_at"):
        spec(schedule={"start_at": end.isoformat(), "end_at": start.isoformat()})
    with pytest.raises(ValidationError, match="one retry criterion"):
        spec(
            retry={"criteria": [{"failure_type": "ALL", "retries": 1}, {"failure_type": "ALL", "retries": 2}]}
        )


def test_the_readme_campaign_example_is_a_valid_spec() -> None:
    import json
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", readme, re.S)]
    campaigns = [b for b in blocks if "waves" in b]
    assert campaigns, "the README shows a campaign"
    s = CampaignSpec.model_validate(campaigns[0])
    assert s.retry.allowed("TIMED_OUT") == 2 and s.cohort.groups == ["pilot"]


def test_rate_ramp_after_succeeded_or_after_notified() -> None:
    by_success = spec(
        rate={"base_rate_per_minute": 10, "increase_after_succeeded": 20, "maximum_per_minute": 70}
    )
    assert [by_success.rate.per_minute(n, notified=999) for n in (0, 19, 20, 40, 60, 1000)] == [
        10,
        10,
        20,
        40,
        70,
        70,
    ]
    by_notified = spec(
        rate={"base_rate_per_minute": 10, "increase_after_notified": 30, "increment_factor": 1.5}
    )
    assert [by_notified.rate.per_minute(0, notified=n) for n in (0, 30, 60)] == [10, 15, 22]
    # the planner feeds it the devices notified so far: 30 notified, none finished → 15 a minute
    ms = tuple(
        MemberState(f"d{i:03d}", "IN_PROGRESS" if i < 30 else None, T0 - timedelta(minutes=5))
        for i in range(200)
    )
    d = plan_tick(
        spec(rate={"base_rate_per_minute": 10, "increase_after_notified": 30, "increment_factor": 1.5}),
        CampaignState(2, T0, ms),
        T0,
    )
    assert len(d.queue) == 15


# ---- relative wave gates: updated devices against the cohort's others --------------------------


def _cohort(rng: random.Random, updated_p95: float, others_p95: float, n: int = 40) -> Any:
    from shared.gates import Sample

    def side(center: float) -> dict[str, list[Sample]]:
        return {"p95_ms": [Sample(T0, center * rng.lognormvariate(0, 0.1)) for _ in range(n)]}

    return side(updated_p95), side(others_p95)


def test_a_wave_whose_updated_devices_are_50_percent_slower_pauses_and_an_equal_one_advances() -> None:
    s = spec(
        waves=[{"percent": 10}, {"percent": 100}],
        compare=[{"metric": "p95_ms", "tolerance": 0.2, "min_devices": 10}],
        compare_wait_s=600,
    )
    done = tuple(
        replace(m, status="SUCCEEDED", finished_at=T0) if i < 50 else m for i, m in enumerate(members(500))
    )
    state = CampaignState(0, T0, done)
    now = T0 + timedelta(seconds=5)
    rng = random.Random(1)
    slow = plan_tick(s, state, now, cohort=lambda: _cohort(rng, 30.0, 20.0))
    assert slow.advance_to is None and slow.pause_reason is not None
    assert "updated devices worse than the rest of the cohort" in slow.pause_reason
    assert "p95_ms vs baseline" in slow.pause_reason and "x) worse beyond tolerance 0.2" in slow.pause_reason
    equal = plan_tick(s, state, now, cohort=lambda: _cohort(rng, 20.0, 20.0))
    assert equal.advance_to == 1 and equal.pause_reason is None
    assert any("no worse than the rest of the cohort" in line for line in equal.log)
    # too few devices reporting: hold, then pause for a person after compare_wait_s
    thin = plan_tick(s, state, now, cohort=lambda: _cohort(rng, 30.0, 20.0, n=3))
    assert thin.advance_to is None and thin.pause_reason is None
    assert any("3 candidate and 3 baseline samples" in line for line in thin.log)
    late = plan_tick(s, state, T0 + timedelta(seconds=700), cohort=lambda: _cohort(rng, 30.0, 20.0, n=3))
    assert late.pause_reason is not None and "waiting for a person" in late.pause_reason
    # an operator's next-wave goes on regardless; the cohort is not even loaded
    forced = plan_tick(s, replace(state, advance_requested=True), now, cohort=None)
    assert forced.advance_to == 1
    # the comparison is loaded only when a wave waits on it
    calls: list[int] = []

    def counted() -> Any:
        calls.append(1)
        return _cohort(rng, 20.0, 20.0)

    plan_tick(s, CampaignState(0, T0, members(500)), now, cohort=counted)
    assert not calls
    with pytest.raises(ValidationError, match="quality_key"):
        spec(compare=[{"metric": "quality"}])


def test_a_busy_jobs_service_holds_new_devices_and_nothing_else() -> None:
    """While the jobs service is saturated no device is notified or retried (each would wait
    past its request timeout and ask again); the gates, the waves and completion still move."""
    fresh = CampaignState(0, T0, members(200))
    d = plan_tick(spec(max_concurrent=4), fresh, T0, busy="95% of the last 5 s")
    assert d.queue == [] and d.retry == [] and d.held is not None and "95% of the last 5 s" in d.held
    assert plan_tick(spec(max_concurrent=4), fresh, T0).queue == ["d000", "d001", "d002", "d003"]
    # a failed device due for its retry waits too
    s = spec(retry={"criteria": [{"failure_type": "FAILED", "retries": 1}], "backoff_s": 5})
    ms = list(members(200))
    ms[0] = MemberState(ms[0].thing, "FAILED", T0, T0)
    later = T0 + timedelta(minutes=1)
    assert plan_tick(s, CampaignState(0, T0, tuple(ms)), later).retry == ["d000"]
    held = plan_tick(s, CampaignState(0, T0, tuple(ms)), later, busy="busy")
    assert held.retry == [] and held.held is not None
    # a retry still in its backoff, and no device left to notify: nothing is held
    only_retry = tuple(m if i == 0 else MemberState(m.thing, "SUCCEEDED", T0, T0) for i, m in enumerate(ms))
    waiting = plan_tick(s, CampaignState(0, T0, only_retry), T0 + timedelta(seconds=1), busy="busy")
    assert waiting.retry == [] and waiting.held is None
    # a wave whose devices are all done advances, busy or not; nothing to notify, nothing held
    done = tuple(MemberState(m.thing, "SUCCEEDED", T0, T0) for m in members(10)) + members(200)[10:]
    d = plan_tick(spec(), CampaignState(0, T0, done), T0 + timedelta(minutes=5), busy="busy")
    assert d.advance_to == 1 and d.held is None
    # the error gate still pauses
    bad = tuple(MemberState(m.thing, "FAILED", T0, T0) for m in members(10)) + members(200)[10:]
    d = plan_tick(spec(), CampaignState(0, T0, bad), T0 + timedelta(minutes=1), busy="busy")
    assert d.pause_reason is not None and d.pause_reason.startswith("error gate")


def test_a_high_rate_is_paced_over_the_minute_not_spent_in_one_tick() -> None:
    """60,000 a minute opens with two seconds' worth (2,000) and then about a second's at each
    tick a second apart; a tick may always queue 100 (so a rate of 100 a minute or less is
    queued at once, as before pacing)."""
    s = spec(waves=[{"percent": 100}], max_concurrent=50_000, rate={"maximum_per_minute": 60_000})
    fleet = members(20_000)
    first = plan_tick(s, CampaignState(0, T0, fleet), T0)
    assert len(first.queue) == 2000
    now = T0 + timedelta(seconds=1)
    queued = tuple(MemberState(m.thing, "QUEUED", T0) if i < 2000 else m for i, m in enumerate(fleet))
    assert len(plan_tick(s, CampaignState(0, T0, queued), now).queue) == 1000
    later = T0 + timedelta(seconds=30)  # a long pause since the last queueing: still two seconds' worth
    assert len(plan_tick(s, CampaignState(0, T0, queued), later).queue) == 2000
    small = spec(waves=[{"percent": 100}], max_concurrent=500, rate={"maximum_per_minute": 300})
    assert len(plan_tick(small, CampaignState(0, T0, members(1000)), T0).queue) == 100
    slow = spec(waves=[{"percent": 100}], max_concurrent=500, rate={"maximum_per_minute": 30})
    assert len(plan_tick(slow, CampaignState(0, T0, members(1000)), T0).queue) == 30
