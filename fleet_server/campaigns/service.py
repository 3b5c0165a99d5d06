"""Campaign lifecycle and the scheduler tick. Keyword-only functions inside the caller's
transaction; `tick` returns the MQTT notifications to publish after the commit.

States: draft → waiting_for_approval → scheduled → running ⇄ paused → completed | canceled.
"""

from __future__ import annotations

import bisect
import logging
import uuid
from collections import Counter
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from fleet_server.campaigns.models import Campaign, CampaignDecision, CampaignView
from fleet_server.campaigns.planner import (
    FAILURES,
    TRANSIENT_DEFERRAL,
    CohortSnapshots,
    Counts,
    MemberState,
    order_members,
    plan_start,
    plan_tick,
    retry_pending,
    wave_bounds,
)
from fleet_server.campaigns.spec import CampaignSpec, Cohort
from fleet_server.devices.models import Device, DeviceGroup, GroupMember
from fleet_server.errors import FleetError, NotFoundError
from fleet_server.jobs import protocol
from fleet_server.jobs.models import ExecutionEvent, JobExecution
from fleet_server.webhooks import service as webhooks
from shared.gates import Sample
from shared.iotjobs import PENDING, JobStatus
from shared.jobdoc import JobDocument


class Lifecycle(StrEnum):
    DRAFT = "draft"
    WAITING_FOR_APPROVAL = "waiting_for_approval"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELED = "canceled"


log = logging.getLogger("tidegate.campaigns")
S = Lifecycle
#: How an operator's refused move is said ("campaign c-1 is completed; it cannot be paused").
VERB = {
    S.WAITING_FOR_APPROVAL: "submitted",
    S.SCHEDULED: "approved",
    S.RUNNING: "resumed",
    S.PAUSED: "paused",
    S.CANCELED: "canceled",
    S.COMPLETED: "completed",
    S.DRAFT: "made a draft",
}


class CampaignError(FleetError):
    """An operation the campaign's state does not allow (or a spec naming what is not there)."""

    http_status = 409


class CampaignNotFoundError(CampaignError, NotFoundError):
    http_status = NotFoundError.http_status


#: Decision kinds that are webhook events (fleet_server.webhooks.service.EVENTS).
EVENT_OF_KIND = {
    "scheduled": "campaign.approved",
    "running": "campaign.running",
    "advanced": "campaign.advanced",
    "paused": "campaign.paused",
    "completed": "campaign.completed",
    "canceled": "campaign.canceled",
}


def _log(session: Session, c: Campaign, now: datetime, kind: str, actor: str, message: str) -> None:
    session.add(CampaignDecision(campaign_id=c.id, at=now, kind=kind, actor=actor, message=message))
    # The decision log, also as a log line: what happened to a campaign shows in the server's
    # log with everything else (approvals, gates, pauses, completion).
    log.info(
        "campaign %s %s: %s",
        c.id,
        kind,
        message,
        extra={"event": f"campaign.{kind}", "campaign": c.id, "actor": actor},
    )
    if event := EVENT_OF_KIND.get(kind):  # queued in this transaction: sent only if it commits
        data = {"campaign_id": c.id, "name": c.name, "state": c.state, "wave": c.wave, "actor": actor}
        webhooks.emit(session, event, {**data, "message": message}, now)


#: A running campaign's view is re-counted by its tick at most this often (and whenever the
#: tick moved the campaign on); the API serves it in between.
VIEW_EVERY_S = 2.0
#: A view older than this is not served: no replica is ticking the campaign, so the API
#: counts afresh rather than show counts that stopped.
VIEW_STALE_S = 10.0
SERVED_FROM_VIEW = frozenset({Lifecycle.SCHEDULED.value, Lifecycle.RUNNING.value})


