"""The fleet server's HTTP side: `create_app` wires the routers, health and metrics."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from sqlalchemy import func, select

from fleet_server.campaigns.models import Campaign
from fleet_server.campaigns.routes import router as campaigns_router
from fleet_server.db import Database
from fleet_server.devices.routes import router as devices_router
from fleet_server.jobs.models import JobExecution
from fleet_server.jobs.protocol import Outgoing
from fleet_server.releases.routes import router as releases_router
from shared.trust import UpdateRepository
from shared.version import TIDEGATE_VERSION


def _utcnow() -> datetime:
    return datetime.now(UTC)


def create_app(
    db: Database,
    *,
    publish: Callable[[list[Outgoing]], None] = lambda out: None,
    clock: Callable[[], datetime] = _utcnow,
    repository: UpdateRepository | None = None,
) -> FastAPI:
    app = FastAPI(
        title="Tidegate fleet server",
        version=TIDEGATE_VERSION,
        description="Devices, campaigns in gated waves, and the AWS IoT Jobs protocol.",
    )
    app.state.db, app.state.publish, app.state.clock = db, publish, clock
    app.state.repository = repository
    app.include_router(devices_router)
    app.include_router(campaigns_router)
    app.include_router(releases_router)

    registry = CollectorRegistry()
    campaigns = Gauge("tidegate_campaigns", "Campaigns by state", ["state"], registry=registry)
    executions = Gauge("tidegate_job_executions", "Job executions by status", ["status"], registry=registry)

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    page = (Path(__file__).parent / "dashboard" / "page.html").read_bytes()

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    def dashboard() -> HTMLResponse:
        """The operators' live page; it reads the API with the operator's own token."""
        return HTMLResponse(page)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        with db.session() as s:
            s.execute(select(1))
        return {"status": "ok"}

    @app.get("/metrics", tags=["health"], response_class=Response)
    def metrics() -> Response:
        with db.session() as s:
            campaigns.clear()
            for state, n in s.execute(select(Campaign.state, func.count()).group_by(Campaign.state)):
                campaigns.labels(state).set(n)
            executions.clear()
            for status, n in s.execute(
                select(JobExecution.status, func.count()).group_by(JobExecution.status)
            ):
                executions.labels(status).set(n)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
