"""/api/v1/groups — static device groups; thin over `devices.service`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from fleet_server.auth.deps import Principal, require
from fleet_server.auth.service import Role, audit
from fleet_server.devices import service
from fleet_server.devices.models import DeviceGroup
from fleet_server.paging import by_name, known_filters

router = APIRouter(prefix="/api/v1/groups", tags=["groups"])
GroupName = Annotated[str, PathParam(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9:_.-]+$")]
ThingName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9:_-]+$")]
Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]


class GroupCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9:_.-]+$")
    description: str = Field(default="", max_length=1024)
    things: list[ThingName] = Field(default_factory=list, max_length=100_000)


class MembersChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    add: list[ThingName] = Field(default_factory=list, max_length=100_000)
    remove: list[ThingName] = Field(default_factory=list, max_length=100_000)


class GroupPublic(BaseModel):
    name: str
    description: str
    created_at: datetime
    things: list[str]


def _fail(exc: service.GroupError) -> HTTPException:
    if isinstance(exc, service.UnknownGroupError):
        return HTTPException(404, str(exc))
    return HTTPException(409 if "exists" in str(exc) else 422, str(exc))


@router.get("", response_model=list[GroupPublic], dependencies=[known_filters("prefix", "after", "limit")])
def list_groups(
    request: Request,
    who: Viewer,
    prefix: Annotated[str | None, Query(max_length=128)] = None,
    after: Annotated[str | None, Query(max_length=128, description="cursor: the last name seen")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> list[GroupPublic]:
    """Groups by name; page with `after`."""
    q = by_name(select(DeviceGroup), DeviceGroup.name, prefix=prefix, after=after, limit=limit)
    with request.app.state.db.session() as s:
        groups = s.scalars(q).all()
        return [
            GroupPublic(
                name=g.name,
                description=g.description,
                created_at=g.created_at,
                things=service.group_members(s, g.name),
            )
            for g in groups
        ]


@router.post("", response_model=GroupPublic, status_code=201)
def create_group(request: Request, body: GroupCreate, who: Operator) -> GroupPublic:
    now = request.app.state.clock()
    try:
        with request.app.state.db.session() as s:
            g = service.create_group(
                s, name=body.name, description=body.description, things=body.things, now=now
            )
            audit(
                s,
                actor=who.name,
                role=who.role.value,
                action="group.create",
                target=body.name,
                outcome="ok",
                now=now,
            )
            return GroupPublic(
                name=g.name,
                description=g.description,
                created_at=g.created_at,
                things=service.group_members(s, g.name),
            )
    except service.GroupError as exc:
        raise _fail(exc) from exc


@router.get("/{name}", response_model=GroupPublic)
def get_group(request: Request, name: GroupName, who: Viewer) -> GroupPublic:
    with request.app.state.db.session() as s:
        g = s.get(DeviceGroup, name)
        if g is None:
            raise HTTPException(404, f"no group {name!r}")
        return GroupPublic(
            name=g.name,
            description=g.description,
            created_at=g.created_at,
            things=service.group_members(s, name),
        )


@router.post("/{name}/members", response_model=GroupPublic)
def change_members(request: Request, name: GroupName, body: MembersChange, who: Operator) -> GroupPublic:
    now = request.app.state.clock()
    try:
        with request.app.state.db.session() as s:
            things = service.change_members(s, name=name, add=body.add, remove=body.remove)
            audit(
                s,
                actor=who.name,
                role=who.role.value,
                action="group.members",
                target=name,
                outcome=f"ok: +{len(body.add)} -{len(body.remove)}",
                now=now,
            )
            g = s.get(DeviceGroup, name)
            assert g is not None
            return GroupPublic(name=g.name, description=g.description, created_at=g.created_at, things=things)
    except service.GroupError as exc:
        raise _fail(exc) from exc


@router.delete("/{name}", status_code=204)
def delete_group(request: Request, name: GroupName, who: Operator) -> None:
    now = request.app.state.clock()
    try:
        with request.app.state.db.session() as s:
            service.delete_group(s, name=name)
            audit(
                s,
                actor=who.name,
                role=who.role.value,
                action="group.delete",
                target=name,
                outcome="ok",
                now=now,
            )
    except service.GroupError as exc:
        raise _fail(exc) from exc
