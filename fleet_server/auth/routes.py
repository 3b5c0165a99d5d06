"""/api/v1/tokens (admin: list, create, revoke) and /api/v1/audit (admin: what operators did)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from fleet_server.auth.deps import Principal, require
from fleet_server.auth.models import ApiToken, AuditEntry
from fleet_server.auth.service import Role, TokenNotFoundError, audit, issue_token, revoke_token
from fleet_server.paging import known_filters

router = APIRouter(prefix="/api/v1", tags=["auth"])
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
MAX_ID = 2**31 - 1  # the id columns' range on every database


class TokenPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    role: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked: bool


class AuditPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    at: datetime
    actor: str
    role: str
    action: str
    target: str | None
    outcome: str


@router.get(
    "/tokens",
    response_model=list[TokenPublic],
    dependencies=[known_filters("name", "role", "revoked", "after_id", "limit")],
)
def list_tokens(
    request: Request,
    who: Admin,
    name: Annotated[str | None, Query(max_length=128)] = None,
    role: Role | None = None,
    revoked: bool | None = None,
    after_id: Annotated[int | None, Query(ge=0, le=MAX_ID, description="cursor: the last id seen")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> list[ApiToken]:
    """Every token's holder, role, expiry and last use (never the token), oldest first."""
    q = select(ApiToken).order_by(ApiToken.id).limit(limit)
    if name is not None:
        q = q.where(ApiToken.name == name)
    if role is not None:
        q = q.where(ApiToken.role == role.value)
    if revoked is not None:
        q = q.where(ApiToken.revoked.is_(revoked))
    if after_id is not None:
        q = q.where(ApiToken.id > after_id)
    with request.app.state.db.session() as s:
        return list(s.scalars(q).all())


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    role: Role
    expires_days: float | None = Field(default=None, gt=0, le=3650)


class TokenCreated(TokenPublic):
    token: str  # shown once: only its SHA-256 is stored


@router.post("/tokens", response_model=TokenCreated, status_code=201)
def create(request: Request, body: TokenCreate, who: Admin) -> TokenCreated:
    """A new operator token (admin); the response is the only place it ever appears."""
    from datetime import timedelta

    now = request.app.state.clock()
    expires = now + timedelta(days=body.expires_days) if body.expires_days is not None else None
    with request.app.state.db.session() as s:
        token, row = issue_token(s, name=body.name, role=body.role, now=now, expires_at=expires)
        audit(
            s,
            actor=who.name,
            role=who.role.value,
            action="token.create",
            target=body.name,
            outcome="ok",
            now=now,
        )
        return TokenCreated(**TokenPublic.model_validate(row).model_dump(), token=token)


@router.post("/tokens/{token_id}/revoke", response_model=TokenPublic)
def revoke(request: Request, token_id: Annotated[int, PathParam(ge=1, le=MAX_ID)], who: Admin) -> ApiToken:
    now = request.app.state.clock()
    with request.app.state.db.session() as s:
        try:
            (row,) = revoke_token(s, token_id=token_id)
        except TokenNotFoundError as exc:
            raise HTTPException(404, str(exc)) from exc
        audit(
            s,
            actor=who.name,
            role=who.role.value,
            action="token.revoke",
            target=row.name,
            outcome="ok",
            now=now,
        )
        s.flush()
        return row


@router.get("/audit", response_model=list[AuditPublic])
def read_audit(
    request: Request,
    who: Admin,
    actor: Annotated[str | None, Query(max_length=128)] = None,
    action: Annotated[
        str | None, Query(max_length=64, description="exact, or a prefix ending in '.'")
    ] = None,
    target: Annotated[str | None, Query(max_length=128)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before_id: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="cursor: entries older than this id")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditEntry]:
    """The audit log, newest first, filtered; page with `before_id` (the last id seen)."""
    q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if actor:
        q = q.where(AuditEntry.actor == actor)
    if action:
        q = q.where(
            AuditEntry.action.startswith(action, autoescape=True)
            if action.endswith(".")
            else AuditEntry.action == action
        )
    if target:
        q = q.where(AuditEntry.target == target)
    if since is not None:
        q = q.where(AuditEntry.at >= _utc(since, "since"))
    if until is not None:
        q = q.where(AuditEntry.at < _utc(until, "until"))
    if before_id is not None:
        q = q.where(AuditEntry.id < before_id)
    with request.app.state.db.session() as s:
        return list(s.scalars(q).all())


def _utc(value: datetime, name: str) -> datetime:
    """A filter time in UTC (naive means UTC); one that cannot be is a 422, not a 500."""
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise HTTPException(422, f"{name}: {value.isoformat()} is outside the representable range") from exc
