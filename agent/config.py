"""``agent.toml``: everything the daemon needs, validated at start.

A corrupt or incomplete file stops the daemon with one clear line naming the
file and the field; nothing starts half-configured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import AgentError
from shared.settings_file import first_error, read_toml


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceSection(_Section):
    root: Path = Path("/var/lib/tidegate")


class MqttSection(_Section):
    transport: Literal["paho", "awsiot"] = "paho"
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    keepalive_s: int = Field(default=30, ge=5)
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0)
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None


class JobsSection(_Section):
    poll_s: float = Field(default=60.0, gt=0)
    reply_timeout_s: float = Field(default=10.0, gt=0)
    progress_interval_s: float = Field(default=5.0, ge=0)
    precondition_recheck_s: float = Field(default=30.0, gt=0)
    hook_retry_s: float = Field(default=300.0, gt=0)  # after a device hook's "retry later" (exit 21)
    step_timeout_min: int | None = Field(default=None, ge=1, le=10080)


class VehicleSection(_Section):
    state_file: Path = Path("/run/tidegate/vehicle.json")
    max_age_s: float | None = Field(default=300.0, gt=0)


class ThermalSection(_Section):
    root: Path = Path("/sys/class/thermal")
    thresholds_c: list[float] = Field(default_factory=lambda: [70.0, 80.0, 90.0], min_length=1)
    hysteresis_c: float = Field(default=5.0, ge=0)
    install_limit_c: float = 80.0
    poll_s: float = Field(default=2.0, gt=0)


class TelemetrySection(_Section):
    beacon_interval_s: float = Field(default=60.0, gt=0)
    queue_max: int = Field(default=10_000, ge=1)


class HealthSection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=9810, ge=0, le=65535)
    # Where /metrics reads the machine's figures (proc/stat, proc/meminfo, a Jetson's
    # sys/devices/gpu.0/load): "/" on a device, a directory laid out alike in tests.
    system_root: Path = Path("/")


class BatcherSection(_Section):
    enabled: bool = True
    max_batch: int = Field(default=32, ge=1)
    max_delay_ms: float = Field(default=5.0, ge=0)
    max_queue: int = Field(default=1024, ge=1)
    concurrency: int = Field(default=2, ge=1)


class AgentConfig(_Section):
    device: DeviceSection = DeviceSection()
    mqtt: MqttSection = MqttSection()
    jobs: JobsSection = JobsSection()
    vehicle: VehicleSection = VehicleSection()
    thermal: ThermalSection = ThermalSection()
    telemetry: TelemetrySection = TelemetrySection()
    health: HealthSection = HealthSection()
    batcher: BatcherSection = BatcherSection()

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        raw = read_toml(path, AgentError, "config file")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise AgentError(f"{path}: {first_error(exc)}") from exc