def count_view(session: Session, c: Campaign) -> dict[str, Any]:
    """Per-wave and per-region execution counts and the top errors, counted by the database:
    three grouped queries over the campaign's executions."""
    spec = CampaignSpec.model_validate(c.spec)
    bounds = wave_bounds(spec, len(c.members))
    per_wave: dict[int, Counter[str]] = {}
    for wave, status, n in session.execute(
        select(JobExecution.wave, JobExecution.status, func.count())
        .where(JobExecution.job_id == c.id)
        .group_by(JobExecution.wave, JobExecution.status)
    ):
        per_wave.setdefault(wave or 0, Counter())[status] += n
    waves, start = [], 0
    for i, end in enumerate(bounds):
        counts = per_wave.get(i, Counter())
        if (waiting := end - start - sum(counts.values())) > 0:
            counts["NOT_STARTED"] = waiting
        waves.append({"index": i, "size": end - start, "counts": dict(counts)})
        start = end
    regions: dict[str, Counter[str]] = {}
    for region, status, n in session.execute(
        select(Device.region, JobExecution.status, func.count())
        .join(Device, Device.thing_name == JobExecution.thing_name)
        .where(JobExecution.job_id == c.id)
        .group_by(Device.region, JobExecution.status)
    ):
        regions.setdefault(region or "unknown", Counter())[status] += n
    errors = Counter(
        (details or {}).get("reason", status)[:80]
        for status, details in session.execute(
            select(JobExecution.status, JobExecution.status_details).where(
                JobExecution.job_id == c.id, JobExecution.status.in_(sorted(FAILURES))
            )
        )
    )
    return {
        "waves": waves,
        "regions": {k: dict(v) for k, v in regions.items()},
        "errors": dict(errors.most_common(10)),
    }


def refresh_view(session: Session, c: Campaign, now: datetime) -> None:
    row = session.get(CampaignView, c.id)
    if row is None:
        session.add(CampaignView(campaign_id=c.id, at=now, body=count_view(session, c)))
    else:
        row.at, row.body = now, count_view(session, c)


def view(session: Session, c: Campaign, now: datetime) -> tuple[dict[str, Any], datetime]:
    """The counts to show and when they were taken: a running campaign's from its last tick
    (when fresh), any other's counted now (a paused or finished campaign is not ticked, and
    its in-flight devices still report)."""
    if c.state in SERVED_FROM_VIEW:
        row = session.get(CampaignView, c.id)
        if row is not None and (now - row.at).total_seconds() < VIEW_STALE_S:
            return row.body, row.at
    return count_view(session, c), now


def get(session: Session, campaign_id: str) -> Campaign:
    c = session.get(Campaign, campaign_id)
    if c is None:
        raise CampaignNotFoundError(f"no campaign {campaign_id!r}")
    return c


def create(session: Session, *, spec: CampaignSpec, actor: str, now: datetime) -> Campaign:
    for group in spec.cohort.groups or []:
        if session.get(DeviceGroup, group) is None:
            raise CampaignError(f"the cohort names group {group!r}, which does not exist")
    c = Campaign(
        id=f"c-{uuid.uuid4().hex[:12]}",
        name=spec.name,
        state=S.DRAFT.value,
        spec=spec.model_dump(mode="json"),
        members=[],
        wave=0,
        advance_requested=False,
        created_by=actor,
        created_at=now,
    )
    session.add(c)
    session.flush()
    _log(session, c, now, "created", actor, f"campaign {spec.name!r} created for {spec.cohort.sku}")
    return c


def _move(
    session: Session, c: Campaign, allowed: set[S], to: S, *, actor: str, now: datetime, why: str
) -> None:
    if S(c.state) not in allowed:
        state = c.state.replace("_", " ")
        raise CampaignError(f"campaign {c.id} is {state}; it cannot be {VERB[to]}")
    if to is not S.PAUSED:
        c.paused_reason = None  # a canceled or resumed campaign no longer reads "Paused: …"
    c.state = to.value
    _log(session, c, now, to.value, actor, why)


def submit(session: Session, *, campaign_id: str, actor: str, now: datetime) -> Campaign:
    c = get(session, campaign_id)
    _move(session, c, {S.DRAFT}, S.WAITING_FOR_APPROVAL, actor=actor, now=now, why="submitted for approval")
    return c


def approve(
    session: Session, *, campaign_id: str, actor: str, now: datetime, override_reason: str | None = None
) -> Campaign:
    """Approve for start. The bench gate: the release must have a passing HIL report for the
    cohort's SKU, unless the (admin) approver overrides it with a reason, which is recorded."""
    from fleet_server.releases.service import bench_gate

    c = get(session, campaign_id)
    spec = CampaignSpec.model_validate(c.spec)
    blocked = bench_gate(session, target=spec.target, sku=spec.cohort.sku)
    if blocked is not None and S(c.state) is S.WAITING_FOR_APPROVAL:
        if not override_reason:
            raise CampaignError(
                f"cannot approve campaign {c.id}: {blocked}; an admin may override with a reason"
            )
        _log(session, c, now, "override", actor, f"bench gate overridden ({blocked}): {override_reason}")
    _move(session, c, {S.WAITING_FOR_APPROVAL}, S.SCHEDULED, actor=actor, now=now, why=f"approved by {actor}")
    c.approved_by = actor
    return c


