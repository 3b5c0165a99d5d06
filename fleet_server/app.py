"""The fleet server's HTTP side: `create_app` wires the routers, health and metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm.exc import StaleDataError

from fleet_server.auth.deps import principal_from_header
from fleet_server.auth.routes import router as auth_router
from fleet_server.campaigns.models import Campaign
from fleet_server.campaigns.routes import router as campaigns_router
from fleet_server.db import Database
from fleet_server.devices.groups import router as groups_router
from fleet_server.devices.routes import router as devices_router
from fleet_server.flags.routes import router as flags_router
from fleet_server.jobs.models import JobExecution
from fleet_server.jobs.partitions import PartitionLeases
from fleet_server.jobs.protocol import Outgoing
from fleet_server.jobs.routes import router as executions_router
from fleet_server.releases.routes import router as releases_router
from fleet_server.releases.service import parse_bench_keys
from fleet_server.telemetry.metrics import FleetGauges
from fleet_server.telemetry.routes import router as fleet_router
from fleet_server.webhooks.routes import router as webhooks_router
from shared.errors import TidegateError
from shared.logs import REQUEST_ID_HEADER, correlated
from shared.sysmetrics import register_system_metrics
from shared.trust import UpdateRepository
from shared.version import TIDEGATE_VERSION


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _Totals(Collector):
    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self.read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, value in self.read().items():
            yield CounterMetricFamily(f"tidegate_{name}", name.replace("_", " "), value=value)


def create_app(
    db: Database,
    *,
    publish: Callable[[list[Outgoing]], None] = lambda out: None,
    clock: Callable[[], datetime] = _utcnow,
    repository: UpdateRepository | None = None,
    counters: Callable[[], dict[str, float]] | None = None,
    score_psi: Callable[[], dict[str, float]] | None = None,
    bench_keys: Mapping[str, str] | None = None,
    bench_simulated_thermal_skus: Collection[str] = (),
    leases: PartitionLeases | None = None,
) -> FastAPI:
    """`counters`: monotonic totals from the MQTT side (the bridge's `counters`), exported on
    /metrics as ``tidegate_<name>_total``; `score_psi`: the drift watch's latest PSI per
    running campaign; `leases`: the jobs bridge's partitions (readiness and a gauge)."""
    app = FastAPI(
        title="Tidegate fleet server",
        version=TIDEGATE_VERSION,
        description="Devices, campaigns in gated waves, and the AWS IoT Jobs protocol.",
    )
    app.state.db, app.state.publish, app.state.clock = db, publish, clock
    app.state.repository = repository
    # The bench hosts whose signed HIL reports are accepted (name → ed25519 public key), and
    # the SKUs whose reports may come from a simulated thermal zone.
    app.state.bench_keys = parse_bench_keys(bench_keys or {})
    app.state.bench_simulated_thermal_skus = frozenset(bench_simulated_thermal_skus)
    # Declares the bearer scheme in /openapi.json; the middleware and `require` enforce it.
    documented = [
        Depends(HTTPBearer(auto_error=False, description="A token from `tidegate server token create`."))
    ]
    app.include_router(auth_router, dependencies=documented)
    app.include_router(devices_router, dependencies=documented)
    app.include_router(groups_router, dependencies=documented)
    app.include_router(campaigns_router, dependencies=documented)
    app.include_router(releases_router, dependencies=documented)
    app.include_router(flags_router, dependencies=documented)
    app.include_router(fleet_router, dependencies=documented)
    app.include_router(executions_router, dependencies=documented)
    app.include_router(webhooks_router, dependencies=documented)

    registry = CollectorRegistry()
    register_system_metrics(registry)
    campaigns = Gauge("tidegate_campaigns", "Campaigns by state", ["state"], registry=registry)
    executions = Gauge("tidegate_job_executions", "Job executions by status", ["status"], registry=registry)
    if counters is not None:
        registry.register(_Totals(counters))
    app.state.leases = leases
    if leases is not None:
        Gauge(
            "tidegate_jobs_partitions_held",
            "Jobs partitions this replica leases (of 64; docs/SCALING.md)",
            registry=registry,
        ).set_function(lambda: float(leases.held))
    fleet = FleetGauges(registry)
    psi = Gauge(
        "tidegate_campaign_score_psi", "Score PSI, updated vs other devices", ["campaign"], registry=registry
    )

    @app.middleware("http")
    async def authenticate_first(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """Every /api/ call is authenticated before anything else looks at it, so a caller
        without a valid token learns nothing (not even how its body would be validated)."""
        with correlated(request.headers.get(REQUEST_ID_HEADER)) as rid:
            if request.url.path.startswith("/api/"):
                principal = principal_from_header(db, request.headers.get("authorization"))
                if principal is None:
                    return JSONResponse(
                        {"detail": "missing, invalid or revoked bearer token"},
                        status_code=401,
                        headers={"WWW-Authenticate": "Bearer", REQUEST_ID_HEADER: rid},
                    )
                request.state.principal = principal
            response = await call_next(request)
            response.headers[REQUEST_ID_HEADER] = rid
            return response

    @app.exception_handler(StaleDataError)
    async def _conflict(request: Request, exc: StaleDataError) -> JSONResponse:
        # A device (or the sweeper) moved an execution on while this request changed it.
        return JSONResponse(
            status_code=409, content={"detail": "an execution changed at the same moment; try again"}
        )

    @app.exception_handler(TidegateError)
    async def _refused(request: Request, exc: TidegateError) -> JSONResponse:
        # Only deliberate errors get their own status; anything else (a ValueError from a bug
        # included) is a 500 with a traceback in the log, never passed off as the caller's mistake.
        return JSONResponse(status_code=exc.http_status, content={"detail": str(exc)})

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

    @app.get("/readyz", tags=["health"], response_model=None)
    def readyz() -> dict[str, str] | JSONResponse:
        """Ready when the database answers, the jobs bridge is connected to the broker (a
        replica without its broker would take API calls it cannot act on) and its partition
        leases are current (one that cannot renew them may already have lost them)."""
        with db.session() as s:
            s.execute(select(1))
        if (connected := getattr(app.state, "broker_connected", None)) is not None and not connected():
            why = {"ready": "false", "why": "not connected to the MQTT broker"}
            return JSONResponse(why, status_code=503)
        if app.state.leases is not None and not app.state.leases.healthy():
            why = {"ready": "false", "why": "the jobs partition leases were not renewed in time"}
            return JSONResponse(why, status_code=503)
        return {"ready": "true"}

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
            fleet.update(s)
        psi.clear()
        for cid, value in (score_psi() if score_psi else {}).items():
            psi.labels(cid).set(value)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
