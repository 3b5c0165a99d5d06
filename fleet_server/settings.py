"""Fleet server settings, from the environment (``TIDEGATE_*``) or a ``.env`` file."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TIDEGATE_", env_file=".env", extra="ignore")

    database_url: str = "sqlite:///./tidegate.db"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_client_id: str = "tidegate-fleet-server"
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    repository_dir: Path | None = None  # the TUF repository the server signs into and serves at /repo
    renotify_queued_s: float = 60.0
    sweep_interval_s: float = 5.0
    # Alerts: webhooks notified (JSON POST) and the score-drift pause of running campaigns.
    alert_webhooks: list[str] = []
    drift_psi_threshold: float = 0.25
    drift_min_scores: int = 200