def pause(session: Session, *, campaign_id: str, actor: str, now: datetime, reason: str) -> Campaign:
    c = get(session, campaign_id)
    _move(session, c, {S.RUNNING, S.SCHEDULED}, S.PAUSED, actor=actor, now=now, why=reason)
    c.paused_reason = reason
    return c


def resume(session: Session, *, campaign_id: str, actor: str, now: datetime) -> Campaign:
    c = get(session, campaign_id)
    _move(
        session,
        c,
        {S.PAUSED},
        S.RUNNING if c.started_at else S.SCHEDULED,
        actor=actor,
        now=now,
        why="resumed",
    )
    c.paused_reason = None
    return c


def next_wave(session: Session, *, campaign_id: str, actor: str, now: datetime) -> Campaign:
    c = get(session, campaign_id)
    if S(c.state) is not S.RUNNING:
        raise CampaignError(f"campaign {c.id} is {c.state}; only a running campaign has a next wave")
    waves = len(CampaignSpec.model_validate(c.spec).waves)
    if c.wave >= waves - 1:
        raise CampaignError(f"campaign {c.id} is on its last wave ({waves} of {waves}): there is no next one")
    c.advance_requested = True
    _log(session, c, now, "next_wave", actor, "operator asked to start the next wave")
    return c


def cancel(
    session: Session, *, campaign_id: str, actor: str, now: datetime, force: bool
) -> list[protocol.Outgoing]:
    """Cancel: queued executions become CANCELED; with `force`, in-progress ones too."""
    c = get(session, campaign_id)
    _move(
        session,
        c,
        {S.DRAFT, S.WAITING_FOR_APPROVAL, S.SCHEDULED, S.RUNNING, S.PAUSED},
        S.CANCELED,
        actor=actor,
        now=now,
        why="canceled" + (" (forced)" if force else ""),
    )
    c.finished_at = now
    return _cancel_executions(session, c, now, force=force)


def _cancel_executions(
    session: Session, c: Campaign, now: datetime, *, force: bool
) -> list[protocol.Outgoing]:
    states = [JobStatus.QUEUED.value] + ([JobStatus.IN_PROGRESS.value] if force else [])
    things: set[str] = set()
    for ex in session.scalars(
        select(JobExecution).where(JobExecution.job_id == c.id, JobExecution.status.in_(states))
    ).all():
        session.add(
            ExecutionEvent(
                execution_id=ex.id,
                at=now,
                from_status=ex.status,
                to_status=JobStatus.CANCELED.value,
                source="server",
                details={},
            )
        )
        ex.status, ex.version_number, ex.last_updated_at = (
            JobStatus.CANCELED.value,
            ex.version_number + 1,
            now,
        )
        things.add(ex.thing_name)
    out: list[protocol.Outgoing] = []
    for thing in sorted(things):
        out += protocol.notifications(session, thing, now)
    return out


def cohort_things(session: Session, cohort: Cohort) -> list[str]:
    q = select(Device).where(Device.sku == cohort.sku)
    if cohort.regions:
        q = q.where(Device.region.in_(cohort.regions))
    if cohort.customers:
        q = q.where(Device.customer.in_(cohort.customers))
    if cohort.things:
        q = q.where(Device.thing_name.in_(cohort.things))
    if cohort.groups:
        q = q.where(
            Device.thing_name.in_(
                select(GroupMember.thing_name).where(GroupMember.group_name.in_(cohort.groups))
            )
        )
    devices = session.scalars(q).all()
    return [
        d.thing_name
        for d in devices
        if all(str((d.attributes or {}).get(k)) == v for k, v in cohort.attributes.items())
    ]


def tick(
    session: Session, *, campaign_id: str, now: datetime, busy: str | None = None
) -> list[protocol.Outgoing]:
    """One planner step for one campaign: returns the notifications to publish after commit.
    `busy`: the jobs service is saturated, and why (`planner.plan_tick` holds new devices)."""
    c = get(session, campaign_id)
    before = (c.state, c.wave)
    out = _tick(session, c, now, busy)
    if c.members:  # the campaign's view, re-counted after this tick's changes (VIEW_EVERY_S)
        row = session.get(CampaignView, c.id)
        moved = (c.state, c.wave) != before
        if row is None or moved or (now - row.at).total_seconds() >= VIEW_EVERY_S:
            session.flush()
            refresh_view(session, c, now)
    return out


