"""Tokens and roles: viewer < operator < admin. Keyword-only, inside the caller's transaction."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.auth.models import ApiToken, AuditEntry

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


def create_token(session: Session, *, name: str, role: Role, now: datetime) -> str:
    """Make a token; returns it in clear text, the only time it exists outside the caller."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiToken(name=name, role=role.value, token_sha256=_digest(token), created_at=now, revoked=False)
    )
    return token


def authenticate(session: Session, *, token: str) -> ApiToken | None:
    digest = _digest(token)
    row = session.scalars(select(ApiToken).where(ApiToken.token_sha256 == digest)).first()
    if row is None or row.revoked or not hmac.compare_digest(row.token_sha256, digest):
        return None
    return row


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
