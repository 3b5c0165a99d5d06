"""Vehicle state and device-side preconditions.

The vehicle integration keeps a small JSON file current (battery, ignition,
parked, network, firmware); `JsonFileVehicleState` reads it. A D-Bus or CAN
source implements the same `read()`. Preconditions are evaluated by a pure
function so that "which and why" is testable without a vehicle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.jobdoc import Network, Preconditions
from shared.semver import InvalidVersionError, SemVer


class VehicleState(BaseModel):
    model_config = ConfigDict(extra="ignore")

    battery_pct: float | None = Field(default=None, ge=0, le=100)
    ignition: Literal["on", "off"] | None = None
    parked: bool | None = None
    network: Network | None = None
    firmware: str | None = None
    updated_at: datetime | None = None


class VehicleStateSource(Protocol):
    def read(self) -> VehicleState: ...


class JsonFileVehicleState:
    """Reads the file on every call; a missing, corrupt or stale file means "unknown"."""

    def __init__(self, path: Path, *, max_age: timedelta | None = timedelta(minutes=5)) -> None:
        self.path = path
        self.max_age = max_age

    def read(self) -> VehicleState:
        try:
            state = VehicleState.model_validate(json.loads(self.path.read_text()))
        except (OSError, ValueError, ValidationError):
            return VehicleState()
        if self.max_age is not None and state.updated_at is not None:
            at = state.updated_at if state.updated_at.tzinfo else state.updated_at.replace(tzinfo=UTC)
            if datetime.now(UTC) - at > self.max_age:
                return VehicleState()
        return state


@dataclass(frozen=True)
class Unmet:
    name: str
    reason: str


def evaluate_preconditions(
    pre: Preconditions,
    vehicle: VehicleState,
    *,
    free_disk_mb: float,
    hottest_c: float | None,
    install_limit_c: float | None,
) -> list[Unmet]:
    """Every precondition that does not hold now, with why. Unknown values never pass."""
    out: list[Unmet] = []
    if pre.min_battery_pct is not None:
        if vehicle.battery_pct is None:
            out.append(Unmet("battery", "battery level unknown"))
        elif vehicle.battery_pct < pre.min_battery_pct:
            out.append(Unmet("battery", f"battery {vehicle.battery_pct:g}% < {pre.min_battery_pct:g}%"))
    if pre.require_parked and vehicle.parked is not True:
        out.append(
            Unmet("parked", "vehicle not parked" if vehicle.parked is False else "parked state unknown")
        )
    if pre.require_ignition_off and vehicle.ignition != "off":
        out.append(Unmet("ignition", f"ignition {vehicle.ignition or 'unknown'}"))
    if pre.networks is not None and vehicle.network not in pre.networks:
        out.append(
            Unmet("network", f"network {vehicle.network or 'unknown'} not in {', '.join(pre.networks)}")
        )
    if pre.min_firmware is not None:
        try:
            ok = vehicle.firmware is not None and SemVer.parse(vehicle.firmware) >= SemVer.parse(
                pre.min_firmware
            )
        except InvalidVersionError:
            ok = False
        if not ok:
            out.append(Unmet("firmware", f"firmware {vehicle.firmware or 'unknown'} < {pre.min_firmware}"))
    if pre.min_free_disk_mb is not None and free_disk_mb < pre.min_free_disk_mb:
        out.append(Unmet("disk", f"free disk {free_disk_mb:.0f} MB < {pre.min_free_disk_mb:g} MB"))
    limits = [x for x in (pre.max_temperature_c, install_limit_c) if x is not None]
    if limits:
        limit = min(limits)
        if hottest_c is None:
            out.append(Unmet("temperature", "temperature unknown"))
        elif hottest_c >= limit:
            out.append(Unmet("temperature", f"temperature {hottest_c:.1f}°C >= {limit:g}°C"))
    return out
