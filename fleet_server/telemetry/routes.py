"""/api/v1/fleet — the fleet at a glance, from the devices' latest beacons."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from fleet_server.auth.deps import Principal, require
from fleet_server.auth.service import Role
from fleet_server.telemetry.metrics import summary

router = APIRouter(prefix="/api/v1/fleet", tags=["fleet"])
Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]


@router.get("/summary")
def fleet_summary(request: Request, who: Viewer) -> dict[str, Any]:
    """Devices, on-device inference (requests, error ratio, p95), OOD inputs, heat, and the
    same per active version: the dashboard's fleet tiles."""
    with request.app.state.db.session() as s:
        return summary(s)
