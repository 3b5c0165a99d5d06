"""FastAPI dependencies: the caller's principal from a bearer token, and role checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import HTTPException, Request, status

from fleet_server.auth.service import Role, authenticate
from fleet_server.db import Database


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role


def principal_from_header(db: Database, header: str | None) -> Principal | None:
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    with db.session() as s:
        row = authenticate(s, token=token.strip())
        return None if row is None else Principal(row.name, Role(row.role))


def require(role: Role) -> Callable[..., Principal]:
    def dependency(request: Request) -> Principal:
        principal: Principal | None = getattr(request.state, "principal", None)
        if principal is None:  # the app's middleware authenticates every /api/ call first
            principal = principal_from_header(request.app.state.db, request.headers.get("authorization"))
        if principal is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"}
            )
        if not principal.role.allows(role):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, f"role {principal.role.value} may not do this; needs {role.value}"
            )
        return principal

    return dependency
