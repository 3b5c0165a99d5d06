"""Tokens and roles: viewer < operator < admin. Keyword-only, inside the caller's transaction."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.auth.models import ApiToken, AuditEntry
from fleet_server.errors import NotFoundError

TOKEN_PREFIX = "tg_"


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        order = [Role.VIEWER, Role.OPERATOR, Role.ADMIN]
        return order.index(self) >= order.index(needed)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    session: Session, *, name: str, role: Role, now: datetime, expires_at: datetime | None = None
) -> str:
    """Make a token; returns it in clear text, the only time it exists outside the caller."""
    return issue_token(session, name=name, role=role, now=now, expires_at=expires_at)[0]


def issue_token(
    session: Session, *, name: str, role: Role, now: datetime, expires_at: datetime | None = None
) -> tuple[str, ApiToken]:
    """`create_token`, with the stored row (flushed: it has its id)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        name=name,
        role=role.value,
        token_sha256=_digest(token),
        created_at=now,
        revoked=False,
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return token, row


LAST_USED_EVERY = timedelta(minutes=1)  # how stale `last_used_at` may be: a write per minute, not per call


def authenticate(session: Session, *, token: str, now: datetime | None = None) -> ApiToken | None:
    """The token's row, or None when it is unknown, revoked or expired."""
    digest = _digest(token)
    row = session.scalars(select(ApiToken).where(ApiToken.token_sha256 == digest)).first()
    if row is None or row.revoked or not hmac.compare_digest(row.token_sha256, digest):
        return None
    now = now or datetime.now(UTC)
    if row.expires_at is not None and now >= row.expires_at:
        return None
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY:
        row.last_used_at = now
    return row


class TokenNotFoundError(NotFoundError):
    pass


def revoke_token(session: Session, *, token_id: int | None = None, name: str | None = None) -> list[ApiToken]:
    """Revoke a token by id, or every token of a holder's name; the revoked rows."""
    q = select(ApiToken).where(ApiToken.revoked.is_(False))
    q = q.where(ApiToken.id == token_id) if token_id is not None else q.where(ApiToken.name == name)
    rows = list(session.scalars(q).all())
    if not rows:
        raise TokenNotFoundError(
            f"no live token {'#' + str(token_id) if token_id is not None else 'named ' + repr(name)}"
        )
    for row in rows:
        row.revoked = True
    return rows


def audit(
    session: Session,
    *,
    actor: str,
    role: str,
    action: str,
    target: str | None,
    outcome: str,
    now: datetime,
    details: dict[str, Any] | None = None,
) -> None:
    session.add(
        AuditEntry(
            at=now,
            actor=actor,
            role=role,
            action=action,
            target=target,
            outcome=outcome,
            details=details or {},
        )
    )
