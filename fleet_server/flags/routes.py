"""/api/v1/flags: the flag store the gateways cache (viewers read, operators write)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from fleet_server.auth.deps import Principal, require
from fleet_server.auth.service import Role, audit
from fleet_server.flags.models import FeatureFlag
from fleet_server.paging import by_name, known_filters

router = APIRouter(prefix="/api/v1/flags", tags=["flags"])
FlagKey = Annotated[str, PathParam(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9_.:-]+$")]
Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]


class FlagBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: Any = Field(description="Any JSON value (at most 16 KiB encoded).")
    description: str = Field(default="", max_length=1024)


class FlagPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    key: str
    value: Any
    description: str
    version: int
    updated_at: datetime
    updated_by: str


@router.get("", response_model=list[FlagPublic], dependencies=[known_filters("prefix", "after", "limit")])
def list_flags(
    request: Request,
    who: Viewer,
    prefix: Annotated[str | None, Query(max_length=128, description="keys starting with this")] = None,
    after: Annotated[str | None, Query(max_length=128, description="cursor: the last key seen")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
) -> list[FeatureFlag]:
    """Flags by key (all of them by default: gateways read the whole set); page with `after`."""
    q = by_name(select(FeatureFlag), FeatureFlag.key, prefix=prefix, after=after, limit=limit)
    with request.app.state.db.session() as s:
        return list(s.scalars(q).all())


@router.put("/{key}", response_model=FlagPublic)
def set_flag(request: Request, key: FlagKey, body: FlagBody, who: Operator) -> FeatureFlag:
    import json

    if len(json.dumps(body.value)) > 16 * 1024:
        raise HTTPException(422, "value: at most 16 KiB of JSON")
    now = request.app.state.clock()
    with request.app.state.db.session() as s:
        flag: FeatureFlag | None = s.get(FeatureFlag, key)
        if flag is None:
            flag = FeatureFlag(
                key=key,
                value=body.value,
                description=body.description,
                version=1,
                updated_at=now,
                updated_by=who.name,
            )
            s.add(flag)
        else:
            flag.value, flag.description, flag.version = body.value, body.description, flag.version + 1
            flag.updated_at, flag.updated_by = now, who.name
        audit(s, actor=who.name, role=who.role.value, action="flag.set", target=key, outcome="ok", now=now)
        s.flush()
        return flag


@router.delete("/{key}", status_code=204)
def delete_flag(request: Request, key: FlagKey, who: Operator) -> None:
    """Remove a flag (what an experiment that created one does when it is reverted)."""
    now = request.app.state.clock()
    with request.app.state.db.session() as s:
        flag: FeatureFlag | None = s.get(FeatureFlag, key)
        if flag is None:
            raise HTTPException(404, f"no flag {key!r}")
        s.delete(flag)
        audit(s, actor=who.name, role=who.role.value, action="flag.delete", target=key, outcome="ok", now=now)
