"""Fleet beacons as Prometheus gauges: the latest beacon of each device, summed (or averaged)
per SKU, active version and region, so a dashboard sees the fleet the way it sees the
gateway: traffic, errors, latency, heat, out-of-distribution answers."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.devices.models import Device

LABELS = ["sku", "version", "region"]


def aggregate(session: Session) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(sku, active version, region) → the latest beacons summed: devices, requests, errors,
    OOD inputs, throttled devices, the p95 of each device and the hottest zone."""
    sums: dict[tuple[str, str, str], dict[str, Any]] = defaultdict(
        lambda: {"devices": 0, "requests": 0, "errors": 0, "ood": 0, "p95": [], "throttled": 0, "temp": None}
    )
    rows = session.execute(
        select(Device.sku, Device.region, Device.last_beacon).where(Device.last_beacon.is_not(None))
    )
    for sku, region, beacon in rows:
        inference = beacon.get("inference") or {}
        a = sums[(sku, beacon.get("active_version") or "none", region or "")]
        a["devices"] += 1
        a["requests"] += inference.get("count", 0)
        a["errors"] += inference.get("errors", 0)
        a["ood"] += inference.get("ood", 0)
        if inference.get("p95_ms") is not None:
            a["p95"].append(inference["p95_ms"])
        a["throttled"] += int(beacon.get("throttle_level", 0) > 0)
        temps = list((beacon.get("temperatures_c") or {}).values())
        if temps:
            a["temp"] = max(temps + ([a["temp"]] if a["temp"] is not None else []))
    return dict(sums)


def summary(session: Session) -> dict[str, Any]:
    """The fleet dashboard's tiles: totals over every reporting device, and devices and
    error ratio per active version."""
    sums = aggregate(session)
    p95s = [v for a in sums.values() for v in a["p95"]]
    temps = [a["temp"] for a in sums.values() if a["temp"] is not None]
    versions: dict[str, dict[str, int]] = defaultdict(lambda: {"devices": 0, "requests": 0, "errors": 0})
    for (_, version, _), a in sums.items():
        for k in ("devices", "requests", "errors"):
            versions[version][k] += a[k]
    requests = sum(a["requests"] for a in sums.values())
    return {
        "devices": sum(a["devices"] for a in sums.values()),
        "requests": requests,
        "error_ratio": sum(a["errors"] for a in sums.values()) / requests if requests else None,
        "ood": sum(a["ood"] for a in sums.values()),
        "throttled": sum(a["throttled"] for a in sums.values()),
        "p95_ms_mean": sum(p95s) / len(p95s) if p95s else None,
        "p95_ms_max": max(p95s, default=None),
        "max_temperature_c": max(temps, default=None),
        "versions": {
            v: {**c, "error_ratio": c["errors"] / c["requests"] if c["requests"] else None}
            for v, c in sorted(versions.items())
        },
    }


class FleetGauges:
    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=registry)

        self.devices = gauge("tidegate_fleet_devices", "Devices reporting beacons")
        self.requests = gauge(
            "tidegate_fleet_inference_requests", "Local inference requests since model load"
        )
        self.errors = gauge("tidegate_fleet_inference_errors", "Local inference errors since model load")
        self.ood = gauge("tidegate_fleet_inference_ood", "Out-of-distribution inputs since model load")
        self.p95 = gauge("tidegate_fleet_inference_p95_ms", "Local inference p95, mean over devices")
        self.throttled = gauge("tidegate_fleet_throttled_devices", "Devices throttling for heat")
        self.temperature = gauge("tidegate_fleet_max_temperature_celsius", "Hottest zone reported")

    def update(self, session: Session) -> None:
        sums = aggregate(session)
        for g in (
            self.devices,
            self.requests,
            self.errors,
            self.ood,
            self.p95,
            self.throttled,
            self.temperature,
        ):
            g.clear()
        for key, a in sums.items():
            self.devices.labels(*key).set(a["devices"])
            self.requests.labels(*key).set(a["requests"])
            self.errors.labels(*key).set(a["errors"])
            self.ood.labels(*key).set(a["ood"])
            self.throttled.labels(*key).set(a["throttled"])
            if a["p95"]:
                self.p95.labels(*key).set(sum(a["p95"]) / len(a["p95"]))
            if a["temp"] is not None:
                self.temperature.labels(*key).set(a["temp"])
