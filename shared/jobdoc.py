"""The Tidegate job document: what the fleet server puts in an AWS IoT Jobs execution and
the agent executes. Strict: an unknown field is refused (REJECTED by the device)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Network = Literal["wifi", "cellular", "ethernet", "none"]


class Preconditions(BaseModel):
    """Device-side preconditions, checked before download and again before the flip."""

    model_config = ConfigDict(extra="forbid")

    min_battery_pct: float | None = Field(default=None, ge=0, le=100)
    require_parked: bool = False
    require_ignition_off: bool = False
    networks: list[Network] | None = None
    min_firmware: str | None = None
    min_free_disk_mb: float | None = Field(default=None, ge=0)
    max_temperature_c: float | None = None


class JobDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operation: Literal["tidegate.install"]
    target: str = Field(min_length=1, max_length=512)
    repository: str = Field(min_length=1, max_length=2048)
    version: str | None = None
    skus: list[str] | None = None
    campaign: str | None = None
    preconditions: Preconditions = Preconditions()
