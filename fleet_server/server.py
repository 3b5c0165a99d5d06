"""`tidegate server run`: HTTP API, the AWS IoT Jobs service over MQTT and the campaign
scheduler in one process; with `--api-only`, the API alone (a replica that serves operators
and dashboards while the others serve devices and tick campaigns)."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import uvicorn

from fleet_server.alerts.watch import DriftWatch, DriftWatchConfig
from fleet_server.app import create_app
from fleet_server.db import Database
from fleet_server.jobs.bridge import JobsBridge
from fleet_server.jobs.throttle import DeviceLimiter
from fleet_server.releases.keeper import RepositoryKeeper
from fleet_server.scheduler import CampaignScheduler
from fleet_server.settings import Settings
from fleet_server.webhooks.dispatcher import WebhookDispatcher
from shared.errors import TidegateError
from shared.trust import UpdateRepository

log = logging.getLogger("tidegate.server")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class SingleReplicaError(TidegateError):
    pass


def claim_sqlite(db: Database) -> IO[str] | None:
    """SQLite serves one fleet server: its campaign ticks and sweeps are not shared between
    processes. A second server on the same file is refused with the reason (the first one's
    pid) rather than both ticking every campaign; the lock goes with the process, however it
    ends. Returns the held lock file (None for other databases)."""
    import fcntl
    import os

    from sqlalchemy.engine import make_url

    url = make_url(db.url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    path = Path(url.database).resolve().with_suffix(".server.lock")
    fh = path.open("a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise SingleReplicaError(
            f"another fleet server (pid {holder}) runs on the SQLite database {url.database}: SQLite "
            "serves one replica; use PostgreSQL (TIDEGATE_DATABASE_URL) to run more"
        ) from exc
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


class FleetServer:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        host: str,
        port: int,
        tick_s: float = 1.0,
        api_only: bool = False,
    ) -> None:
        """`api_only`: the API and the dashboard, with a publish-only MQTT connection for what
        operators' actions send; no device traffic, scheduler, sweeper, webhook deliveries or
        repository refresh (the full replicas do those). Its requests never wait behind a
        jobs batch or a campaign tick in the same interpreter. Needs PostgreSQL."""
        if api_only and db.engine.dialect.name != "postgresql":
            raise SingleReplicaError(
                "an API-only fleet server needs PostgreSQL (TIDEGATE_DATABASE_URL): SQLite serves "
                "one fleet-server process"
            )
        self.db, self.api_only = db, api_only
        self.bridge = JobsBridge(
            db,
            host=settings.mqtt_host,
            port=settings.mqtt_port,
            client_id=settings.mqtt_client_id,
            renotify_after=timedelta(seconds=settings.renotify_queued_s),
            sweep_interval_s=settings.sweep_interval_s,
            tls=(settings.mqtt_ca_file, settings.mqtt_cert_file, settings.mqtt_key_file)
            if settings.mqtt_ca_file and settings.mqtt_cert_file and settings.mqtt_key_file
            else None,
            limiter=DeviceLimiter(settings.jobs_device_rate_per_s, settings.jobs_device_burst),
            serve_devices=not api_only,
        )
        watch = DriftWatch(
            DriftWatchConfig(psi_threshold=settings.drift_psi_threshold, min_scores=settings.drift_min_scores)
        )
        self.scheduler = CampaignScheduler(
            db,
            self.bridge.publish,
            _utcnow,
            interval_s=tick_s,
            watch=watch,
            webhooks=settings.alert_webhooks,
            busy=self.bridge.busy,
        )
        repo = UpdateRepository(settings.repository_dir) if settings.repository_dir else None
        self.keeper = (
            RepositoryKeeper(repo, _utcnow, interval_s=settings.repository_refresh_check_s) if repo else None
        )
        self.app = create_app(
            db,
            publish=self.bridge.publish,
            repository=repo,
            counters=self.bridge.counters,
            score_psi=lambda: dict(watch.last_psi),
            bench_keys=settings.bench_keys,
            bench_simulated_thermal_skus=settings.bench_simulated_thermal_skus,
            leases=None if api_only else self.bridge.leases,
        )
        self.app.state.drift = watch.config
        self.app.state.broker_connected = self.bridge.connected.is_set
        self.webhooks = WebhookDispatcher(db, _utcnow)
        self.http = uvicorn.Server(
            uvicorn.Config(self.app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        )

    def run(self) -> None:
        """Blocks until SIGINT/SIGTERM (uvicorn's handlers), then stops everything."""
        self._lock = claim_sqlite(self.db)  # held for the process's life
        self.bridge.start()
        if not self.api_only:
            self.scheduler.start()
            self.webhooks.start()
            if self.keeper is not None:
                self.keeper.start()
        try:
            self.http.run()
        finally:
            if not self.api_only:
                if self.keeper is not None:
                    self.keeper.stop()
                self.scheduler.stop()
            self.webhooks.stop()  # closes its HTTP client, started or not
            self.bridge.stop()

    def start_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.run, daemon=True)
        t.start()
        return t