def _tick(session: Session, c: Campaign, now: datetime, busy: str | None) -> list[protocol.Outgoing]:
    spec = CampaignSpec.model_validate(c.spec)
    if S(c.state) is S.SCHEDULED:
        if not plan_start(spec, now):
            return []
        c.state, c.started_at, c.wave, c.wave_started_at = S.RUNNING.value, now, 0, now
        c.members = order_members(cohort_things(session, spec.cohort), spec.seed)
        _log(
            session,
            c,
            now,
            "started",
            "scheduler",
            f"started with {len(c.members)} devices (seed {spec.seed})",
        )
    if S(c.state) is not S.RUNNING:
        return []
    if spec.targeting == "continuous":  # devices that joined the cohort later join the last waves
        known = set(c.members)
        joined = [t for t in order_members(cohort_things(session, spec.cohort), spec.seed) if t not in known]
        if joined:
            c.members = [*c.members, *joined]
            _log(session, c, now, "joined", "scheduler", f"{len(joined)} device(s) joined the cohort")
    state = counts(session, c, spec, now)
    decision = plan_tick(spec, state, now, cohort=lambda: cohort_beacons(session, c, spec), busy=busy)
    out: list[protocol.Outgoing] = []
    document = JobDocument(
        operation="tidegate.install",
        target=spec.target,
        repository=spec.repository,
        skus=[spec.cohort.sku],
        campaign=c.id,
        preconditions=spec.preconditions,
    )
    doc = document.model_dump(mode="json", exclude_none=True)
    by_wave: dict[int, list[str]] = {}
    if decision.queue:
        bounds, position = wave_bounds(spec, len(c.members)), {t: i for i, t in enumerate(c.members)}
        for thing in decision.queue:
            by_wave.setdefault(bisect.bisect_right(bounds, position[thing]), []).append(thing)
    for wave, things in sorted(by_wave.items()):
        out += protocol.create_executions(
            session,
            things,
            c.id,
            doc,
            now,
            campaign_id=c.id,
            in_progress_timeout_min=spec.in_progress_timeout_min,
            wave=wave,
        )
    for thing in decision.retry:
        failed = session.scalars(
            select(JobExecution).where(JobExecution.job_id == c.id, JobExecution.thing_name == thing)
        ).one()
        allowed = spec.retry.allowed(failed.status)
        out += protocol.requeue_execution(
            session,
            failed,
            now,
            reason=f"attempt {failed.execution_number + 1} of {allowed + 1} after {failed.status}",
        )
    if decision.retry:
        _log(
            session, c, now, "retried", "scheduler", f"retrying {len(decision.retry)} device(s) after backoff"
        )
    if decision.queue:
        _log(session, c, now, "queued", "scheduler", next(m for m in decision.log if "notifying" in m))
    if decision.held is not None:  # logged when a hold begins, not on every tick it lasts
        last = _last_decision(session, c, ("queued", "held"))
        if last is None or last.kind != "held":
            _log(session, c, now, "held", "scheduler", decision.held)
    deferred = next((m for m in decision.log if "deferred by server-side preconditions" in m), None)
    if deferred is not None:  # logged when the reasons change, not on every tick
        last = _last_decision(session, c, ("deferred",))
        if last is None or last.message != deferred:
            _log(session, c, now, "deferred", "scheduler", deferred)
    if decision.end is not None:
        c.state, c.finished_at = (S.COMPLETED if decision.end == "stop_rollout" else S.CANCELED).value, now
        _log(session, c, now, c.state, "scheduler", decision.log[-1])
        if decision.end != "stop_rollout":
            out += _cancel_executions(session, c, now, force=decision.end == "force_cancel")
    if decision.advance_to is not None:
        c.wave, c.wave_started_at, c.advance_requested = decision.advance_to, now, False
        _log(session, c, now, "advanced", "scheduler", decision.log[-1])
    if decision.pause_reason is not None:
        c.state, c.paused_reason = S.PAUSED.value, decision.pause_reason
        _log(session, c, now, "paused", "scheduler", decision.pause_reason)
    if decision.complete:
        c.state, c.finished_at = S.COMPLETED.value, now
        _log(session, c, now, "completed", "scheduler", decision.log[-1])
    return out


