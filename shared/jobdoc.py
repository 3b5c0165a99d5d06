"""The Tidegate job document: what the fleet server puts in an AWS IoT Jobs execution and
the agent executes. Strict: an unknown field is refused (REJECTED by the device)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    """`tidegate.install` (target and repository required) or `tidegate.log-pull` (the agent
    uploads its recent log: `lines`, bounded to 64 KiB)."""

    model_config = ConfigDict(extra="forbid")

    operation: Literal["tidegate.install", "tidegate.log-pull"]
    target: str = Field(default="", max_length=512)
    repository: str = Field(default="", max_length=2048)
    lines: int = Field(default=500, ge=1, le=5000)
    version: str | None = None
    skus: list[str] | None = None
    campaign: str | None = None
    preconditions: Preconditions = Preconditions()

    @model_validator(mode="after")
    def _install_names_what(self) -> JobDocument:
        if self.operation == "tidegate.install" and not (self.target and self.repository):
            raise ValueError("an install needs a target and a repository")
        return self
