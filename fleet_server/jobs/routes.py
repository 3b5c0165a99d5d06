"""/api/v1/executions and /api/v1/receipts: what each device was asked to do, where it stands
(statusDetails, including `unmet`: why it waits) and what it reported. Read-only, paged by
an id cursor, filtered by the fields operators search; an unknown filter is a 422, never the
whole fleet."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from fleet_server.auth.deps import Principal, require
from fleet_server.auth.service import Role
from fleet_server.devices.models import Device
from fleet_server.jobs.models import ExecutionEvent, JobExecution
from fleet_server.paging import known_filters
from fleet_server.telemetry.models import TelemetryRecord

router = APIRouter(prefix="/api/v1", tags=["executions"])
Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
MAX_ID = 2**31 - 1
STATUSES = ("QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED")
Cursor = Annotated[int | None, Query(ge=1, le=MAX_ID, description="cursor: entries older than this id")]
Limit = Annotated[int, Query(ge=1, le=1000)]


class ExecutionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    job_id: str
    thing_name: str
    campaign_id: str | None
    wave: int | None
    status: str
    status_details: dict[str, Any]
    execution_number: int
    version_number: int
    queued_at: datetime
    started_at: datetime | None
    last_updated_at: datetime


class EventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    at: datetime
    from_status: str | None
    to_status: str
    source: str
    details: dict[str, Any]


class ExecutionDetail(ExecutionPublic):
    events: list[EventPublic]
    document: dict[str, Any]


class ReceiptPublic(BaseModel):
    id: int
    thing_name: str
    seq: int
    at: datetime
    received_at: datetime
    receipt: dict[str, Any]


_EXEC_FILTERS = ("campaign", "thing", "status", "wave", "region", "before_id", "limit")


def _executions(
    request: Request,
    *,
    campaign: str | None,
    thing: str | None,
    status: str | None,
    wave: int | None,
    region: str | None,
    before_id: int | None,
    limit: int,
) -> list[JobExecution]:
    if status is not None and status not in STATUSES:
        raise HTTPException(422, f"status {status!r}: one of {', '.join(STATUSES)}")
    q = select(JobExecution).order_by(JobExecution.id.desc()).limit(limit)
    if campaign is not None:
        q = q.where(JobExecution.campaign_id == campaign)
    if thing is not None:
        q = q.where(JobExecution.thing_name == thing)
    if status is not None:
        q = q.where(JobExecution.status == status)
    if wave is not None:
        q = q.where(JobExecution.wave == wave)
    if region is not None:
        q = q.join(Device, Device.thing_name == JobExecution.thing_name).where(Device.region == region)
    if before_id is not None:
        q = q.where(JobExecution.id < before_id)
    with request.app.state.db.session() as s:
        return list(s.scalars(q).all())


@router.get("/executions", response_model=list[ExecutionPublic], dependencies=[known_filters(*_EXEC_FILTERS)])
def list_executions(
    request: Request,
    who: Viewer,
    campaign: Annotated[str | None, Query(max_length=64)] = None,
    thing: Annotated[str | None, Query(max_length=128)] = None,
    status: Annotated[str | None, Query(max_length=16, description="an AWS IoT Jobs status")] = None,
    wave: Annotated[int | None, Query(ge=0, le=1000)] = None,
    region: Annotated[str | None, Query(max_length=64)] = None,
    before_id: Cursor = None,
    limit: Limit = 100,
) -> list[JobExecution]:
    """Executions, newest first; `statusDetails.unmet` says why a queued device waits (a
    precondition, a blackout window). Page with `before_id` (the last id seen)."""
    return _executions(
        request,
        campaign=campaign,
        thing=thing,
        status=status,
        wave=wave,
        region=region,
        before_id=before_id,
        limit=limit,
    )


@router.get("/executions/{execution_id}", response_model=ExecutionDetail)
def get_execution(
    request: Request, who: Viewer, execution_id: Annotated[int, PathParam(ge=1, le=MAX_ID)]
) -> dict[str, Any]:
    """One execution with its job document and every transition, in order."""
    with request.app.state.db.session() as s:
        ex = s.get(JobExecution, execution_id)
        if ex is None:
            raise HTTPException(404, f"no execution {execution_id}")
        events = s.scalars(
            select(ExecutionEvent).where(ExecutionEvent.execution_id == ex.id).order_by(ExecutionEvent.id)
        ).all()
        body = ExecutionPublic.model_validate(ex).model_dump()
        return {**body, "document": ex.document, "events": [EventPublic.model_validate(e) for e in events]}


@router.get(
    "/receipts",
    response_model=list[ReceiptPublic],
    dependencies=[known_filters("thing", "version", "outcome", "before_id", "limit")],
)
def list_receipts(
    request: Request,
    who: Viewer,
    thing: Annotated[str | None, Query(max_length=128)] = None,
    version: Annotated[str | None, Query(max_length=64)] = None,
    outcome: Annotated[
        str | None, Query(max_length=32, description="committed, rolled_back, failed…")
    ] = None,
    before_id: Cursor = None,
    limit: Limit = 100,
) -> list[dict[str, Any]]:
    """Install receipts the devices sent (outcome, reason, figures), newest first."""
    q = select(TelemetryRecord).where(TelemetryRecord.kind == "receipt").order_by(TelemetryRecord.id.desc())
    if thing is not None:
        q = q.where(TelemetryRecord.thing_name == thing)
    if before_id is not None:
        q = q.where(TelemetryRecord.id < before_id)
    out: list[dict[str, Any]] = []
    with request.app.state.db.session() as s:
        # version and outcome live in the JSON payload: filtered here, scanning in pages so a
        # filter that matches little still returns `limit` rows when they exist.
        offset = 0
        while len(out) < limit:
            rows = s.scalars(q.offset(offset).limit(500)).all()
            if not rows:
                break
            offset += len(rows)
            for r in rows:
                p = r.payload or {}
                if version is not None and p.get("version") != version:
                    continue
                if outcome is not None and p.get("outcome") != outcome:
                    continue
                out.append(
                    {
                        "id": r.id,
                        "thing_name": r.thing_name,
                        "seq": r.seq,
                        "at": r.at,
                        "received_at": r.received_at,
                        "receipt": p,
                    }
                )
                if len(out) == limit:
                    break
    return out