def _last_decision(session: Session, c: Campaign, kinds: tuple[str, ...]) -> CampaignDecision | None:
    """The campaign's latest decision of one of `kinds`: what a decision logged once per
    change (not once per tick) is compared with."""
    return session.scalars(
        select(CampaignDecision)
        .where(CampaignDecision.campaign_id == c.id, CampaignDecision.kind.in_(kinds))
        .order_by(CampaignDecision.id.desc())
        .limit(1)
    ).first()


def counts(session: Session, c: Campaign, spec: CampaignSpec, now: datetime) -> Counts:
    """The planner's input, counted by the database: one grouped query over the campaign's
    executions (a few rows per wave and status), the failed ones that may still be retried,
    and, only while the current wave has members not notified yet, which those are."""
    bounds = wave_bounds(spec, len(c.members))
    wave = min(c.wave, len(bounds) - 1) if bounds else 0
    recent = now - timedelta(minutes=1)
    rows = session.execute(
        select(
            JobExecution.wave,
            JobExecution.status,
            JobExecution.execution_number,
            func.count(),
            func.max(JobExecution.last_updated_at),
            func.sum(case((JobExecution.queued_at > recent, 1), else_=0)),
            func.max(JobExecution.queued_at),
        )
        .where(JobExecution.job_id == c.id)
        .group_by(JobExecution.wave, JobExecution.status, JobExecution.execution_number)
    ).all()
    settled: Counter[str] = Counter()
    last_done: datetime | None = None
    in_flight = succeeded = notified = last_minute = reached_notified = 0
    last_queued: datetime | None = None
    retries_pending = False
    for w, status, attempt, n, latest, queued_recently, queued_latest in rows:
        notified += n
        if queued_latest is not None:
            last_queued = queued_latest if last_queued is None else max(last_queued, queued_latest)
        last_minute += int(queued_recently or 0)
        in_flight += n if status in PENDING else 0
        succeeded += n if status == JobStatus.SUCCEEDED.value else 0
        pending = attempt <= spec.retry.allowed(status)
        retries_pending |= pending
        if (w or 0) <= wave:
            reached_notified += n
            if not pending:
                settled[status] += n
                if JobStatus(status).terminal and latest is not None:
                    last_done = latest if last_done is None else max(last_done, latest)
    retrying: tuple[MemberState, ...] = ()
    if retries_pending:
        retrying = tuple(
            m
            for thing, status, queued_at, last_updated_at, attempt in session.execute(
                select(
                    JobExecution.thing_name,
                    JobExecution.status,
                    JobExecution.queued_at,
                    JobExecution.last_updated_at,
                    JobExecution.execution_number,
                )
                .where(JobExecution.job_id == c.id, JobExecution.status.in_(sorted(FAILURES)))
                .order_by(JobExecution.id)
            )
            if retry_pending(spec, m := MemberState(thing, status, queued_at, last_updated_at, attempt))
        )
    deferred: tuple[MemberState, ...] = ()
    ready: tuple[str, ...] = ()
    if bounds and reached_notified < bounds[wave]:  # some of the wave's devices wait to be notified
        names = select(JobExecution.thing_name).where(JobExecution.job_id == c.id)
        notified_things = set(session.scalars(names))
        waiting = [t for t in c.members[: bounds[wave]] if t not in notified_things]
        unmet = _unmet(session, spec, waiting, now)
        deferred = tuple(MemberState(t, None, unmet=unmet[t]) for t in waiting if t in unmet)
        ready = tuple(t for t in waiting if t not in unmet)
    return Counts(
        wave=c.wave,
        wave_started_at=c.wave_started_at or now,
        population=len(c.members),
        settled=dict(settled),
        last_done=last_done,
        in_flight=in_flight,
        succeeded=succeeded,
        notified=notified,
        queued_last_minute=last_minute,
        last_queued_at=last_queued,
        retrying=retrying,
        deferred=deferred,
        ready=ready,
        advance_requested=c.advance_requested,
    )


