"""FastAPI dependencies: the caller's principal from a bearer token, and role checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fleet_server.auth.service import Role, authenticate

_bearer = HTTPBearer(auto_error=False, description="An operator token from `tidegate server token create`.")


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role


def require(role: Role) -> Callable[..., Principal]:
    def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> Principal:
        if credentials is None or not credentials.credentials:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"}
            )
        with request.app.state.db.session() as s:
            token = authenticate(s, token=credentials.credentials)
            principal = None if token is None else Principal(token.name, Role(token.role))
        if principal is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "invalid or revoked token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not principal.role.allows(role):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, f"role {principal.role.value} may not do this; needs {role.value}"
            )
        return principal

    return dependency
