"""/api/v1/devices — thin: validate, call the service, shape the answer."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.auth.deps import Principal, require
from fleet_server.auth.service import Role, audit
from fleet_server.devices.models import Device
from fleet_server.devices.service import register_device, register_devices
from fleet_server.paging import known_filters

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])
Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]


class DeviceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    thing_name: str = Field(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9:_-]+$")
    sku: str = Field(min_length=1, max_length=64)
    region: str | None = Field(default=None, max_length=64)
    customer: str | None = Field(default=None, max_length=128)
    regulatory_domain: str | None = Field(default=None, max_length=64)
    firmware: str | None = Field(default=None, max_length=64)
    agent_version: str | None = Field(default=None, max_length=64)
    attributes: dict[str, str] = Field(default_factory=dict, max_length=64)


class DevicePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    thing_name: str
    sku: str
    region: str | None
    customer: str | None
    regulatory_domain: str | None
    firmware: str | None
    agent_version: str | None
    attributes: dict[str, Any]
    registered_at: datetime
    last_seen_at: datetime | None
    active_version: str | None = None
    last_beacon: dict[str, Any] | None = None


_FILTERS = ("sku", "region", "customer", "firmware", "version", "name", "after", "limit", "offset")


@router.get("", response_model=list[DevicePublic], dependencies=[known_filters(*_FILTERS)])
def list_devices(
    request: Request,
    who: Viewer,
    sku: Annotated[str | None, Query(max_length=64)] = None,
    region: Annotated[str | None, Query(max_length=64)] = None,
    customer: Annotated[str | None, Query(max_length=128)] = None,
    firmware: Annotated[str | None, Query(max_length=64)] = None,
    version: Annotated[str | None, Query(max_length=64, description="the active model version")] = None,
    name: Annotated[str | None, Query(max_length=128, description="thing names containing this")] = None,
    after: Annotated[
        str | None, Query(max_length=128, description="cursor: the last thing name of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[Device]:
    """Devices by thing name, filtered by the fields operators search (each an exact match but
    `name`); page with `after` = the last thing name seen (stable while devices register, unlike
    `offset`). An unknown filter is a 422, never the whole fleet."""
    with request.app.state.db.session() as s:
        q = select(Device).order_by(Device.thing_name).limit(limit).offset(offset)
        for column, value in (
            (Device.sku, sku),
            (Device.region, region),
            (Device.customer, customer),
            (Device.firmware, firmware),
            (Device.active_version, version),
        ):
            if value is not None:
                q = q.where(column == value)
        if name:
            q = q.where(Device.thing_name.contains(name, autoescape=True))
        if after is not None:
            q = q.where(Device.thing_name > after)
        return list(s.scalars(q).all())


@router.post("", response_model=DevicePublic, status_code=201)
def create_device(request: Request, body: DeviceCreate, who: Operator) -> Device:
    now = request.app.state.clock()
    with request.app.state.db.session() as s:
        device = register_device(s, now=now, **body.model_dump())
        audit(
            s,
            actor=who.name,
            role=who.role.value,
            action="device.register",
            target=body.thing_name,
            outcome="ok",
            now=now,
        )
        s.flush()
        return device


class DeviceBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    devices: list[DeviceCreate] = Field(min_length=1, max_length=10_000)


class BatchResult(BaseModel):
    registered: int


@router.post("/batch", response_model=BatchResult, status_code=201)
def create_devices(request: Request, body: DeviceBatch, who: Operator) -> BatchResult:
    """Register or update up to 10,000 devices in one transaction (an inventory import): all
    of them, or none if any is refused."""
    names = [d.thing_name for d in body.devices]
    if len(set(names)) != len(names):
        raise HTTPException(422, "a thing name appears twice in the batch")
    now = request.app.state.clock()
    with request.app.state.db.session() as s:
        register_devices(s, [d.model_dump() for d in body.devices], now=now)
        audit(
            s,
            actor=who.name,
            role=who.role.value,
            action="device.register_batch",
            target=f"{len(names)} devices",
            outcome="ok",
            now=now,
        )
    return BatchResult(registered=len(names))


@router.get("/{thing_name}", response_model=DevicePublic)
def get_device(request: Request, thing_name: str, who: Viewer) -> Device:
    with request.app.state.db.session() as s:
        return _known(s, thing_name)


def _known(s: Session, thing_name: str) -> Device:
    device = s.get(Device, thing_name)
    if device is None:
        raise HTTPException(404, f"no device {thing_name!r}")
    return device


class LogPullBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lines: int = Field(default=500, ge=1, le=5000)


class PulledLog(BaseModel):
    id: int
    job_id: str | None
    at: datetime
    received_at: datetime
    lines: list[str]


@router.post("/{thing_name}/log-pull", status_code=202)
def log_pull(
    request: Request, thing_name: str, who: Operator, body: LogPullBody | None = None
) -> dict[str, Any]:
    """Ask a device for its recent log: a `tidegate.log-pull` job; the device uploads the lines
    (redacted, at most 64 KiB) over its own MQTT connection, then GET …/logs shows them."""
    import uuid

    from fleet_server.jobs import protocol

    now = request.app.state.clock()
    job_id = f"log-{uuid.uuid4().hex[:12]}"
    document = {"operation": "tidegate.log-pull", "lines": (body or LogPullBody()).lines}
    with request.app.state.db.session() as s:
        _known(s, thing_name)
        out = protocol.create_execution(s, thing_name, job_id, document, now)
        actor, role = who.name, who.role.value
        audit(s, actor=actor, role=role, action="device.log_pull", target=thing_name, outcome="ok", now=now)
    request.app.state.publish(out)
    return {"job_id": job_id, "thing_name": thing_name}


@router.get("/{thing_name}/logs", response_model=list[PulledLog])
def pulled_logs(
    request: Request, thing_name: str, who: Operator, limit: Annotated[int, Query(ge=1, le=20)] = 5
) -> list[PulledLog]:
    """The logs this device uploaded for log-pull jobs, newest first."""
    from fleet_server.telemetry.models import TelemetryRecord

    with request.app.state.db.session() as s:
        _known(s, thing_name)
        rows = s.scalars(
            select(TelemetryRecord)
            .where(TelemetryRecord.thing_name == thing_name, TelemetryRecord.kind == "log")
            .order_by(TelemetryRecord.id.desc())
            .limit(limit)
        ).all()
        return [
            PulledLog(
                id=r.id,
                job_id=(r.payload or {}).get("job_id"),
                at=r.at,
                received_at=r.received_at,
                lines=list((r.payload or {}).get("lines", [])),
            )
            for r in rows
        ]


@router.get("/{thing_name}/beacons")
def beacons(
    request: Request, thing_name: str, who: Viewer, limit: Annotated[int, Query(ge=1, le=500)] = 60
) -> list[dict[str, Any]]:
    """The device's recent health beacons, oldest first (the server keeps the last few)."""
    from fleet_server.telemetry.models import TelemetryRecord

    with request.app.state.db.session() as s:
        _known(s, thing_name)
        rows = s.scalars(
            select(TelemetryRecord)
            .where(TelemetryRecord.thing_name == thing_name, TelemetryRecord.kind == "beacon")
            .order_by(TelemetryRecord.seq.desc())
            .limit(limit)
        ).all()
        return [dict(r.payload or {}) for r in reversed(rows)]
