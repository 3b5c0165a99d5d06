"""Thermal throttling: read temperatures, pick a throttle level with hysteresis,
and turn the level into batcher limits and install deferral.

`SysfsThermal` reads ``thermal_zone*/temp`` (millidegrees Celsius) under a
configurable root, ``/sys/class/thermal`` on a device and a temp dir laid out
the same way in tests. The level logic is pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class SysfsThermal:
    def __init__(self, root: Path = Path("/sys/class/thermal")) -> None:
        self.root = root

    def read(self) -> dict[str, float]:
        """Temperature per zone in °C; zones that cannot be read are left out."""
        temps: dict[str, float] = {}
        for zone in sorted(self.root.glob("thermal_zone*")):
            try:
                milli = int((zone / "temp").read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                name = (zone / "type").read_text().strip() or zone.name
            except OSError:
                name = zone.name
            temps[f"{zone.name}:{name}"] = milli / 1000.0
        return temps


@dataclass(frozen=True)
class ThermalPolicy:
    thresholds_c: tuple[float, ...] = (70.0, 80.0, 90.0)
    hysteresis_c: float = 5.0
    install_limit_c: float = 80.0


@dataclass(frozen=True)
class Throttle:
    level: int
    max_batch: int
    concurrency: int
    pacing_ms: float
    installs_allowed: bool


PACING_MS = (0.0, 2.0, 10.0, 50.0, 200.0)


def next_level(current: int, hottest_c: float | None, policy: ThermalPolicy) -> int:
    """Heat raises the level at once; cooling lowers it only below threshold − hysteresis."""
    if hottest_c is None:
        return current
    target = sum(1 for t in policy.thresholds_c if hottest_c >= t)
    if target >= current:
        return target
    level = current
    while level > target and hottest_c < policy.thresholds_c[level - 1] - policy.hysteresis_c:
        level -= 1
    return level


def throttle_for(
    level: int, hottest_c: float | None, policy: ThermalPolicy, *, base_batch: int, base_concurrency: int
) -> Throttle:
    return Throttle(
        level=level,
        max_batch=max(1, base_batch >> level),
        concurrency=max(1, base_concurrency >> level),
        pacing_ms=PACING_MS[min(level, len(PACING_MS) - 1)],
        installs_allowed=hottest_c is None or hottest_c < policy.install_limit_c,
    )