def _unmet(session: Session, spec: CampaignSpec, things: list[str], now: datetime) -> dict[str, str]:
    """Server-side preconditions of the devices not notified yet: thing → why it must wait."""
    pre = spec.server_preconditions
    local = [w for w in spec.blackouts if w.per_device]
    if not things or (
        pre.online_within_s is None and pre.firmware_min is None and pre.regions is None and not local
    ):
        return {}
    out: dict[str, str] = {}
    wanted = set(things)
    rows = session.execute(
        select(
            Device.thing_name, Device.last_seen_at, Device.firmware, Device.region, Device.attributes
        ).where(Device.sku == spec.cohort.sku)
    ).all()
    for thing, last_seen_at, firmware, region, attributes in rows:
        if thing in wanted:
            why = pre.unmet(now=now, last_seen_at=last_seen_at, firmware=firmware, region=region)
            if why is None and local:
                tz = str((attributes or {}).get("timezone") or "UTC")
                open_ = next((w for w in local if w.window(tz).is_open(now)), None)
                if open_ is not None:
                    why = f"{TRANSIENT_DEFERRAL} {open_.cron!r} open in the device's local time ({tz})"
            if why is not None:
                out[thing] = why
    return out


def retry_failed(session: Session, *, campaign_id: str, actor: str, now: datetime) -> Campaign:
    """A new draft campaign, same release and rules, over the devices whose execution in
    `campaign_id` ended in failure (after its own retries). It still needs approval."""
    old = get(session, campaign_id)
    failed = sorted(
        session.scalars(
            select(JobExecution.thing_name).where(
                JobExecution.job_id == old.id, JobExecution.status.in_(sorted(FAILURES))
            )
        ).all()
    )
    if not failed:
        raise CampaignError(f"campaign {old.id} has no failed devices to retry")
    spec = CampaignSpec.model_validate(old.spec)
    spec = spec.model_copy(
        update={
            "name": f"retry of {spec.name}"[:128],
            "cohort": Cohort(sku=spec.cohort.sku, things=failed),
            "targeting": "snapshot",
            "schedule": spec.schedule.model_copy(update={"start_at": None, "end_at": None}),
        }
    )
    new = create(session, spec=spec, actor=actor, now=now)
    _log(session, new, now, "retry_of", actor, f"retries {len(failed)} failed device(s) of {old.id}")
    _log(session, old, now, "retried_as", actor, f"{len(failed)} failed device(s) retried as {new.id}")
    return new


def active_ids(session: Session) -> list[str]:
    return list(
        session.scalars(
            select(Campaign.id).where(Campaign.state.in_((S.SCHEDULED.value, S.RUNNING.value)))
        ).all()
    )


def _beacon_value(beacon: dict[str, Any], metric: str, key: str | None) -> float | None:
    """One device's reading of a relative wave gate's metric, from its latest beacon."""
    inference = beacon.get("inference") or {}
    if metric == "p95_ms":
        return inference.get("p95_ms")
    if metric == "ood_ratio":
        count = inference.get("count") or 0
        return (inference.get("ood") or 0) / count if count else None
    if metric == "restarts":
        return float(beacon.get("restarts") or 0)
    if metric == "throttled":
        return 1.0 if (beacon.get("throttle_level") or 0) > 0 else 0.0
    value = (inference.get("quality") or {}).get(key)
    return float(value) if value is not None else None


def cohort_beacons(session: Session, c: Campaign, spec: CampaignSpec) -> CohortSnapshots:
    """The relative wave gates' input: each member's latest beacon as one sample per metric,
    split into devices this campaign updated (SUCCEEDED) and the cohort's others. One pass
    over the cohort's SKU, as the drift watch makes."""
    updated = set(
        session.scalars(
            select(JobExecution.thing_name).where(
                JobExecution.campaign_id == c.id, JobExecution.status == JobStatus.SUCCEEDED.value
            )
        )
    )
    members = set(c.members)
    sides: tuple[dict[str, list[Sample]], dict[str, list[Sample]]] = ({}, {})
    for thing, beacon in session.execute(
        select(Device.thing_name, Device.last_beacon).where(
            Device.sku == spec.cohort.sku, Device.last_beacon.is_not(None)
        )
    ):
        if thing not in members or not beacon:
            continue
        try:
            at = datetime.fromisoformat(beacon["at"])
        except (KeyError, TypeError, ValueError):
            continue
        side = sides[0] if thing in updated else sides[1]
        for cmp in spec.compare:
            value = _beacon_value(beacon, cmp.metric, cmp.quality_key)
            if value is not None:
                side.setdefault(cmp.name, []).append(Sample(at, float(value)))
    return sides
