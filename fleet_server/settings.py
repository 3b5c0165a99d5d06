"""Fleet server settings, from the environment (``TIDEGATE_*``) or a ``.env`` file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TIDEGATE_", env_file=".env", extra="ignore")

    database_url: str = Field(
        default="sqlite:///./tidegate.db",
        description="SQLAlchemy URL; PostgreSQL: postgresql+psycopg://user@host/db",
    )
    mqtt_host: str = Field(default="127.0.0.1", description="the broker the jobs bridge connects to")
    mqtt_port: int = 1883
    mqtt_client_id: str = Field(
        default="tidegate-fleet-server", description="unique per replica (persistent session)"
    )
    mqtt_ca_file: Path | None = Field(
        default=None, description="TLS to the broker: CA, client certificate and key"
    )
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    repository_dir: Path | None = Field(
        default=None, description="the TUF repository the server signs into and serves at /repo"
    )
    repository_refresh_check_s: float = Field(
        default=300.0,
        gt=0,
        description="how often the server checks whether snapshot and timestamp need re-signing "
        "(it re-signs in the last half of their validity)",
    )
    renotify_queued_s: float = Field(
        default=60.0, description="re-notify devices whose queued job may have been missed"
    )
    jobs_device_rate_per_s: float = Field(
        default=5.0,
        gt=0,
        description="each device's sustained MQTT requests a second; beyond it (and its burst) the "
        "bridge answers RequestThrottled without touching the database",
    )
    jobs_device_burst: int = Field(default=50, ge=1, description="requests a device may send at once")
    sweep_interval_s: float = Field(
        default=5.0, description="how often step and in-progress timeouts are swept"
    )
    # Alerts: webhooks notified (JSON POST) and the score-drift pause of running campaigns.
    alert_webhooks: list[str] = Field(
        default=[], description='JSON list of URLs notified on alerts, e.g. ["https://hooks.example/x"]'
    )
    bench_keys: dict[str, str] = Field(
        default={},
        description='bench hosts whose signed HIL reports are accepted: JSON {"name": "<public key>"} '
        "(the key `tidegate hil keygen` prints)",
    )
    bench_simulated_thermal_skus: list[str] = Field(
        default=[], description="SKUs whose bench reports may come from a simulated thermal zone (JSON list)"
    )
    drift_psi_threshold: float = Field(
        default=0.25, description="score PSI (updated vs other devices) that pauses a campaign"
    )
    drift_min_scores: int = Field(
        default=200, description="answers needed on each side of a slice before PSI counts"
    )
