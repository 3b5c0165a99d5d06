"""The service side of the AWS IoT Jobs MQTT protocol, over the database.

`handle` takes one device request (topic and payload) and returns the
replies and notifications to publish; `create_execution` queues a job for a
device; `sweep` times out stuck executions and re-notifies devices whose
queued job may have been missed. All take the session and the time, do no
MQTT I/O themselves (the bridge publishes what they return), and never raise
for bad input: every malformed request gets a ``rejected`` reply with the
codes AWS documents.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import JSON, CursorResult, Integer, Table, and_, bindparam, insert, or_, select, text, update
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.attributes import instance_state, set_committed_value
from sqlalchemy.orm.exc import StaleDataError

from fleet_server.db import UTCDateTime
from fleet_server.devices.models import Device
from fleet_server.errors import ConflictError, FleetError, NotFoundError
from fleet_server.jobs.models import ExecutionEvent, JobExecution
from shared.iotjobs import (
    DEVICE_SETTABLE,
    PENDING,
    JobStatus,
    RejectedCode,
    Topics,
    check_status_details,
    valid_job_id,
    valid_thing_name,
)

MAX_NOTIFY = 15
MAX_GET = 10
EVENT_FIELDS = ("execution_id", "at", "from_status", "to_status", "source", "details")
LAST_SEEN_RESOLUTION = timedelta(seconds=10)


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: dict[str, Any]

    def encode(self) -> bytes:
        return json.dumps(self.payload, separators=(",", ":")).encode()


class QueueError(FleetError):
    """A job that cannot be queued as asked (a bad job id, a device named twice)."""


class UnknownDeviceError(QueueError):
    http_status = NotFoundError.http_status


class DuplicateJobError(QueueError):
    http_status = ConflictError.http_status


class NotRetryableError(QueueError):
    http_status = ConflictError.http_status


class RequestError(Exception):
    def __init__(self, code: RejectedCode, message: str, execution: JobExecution | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.execution = code, message, execution


def _ts(dt: datetime | None) -> int | None:
    return None if dt is None else int(dt.timestamp())


def execution_doc(ex: JobExecution, *, include_document: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "jobId": ex.job_id,
        "thingName": ex.thing_name,
        "status": ex.status,
        "statusDetails": dict(ex.status_details or {}),
        "queuedAt": _ts(ex.queued_at),
        "lastUpdatedAt": _ts(ex.last_updated_at),
        "versionNumber": ex.version_number,
        "executionNumber": ex.execution_number,
    }
    if ex.started_at is not None:
        doc["startedAt"] = _ts(ex.started_at)
    if include_document:
        doc["jobDocument"] = ex.document
    return doc


def _summary(ex: JobExecution) -> dict[str, Any]:
    out = {
        k: v
        for k, v in execution_doc(ex, include_document=False).items()
        if k in ("jobId", "queuedAt", "startedAt", "lastUpdatedAt", "versionNumber", "executionNumber")
    }
    return out


def _state(ex: JobExecution) -> dict[str, Any]:
    return {
        "status": ex.status,
        "statusDetails": dict(ex.status_details or {}),
        "versionNumber": ex.version_number,
    }


_PREFETCHED = "tidegate.pending_by_thing"
_NAMED = "tidegate.named_executions"  # the executions a batch names by job id, looked up with it
_DEVICES = "tidegate.devices_last_seen"  # thing → last seen, for a batch's registered things
_SEEN = "tidegate.devices_seen"  # thing → when: last-seen times the batch moves (`write_batch`)


def prefetch_devices(session: Session, things: list[str]) -> None:
    """Which of `things` are registered, and when each was last seen, in one query of two
    columns: a batch's requests check their device against these instead of loading it, and
    `write_batch` writes the last-seen times they moved in one statement."""
    known: dict[str, datetime | None] = {}
    for chunk in _chunks(things):
        rows = session.execute(
            select(Device.thing_name, Device.last_seen_at).where(Device.thing_name.in_(chunk))
        )
        known.update((thing, last) for thing, last in rows)
    session.info[_DEVICES] = known
    session.info[_SEEN] = {}


def _seen(session: Session, thing: str, now: datetime) -> None:
    """The request's device must be registered; its last-seen time moves (not on every
    request: it would be a write per message)."""
    known: dict[str, datetime | None] | None = session.info.get(_DEVICES)
    if known is not None and thing in known:
        last = known[thing]
        if last is None or now - last >= LAST_SEEN_RESOLUTION:
            known[thing] = session.info[_SEEN][thing] = now
        return
    device = session.get(Device, thing)
    if device is None:
        raise RequestError(RejectedCode.RESOURCE_NOT_FOUND, f"thing {thing} is not registered")
    if device.last_seen_at is None or now - device.last_seen_at >= LAST_SEEN_RESOLUTION:
        device.last_seen_at = now


def prefetch_pending(
    session: Session, things: list[str], named: Sequence[tuple[str, str]] = ()
) -> list[JobExecution]:
    """Load the pending executions of `things` in one query, and the executions `named` by
    (thing, job id) in one more, and let this session's requests for them use those rows
    instead of querying again (the bridge does this per batch: a device's re-sent update of
    an execution that has ended since, answered VersionMismatch, otherwise costs a query of
    its own). Returns the rows: the caller holds them for the batch, the identity map is weak."""
    by_thing: dict[str, list[JobExecution]] = {t: [] for t in things}
    rows: list[JobExecution] = []
    for chunk in _chunks(things):
        rows += session.scalars(
            select(JobExecution).where(JobExecution.thing_name.in_(chunk), JobExecution.status.in_(PENDING))
        )
    for ex in rows:
        by_thing[ex.thing_name].append(ex)
    session.info[_PREFETCHED] = by_thing
    wanted = {
        (t, j) for t, j in named if valid_job_id(j) and not any(e.job_id == j for e in by_thing.get(t, ()))
    }
    found: dict[tuple[str, str], JobExecution] = {}
    if wanted:
        for jobs in _chunks(sorted({j for _, j in wanted}), 250):
            for chunk in _chunks(sorted({t for t, _ in wanted}), 250):
                query = select(JobExecution).where(
                    JobExecution.thing_name.in_(chunk), JobExecution.job_id.in_(jobs)
                )
                for ex in session.scalars(query):
                    if (ex.thing_name, ex.job_id) in wanted:
                        found[(ex.thing_name, ex.job_id)] = ex
                        rows.append(ex)
    session.info[_NAMED] = (wanted, found)
    return rows


def _pending(session: Session, thing: str) -> list[JobExecution]:
    """IN_PROGRESS first, then QUEUED, each oldest first: the order start-next serves."""
    prefetched: dict[str, list[JobExecution]] | None = session.info.get(_PREFETCHED)
    if prefetched is not None and thing in prefetched:
        return sorted((r for r in prefetched[thing] if r.status in PENDING), key=_pending_order)
    rows = session.scalars(
        select(JobExecution).where(JobExecution.thing_name == thing, JobExecution.status.in_(PENDING))
    ).all()
    # Filtered again in memory: a caller that batches requests without autoflush (the bridge)
    # may hold a row whose status changed since the database last saw it.
    return sorted((r for r in rows if r.status in PENDING), key=_pending_order)


def _transition(
    session: Session,
    ex: JobExecution,
    to: JobStatus,
    now: datetime,
    source: str,
    details: dict[str, str] | None,
) -> None:
    session.add(
        ExecutionEvent(
            execution_id=ex.id,
            at=now,
            from_status=ex.status,
            to_status=to.value,
            source=source,
            details=dict(details or {}),
        )
    )
    ex.status = to.value
    ex.version_number += 1
    ex.last_updated_at = now
    if to in (JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.REJECTED):
        from fleet_server.webhooks.service import emit

        data = {"thing_name": ex.thing_name, "job_id": ex.job_id, "campaign_id": ex.campaign_id}
        emit(session, "execution.failed", {**data, "status": to.value, "details": dict(details or {})}, now)


def _pending_order(ex: JobExecution) -> tuple[bool, datetime, int]:
    return (ex.status != JobStatus.IN_PROGRESS.value, ex.queued_at, ex.id)


def _notify(
    thing: str, pending: list[JobExecution], now: datetime
) -> tuple[list[Outgoing], JobExecution | None]:
    """notify-next (the head of `pending`, or none) and notify (the pending lists); also
    returns the head, which the caller marks as notified (`_mark_notified`)."""
    topics = Topics(thing)
    nxt: dict[str, Any] = {"timestamp": _ts(now)}
    head = pending[0] if pending else None
    if head is not None:
        nxt["execution"] = execution_doc(head)
    jobs: dict[str, list[dict[str, Any]]] = {}
    for ex in pending[:MAX_NOTIFY]:
        jobs.setdefault(ex.status, []).append(_summary(ex))
    out = [Outgoing(topics.notify_next, nxt), Outgoing(topics.notify, {"timestamp": _ts(now), "jobs": jobs})]
    return out, head


def _mark_notified(session: Session, heads: list[JobExecution], now: datetime) -> None:
    """Record when each head was last notified. Bookkeeping, not a transition: written with
    a plain UPDATE outside the version check, so a device moving the execution on at the
    same moment neither loses its transition nor makes this transaction fail."""
    table = cast(Table, JobExecution.__table__)
    ids = [h.id for h in heads]
    for i in range(0, len(ids), 500):
        session.execute(update(table).where(table.c.id.in_(ids[i : i + 500])).values(last_notified_at=now))
    for h in heads:
        set_committed_value(h, "last_notified_at", now)


def write_batch(session: Session) -> int:
    """Write the session's changed executions and their new events now, one statement for
    each (per set of changed columns), every execution still checked against the version it
    was read at. The ORM's flush writes one UPDATE per execution (version-checked rows are
    never batched), and psycopg re-parses a multi-row INSERT of thousands of parameters:
    together most of a 500-message batch's time. Here each column is one array parameter,
    unnested into rows. PostgreSQL only (SQLite's flush at commit writes them as before);
    the last-seen times the batch's requests moved (`_seen`) are written here on both.
    Returns the executions written; raises StaleDataError when another writer moved one on
    (the bridge then redoes its batch one message per transaction)."""
    dialect = session.get_bind().dialect
    _write_seen(session, dialect)
    if dialect.name != "postgresql":
        return 0
    table = cast(Table, JobExecution.__table__)
    columns = set(table.c.keys())
    groups: dict[tuple[str, ...], list[tuple[JobExecution, int]]] = {}
    for obj in session.dirty:
        if not isinstance(obj, JobExecution):
            continue
        committed = instance_state(obj).committed_state  # what each changed column was read as
        changed = tuple(sorted(k for k in committed if k in columns and k != "id"))
        read_at = committed.get("version_number", obj.version_number)
        if not changed or not isinstance(read_at, int):
            continue  # nothing to write, or a version never loaded: left to the flush
        groups.setdefault(changed, []).append((obj, read_at))
    written = 0
    for keys, rows in groups.items():
        arrays = _arrays(table, dialect, keys, [ex for ex, _ in rows])
        arrays |= {"id": [ex.id for ex, _ in rows], "read_version": [r for _, r in rows]}
        result = cast(
            CursorResult[Any],
            session.execute(
                text(
                    f"UPDATE {table.name} AS e SET {', '.join(f'{k} = v.{k}' for k in keys)} "
                    f"FROM {_unnest(table, arrays, read_version='integer')} "
                    "WHERE e.id = v.id AND e.version_number = v.read_version"
                ),
                arrays,
            ),
        )
        if result.rowcount != len(rows):
            raise StaleDataError(
                f"{len(rows) - result.rowcount} of {len(rows)} executions were moved on by another writer"
            )
        for ex, _ in rows:  # written: nothing left for the flush
            for k in keys:
                set_committed_value(ex, k, getattr(ex, k))
        written += len(rows)
    # In the order they were added: an event's id orders an execution's transitions.
    events = sorted(
        (o for o in session.new if isinstance(o, ExecutionEvent)),
        key=lambda o: instance_state(o).insert_order or 0,
    )
    if events:
        _insert_events(session, events)
        for ev in events:  # written, and read by nothing later in the batch
            session.expunge(ev)
    return written


def _write_seen(session: Session, dialect: Any) -> None:
    """The last-seen times the batch's requests moved (`_seen`), in one statement, in one
    lock order for every writer. A device row has no version: the latest write wins."""
    seen: dict[str, datetime] = session.info.pop(_SEEN, None) or {}
    if not seen:
        return
    devices = cast(Table, Device.__table__)
    things = sorted(seen)
    if dialect.name == "postgresql":
        arrays = _arrays(
            devices, dialect, ("thing_name", "last_seen_at"), [_Seen(t, seen[t]) for t in things]
        )
        session.execute(
            text(
                f"UPDATE {devices.name} AS d SET last_seen_at = v.last_seen_at "
                f"FROM {_unnest(devices, arrays)} WHERE d.thing_name = v.thing_name"
            ),
            arrays,
        )
    else:
        session.execute(
            update(devices)
            .where(devices.c.thing_name == bindparam("thing"))
            .values(last_seen_at=bindparam("at")),
            [{"thing": t, "at": seen[t]} for t in things],
        )


@dataclass(frozen=True)
class _Seen:
    thing_name: str
    last_seen_at: datetime


def _element_type(column: Any) -> str:
    """PostgreSQL's name for the element type of an array of `column`'s values."""
    if isinstance(column.type, JSON):
        return "json"
    if isinstance(column.type, Integer):
        return "integer"
    if isinstance(column.type, UTCDateTime):
        return "timestamp"
    return "varchar"


def _arrays(table: Table, dialect: Any, keys: tuple[str, ...], objs: list[Any]) -> dict[str, list[Any]]:
    """One list per column, each value as the column's type binds it (UTC datetimes made
    naive, JSON as text)."""
    out: dict[str, list[Any]] = {}
    for k in keys:
        raw = [getattr(o, k) for o in objs]
        if isinstance(table.c[k].type, JSON):
            out[k] = [None if x is None else json.dumps(x) for x in raw]
        else:
            bind = table.c[k].type.bind_processor(dialect)
            out[k] = [bind(x) for x in raw] if bind is not None else raw
    return out


def _unnest(table: Table, arrays: dict[str, list[Any]], **extra: str) -> str:
    """`unnest(…) AS v(…)` over one array parameter per column (`extra`: columns that are not
    the table's, with their element types)."""
    casts = ", ".join(
        f"CAST(:{n} AS {extra[n] if n in extra else _element_type(table.c[n])}[])" for n in arrays
    )
    return f"unnest({casts}) AS v({', '.join(arrays)})"


def _insert_executions(session: Session, rows: list[dict[str, Any]]) -> list[JobExecution]:
    """Insert new executions, returned as persistent objects in `rows`' order. A wave is
    thousands: on PostgreSQL one `INSERT … SELECT unnest(…)` (psycopg would re-parse a
    multi-row VALUES of thousands of parameters), elsewhere one ORM bulk INSERT; neither
    pays the unit of work's per-object bookkeeping."""
    if session.get_bind().dialect.name != "postgresql":
        # RETURNING in parameter order would cost SQLite one INSERT per row: matched by name
        # instead (a job's executions are one per thing).
        back = {
            ex.thing_name: ex for ex in session.scalars(insert(JobExecution).returning(JobExecution), rows)
        }
        return [back[row["thing_name"]] for row in rows]
    table = cast(Table, JobExecution.__table__)
    objs = [JobExecution(**row) for row in rows]
    arrays = _arrays(table, session.get_bind().dialect, tuple(rows[0]), objs)
    ids: dict[str, int] = dict(
        session.execute(
            text(
                f"INSERT INTO {table.name} ({', '.join(arrays)}) SELECT {', '.join(arrays)} "
                f"FROM {_unnest(table, arrays)} RETURNING thing_name, id"
            ),
            arrays,
        ).all()
    )
    for obj in objs:  # the rows are written: the objects join the session as loaded ones
        obj.id = ids[obj.thing_name]
        make_transient_to_detached(obj)
        session.add(obj)
    return objs


def _insert_events(session: Session, events: list[ExecutionEvent]) -> None:
    """New events in one statement (PostgreSQL: unnested arrays); nothing reads them back."""
    if not events:
        return
    if session.get_bind().dialect.name != "postgresql":
        session.execute(insert(ExecutionEvent), [{f: getattr(e, f) for f in EVENT_FIELDS} for e in events])
        return
    table = cast(Table, ExecutionEvent.__table__)
    arrays = _arrays(table, session.get_bind().dialect, EVENT_FIELDS, events)
    session.execute(
        text(
            f"INSERT INTO {table.name} ({', '.join(EVENT_FIELDS)}) "
            f"SELECT {', '.join(EVENT_FIELDS)} FROM {_unnest(table, arrays)}"
        ),
        arrays,
    )


def notifications(session: Session, thing: str, now: datetime) -> list[Outgoing]:
    """notify-next and notify for `thing`, from its pending executions now."""
    out, head = _notify(thing, _pending(session, thing), now)
    if head is not None:
        _mark_notified(session, [head], now)
    return out


def create_execution(
    session: Session,
    thing: str,
    job_id: str,
    document: dict[str, Any],
    now: datetime,
    *,
    campaign_id: str | None = None,
    in_progress_timeout_min: int | None = None,
) -> list[Outgoing]:
    """Queue `job_id` for `thing`; returns the notifications to publish (the device's queue
    head may have changed)."""
    return create_executions(
        session,
        [thing],
        job_id,
        document,
        now,
        campaign_id=campaign_id,
        in_progress_timeout_min=in_progress_timeout_min,
    )


def create_executions(
    session: Session,
    things: list[str],
    job_id: str,
    document: dict[str, Any],
    now: datetime,
    *,
    campaign_id: str | None = None,
    in_progress_timeout_min: int | None = None,
    wave: int | None = None,
) -> list[Outgoing]:
    """Queue `job_id` for many things in a few statements (a campaign wave is thousands):
    one lookup of the devices, one of their pending executions, one bulk insert each of
    executions and events. All or nothing: an unknown device fails the whole call."""
    if not valid_job_id(job_id):
        raise QueueError(f"invalid job id {job_id!r}")
    if not things:
        return []
    if len(set(things)) != len(things):
        raise QueueError("a device is named twice")
    known: set[str] = set()
    for chunk in _chunks(things):
        known.update(session.scalars(select(Device.thing_name).where(Device.thing_name.in_(chunk))))
    if unknown := [t for t in things if t not in known]:
        raise UnknownDeviceError(
            f"unknown device {unknown[0]!r}" + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else "")
        )
    for chunk in _chunks(things):
        if again := session.scalars(
            select(JobExecution.thing_name).where(
                JobExecution.job_id == job_id, JobExecution.thing_name.in_(chunk)
            )
        ).first():
            raise DuplicateJobError(f"job {job_id!r} already exists for {again!r}")
    pending: dict[str, list[JobExecution]] = {t: [] for t in things}
    for chunk in _chunks(things):
        for ex in session.scalars(
            select(JobExecution).where(JobExecution.thing_name.in_(chunk), JobExecution.status.in_(PENDING))
        ):
            pending[ex.thing_name].append(ex)
    rows = [
        {
            "job_id": job_id,
            "thing_name": thing,
            "campaign_id": campaign_id,
            "status": JobStatus.QUEUED.value,
            "status_details": {},
            "document": document,
            "version_number": 1,
            "execution_number": 1,
            "queued_at": now,
            "last_updated_at": now,
            "in_progress_timeout_min": in_progress_timeout_min,
            "wave": wave,
            # every column given: the objects come back whole, with nothing left to load
            "started_at": None,
            "step_timeout_at": None,
            "last_notified_at": None,
        }
        for thing in things
    ]
    created = _insert_executions(session, rows)
    events = [
        ExecutionEvent(
            execution_id=ex.id, at=now, from_status=None, to_status=ex.status, source="server", details={}
        )
        for ex in created
    ]
    _insert_events(session, events)
    out: list[Outgoing] = []
    heads: list[JobExecution] = []
    for ex in created:
        queue = sorted([*pending[ex.thing_name], ex], key=_pending_order)
        notes, head = _notify(ex.thing_name, queue, now)
        out += notes
        heads += [head] if head is not None else []
    _mark_notified(session, heads, now)
    return out


def _chunks(items: list[str], size: int = 500) -> list[list[str]]:
    """Bounded IN lists (SQLite's variable limit, PostgreSQL's plan cache)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def requeue_execution(session: Session, ex: JobExecution, now: datetime, *, reason: str) -> list[Outgoing]:
    """Retry a failed or timed-out execution: it is QUEUED again with the next execution
    number (as AWS counts retries), fresh timers and empty status details."""
    if ex.status not in (JobStatus.FAILED.value, JobStatus.TIMED_OUT.value):
        raise NotRetryableError(
            f"execution {ex.job_id}/{ex.thing_name} is {ex.status}; only a failure is retried"
        )
    _transition(session, ex, JobStatus.QUEUED, now, "server", {"retry": reason})
    ex.execution_number += 1
    ex.status_details, ex.queued_at, ex.started_at, ex.step_timeout_at = {}, now, None, None
    return notifications(session, ex.thing_name, now)


def _parse(topic: str) -> tuple[str, list[str]]:
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "$aws" or parts[1] != "things" or parts[3] != "jobs":
        raise RequestError(RejectedCode.INVALID_TOPIC, f"not a jobs topic: {topic}")
    if not valid_thing_name(parts[2]):
        raise RequestError(RejectedCode.INVALID_TOPIC, "invalid thing name")
    return parts[2], parts[4:]


def _step_timeout(body: dict[str, Any], now: datetime) -> datetime | None:
    minutes = body.get("stepTimeoutInMinutes")
    if minutes is None:
        return None
    if not isinstance(minutes, int) or isinstance(minutes, bool) or not 1 <= minutes <= 10080:
        raise RequestError(RejectedCode.INVALID_REQUEST, "stepTimeoutInMinutes must be 1..10080")
    return now + timedelta(minutes=minutes)


def handle(session: Session, topic: str, payload: bytes, now: datetime) -> list[Outgoing]:
    """One device request in; the reply (accepted or rejected) and any notifications out."""
    token: Any = None
    try:
        thing, rest = _parse(topic)
        try:
            body = json.loads(payload) if payload.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(RejectedCode.INVALID_JSON, "payload is not valid JSON") from exc
        if not isinstance(body, dict):
            raise RequestError(RejectedCode.INVALID_JSON, "payload must be a JSON object")
        token = body.get("clientToken")
        if token is not None and (not isinstance(token, str) or len(token) > 64):
            raise RequestError(
                RejectedCode.INVALID_REQUEST, "clientToken must be a string of at most 64 chars"
            )
        _seen(session, thing, now)
        if rest == ["get"]:
            reply, extra = _get_pending(session, thing, now)
        elif rest == ["start-next"]:
            reply, extra = _start_next(session, thing, body, now)
        elif len(rest) == 2 and rest[1] == "get":
            reply, extra = _describe(session, thing, rest[0], body, now)
        elif len(rest) == 2 and rest[1] == "update":
            reply, extra = _update(session, thing, rest[0], body, now)
        else:
            raise RequestError(RejectedCode.INVALID_TOPIC, f"unknown jobs operation {'/'.join(rest)}")
    except RequestError as err:
        rejected: dict[str, Any] = {"code": err.code.value, "message": err.message, "timestamp": _ts(now)}
        if token is not None and isinstance(token, str):
            rejected["clientToken"] = token
        if err.execution is not None:
            rejected["executionState"] = _state(err.execution)
        return [Outgoing(Topics.rejected(topic), rejected)]
    reply["timestamp"] = _ts(now)
    if token is not None:
        reply["clientToken"] = token
    return [Outgoing(Topics.accepted(topic), reply), *extra]


def _get_pending(session: Session, thing: str, now: datetime) -> tuple[dict[str, Any], list[Outgoing]]:
    pending = _pending(session, thing)
    return {
        "inProgressJobs": [_summary(e) for e in pending if e.status == JobStatus.IN_PROGRESS.value][:MAX_GET],
        "queuedJobs": [_summary(e) for e in pending if e.status == JobStatus.QUEUED.value][:MAX_GET],
    }, []


def _start_next(
    session: Session, thing: str, body: dict[str, Any], now: datetime
) -> tuple[dict[str, Any], list[Outgoing]]:
    details = body.get("statusDetails")
    if (why := check_status_details(details)) is not None:
        raise RequestError(RejectedCode.INVALID_REQUEST, why)
    step = _step_timeout(body, now)
    pending = _pending(session, thing)
    if not pending:
        return {}, []
    ex = pending[0]
    if ex.status == JobStatus.QUEUED.value:
        if details:
            ex.status_details = {**(ex.status_details or {}), **details}
        _transition(session, ex, JobStatus.IN_PROGRESS, now, "device", details)
        ex.started_at = now
    ex.step_timeout_at = step
    return {"execution": execution_doc(ex)}, []


def _find(session: Session, thing: str, job_id: str) -> JobExecution:
    if job_id == "$next":
        pending = _pending(session, thing)
        if not pending:
            raise RequestError(RejectedCode.RESOURCE_NOT_FOUND, "no pending job execution")
        return pending[0]
    if not valid_job_id(job_id):
        raise RequestError(RejectedCode.INVALID_TOPIC, "invalid job id")
    prefetched: dict[str, list[JobExecution]] | None = session.info.get(_PREFETCHED)
    for candidate in (prefetched or {}).get(thing, []):
        if candidate.job_id == job_id:
            return candidate
    named: tuple[set[tuple[str, str]], dict[tuple[str, str], JobExecution]] | None = session.info.get(_NAMED)
    if named is not None and (thing, job_id) in named[0]:  # looked up with the batch
        found = named[1].get((thing, job_id))
        if found is None:
            raise RequestError(RejectedCode.RESOURCE_NOT_FOUND, f"no execution of job {job_id} for {thing}")
        return found
    ex = session.scalars(
        select(JobExecution).where(JobExecution.thing_name == thing, JobExecution.job_id == job_id)
    ).first()
    if ex is None:
        raise RequestError(RejectedCode.RESOURCE_NOT_FOUND, f"no execution of job {job_id} for {thing}")
    return ex


def _describe(
    session: Session, thing: str, job_id: str, body: dict[str, Any], now: datetime
) -> tuple[dict[str, Any], list[Outgoing]]:
    ex = _find(session, thing, job_id)
    number = body.get("executionNumber")
    if number is not None and number != ex.execution_number:
        raise RequestError(RejectedCode.RESOURCE_NOT_FOUND, f"no execution number {number}")
    return {
        "execution": execution_doc(ex, include_document=body.get("includeJobDocument", True) is not False)
    }, []


def _update(
    session: Session, thing: str, job_id: str, body: dict[str, Any], now: datetime
) -> tuple[dict[str, Any], list[Outgoing]]:
    ex = _find(session, thing, job_id)
    try:
        status = JobStatus(str(body.get("status")))
    except ValueError as exc:
        raise RequestError(
            RejectedCode.INVALID_REQUEST, f"unknown status {body.get('status')!r}", ex
        ) from exc
    if status not in DEVICE_SETTABLE:
        raise RequestError(RejectedCode.INVALID_REQUEST, f"a device cannot set {status.value}", ex)
    details = body.get("statusDetails")
    if (why := check_status_details(details)) is not None:
        raise RequestError(RejectedCode.INVALID_REQUEST, why, ex)
    expected = body.get("expectedVersion")
    if expected is not None and expected != ex.version_number:
        raise RequestError(
            RejectedCode.VERSION_MISMATCH, f"expected version {expected}, current {ex.version_number}", ex
        )
    if JobStatus(ex.status).terminal:
        raise RequestError(RejectedCode.INVALID_STATE_TRANSITION, f"execution is already {ex.status}", ex)
    step = _step_timeout(body, now)
    if details is not None:
        ex.status_details = dict(details)
    _transition(session, ex, status, now, "device", details)
    if status is JobStatus.IN_PROGRESS:
        ex.started_at = ex.started_at or now
        if step is not None or "stepTimeoutInMinutes" in body:
            ex.step_timeout_at = step
    else:
        ex.step_timeout_at = None
    reply: dict[str, Any] = {}
    if body.get("includeJobExecutionState"):
        reply["executionState"] = _state(ex)
    if body.get("includeJobDocument"):
        reply["jobDocument"] = ex.document
    extra = notifications(session, thing, now) if status.terminal else []
    return reply, extra


def sweep(session: Session, now: datetime, *, renotify_after: timedelta) -> list[Outgoing]:
    """Time out executions whose step or in-progress timer ran out (TIMED_OUT), and re-notify
    devices whose queue head has waited unstarted longer than `renotify_after`."""
    out: list[Outgoing] = []
    things: set[str] = set()
    running = session.scalars(
        select(JobExecution).where(
            JobExecution.status == JobStatus.IN_PROGRESS.value,
            or_(JobExecution.step_timeout_at <= now, JobExecution.in_progress_timeout_min.is_not(None)),
        )
    ).all()
    for ex in running:
        limit = ex.step_timeout_at
        if ex.in_progress_timeout_min and ex.started_at is not None:
            overall = ex.started_at + timedelta(minutes=ex.in_progress_timeout_min)
            limit = min(limit, overall) if limit else overall
        if limit is not None and now >= limit:
            _transition(session, ex, JobStatus.TIMED_OUT, now, "server", {"reason": "timed out"})
            ex.status_details = {**(ex.status_details or {}), "reason": "timed out"}
            things.add(ex.thing_name)
    cutoff = now - renotify_after
    things.update(
        session.scalars(
            select(JobExecution.thing_name).where(
                JobExecution.status == JobStatus.QUEUED.value,
                or_(
                    JobExecution.last_notified_at <= cutoff,
                    and_(JobExecution.last_notified_at.is_(None), JobExecution.queued_at <= cutoff),
                ),
            )
        )
    )
    for thing in sorted(things):
        out += notifications(session, thing, now)
    return out
