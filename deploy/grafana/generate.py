"""Writes the Grafana dashboards in this directory (run it after changing a panel; the
JSON files are what Grafana imports, and tests check every query names an exported metric).

    python deploy/grafana/generate.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
HERE = Path(__file__).parent


def panel(
    pid: int,
    title: str,
    exprs: list[tuple[str, str]],
    x: int,
    y: int,
    *,
    kind: str = "timeseries",
    unit: str = "short",
    w: int = 12,
    h: int = 8,
    thresholds: list[float] | None = None,
) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    steps += [{"color": c, "value": v} for c, v in zip(("orange", "red"), thresholds or [], strict=False)]
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(exprs)
        ],
    }


def dashboard(uid: str, title: str, panels: list[dict[str, Any]], tags: list[str]) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "tags": ["tidegate", *tags],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "__inputs": [
            {"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "pluginId": "prometheus"}
        ],
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": panels,
    }


REQ = "tidegate_serving_requests_total"
LAT = "tidegate_serving_latency_seconds_bucket"

SLO = dashboard(
    "tidegate-slo",
    "Tidegate: SLO tiers (gateway and fleet)",
    [
        panel(
            1,
            "Availability by model (answered by the model, 5 m)",
            [
                (
                    f'sum by (model) (rate({REQ}{{outcome="ok"}}[5m])) / sum by (model) (rate({REQ}[5m]))',
                    "{{model}}",
                )
            ],
            0,
            0,
            unit="percentunit",
            kind="stat",
        ),
        panel(
            2,
            "Error-budget burn rate (SLO 99 %, 1 h and 5 m)",
            [
                (
                    f'(1 - sum by (model) (rate({REQ}{{outcome="ok"}}[1h])) / sum by (model) (rate({REQ}[1h]))) / 0.01',
                    "{{model}} 1h",
                ),
                (
                    f'(1 - sum by (model) (rate({REQ}{{outcome="ok"}}[5m])) / sum by (model) (rate({REQ}[5m]))) / 0.01',
                    "{{model}} 5m",
                ),
            ],
            12,
            0,
            thresholds=[6, 14.4],
        ),
        panel(
            3,
            "Latency p95 / p99 by version",
            [
                (
                    f"histogram_quantile(0.95, sum by (le, model, version) (rate({LAT}[5m])))",
                    "p95 {{model}} {{version}}",
                ),
                (
                    f"histogram_quantile(0.99, sum by (le, model, version) (rate({LAT}[5m])))",
                    "p99 {{model}} {{version}}",
                ),
            ],
            0,
            8,
            unit="s",
        ),
        panel(
            4,
            "Requests per second by version and arm",
            [(f"sum by (model, version, arm) (rate({REQ}[1m]))", "{{model}} {{version}} {{arm}}")],
            12,
            8,
            unit="reqps",
        ),
        panel(
            5,
            "Fallback and failures per second",
            [(f'sum by (model, outcome) (rate({REQ}{{outcome!="ok"}}[1m]))', "{{model}} {{outcome}}")],
            0,
            16,
            unit="reqps",
        ),
        panel(
            6,
            "Batcher queue depth and mean batch",
            [
                ("tidegate_serving_queue_depth", "queue {{model}} {{version}}"),
                ("tidegate_serving_mean_batch", "batch {{model}} {{version}}"),
            ],
            12,
            16,
        ),
        panel(
            7,
            "Fleet: on-device inference p95 by SKU and version",
            [("avg by (sku, version) (tidegate_fleet_inference_p95_ms)", "{{sku}} {{version}}")],
            0,
            24,
            unit="ms",
        ),
        panel(
            8,
            "Fleet: on-device error ratio by SKU and version",
            [
                (
                    "sum by (sku, version) (tidegate_fleet_inference_errors) / sum by (sku, version) (tidegate_fleet_inference_requests)",
                    "{{sku}} {{version}}",
                )
            ],
            12,
            24,
            unit="percentunit",
        ),
        panel(
            9,
            "Machines: CPU busy and process CPU (gateway, fleet server, agents)",
            [
                ("tidegate_system_cpu_utilisation", "machine {{job}} {{instance}}"),
                ("rate(tidegate_process_cpu_seconds_total[5m])", "process {{job}} {{instance}}"),
            ],
            0,
            32,
            unit="percentunit",
            thresholds=[0.8, 0.95],
        ),
        panel(
            10,
            "Machines: memory (process resident, machine available) and GPU",
            [
                ("tidegate_process_resident_memory_bytes", "rss {{job}} {{instance}}"),
                ("tidegate_system_memory_available_bytes", "available {{job}} {{instance}}"),
                ("tidegate_gpu_memory_used_bytes", "gpu {{gpu}} {{instance}}"),
            ],
            12,
            32,
            unit="bytes",
        ),
        panel(
            11,
            "Shadow: candidate vs production, by metric, class and slice",
            [
                (
                    "max by (model, version, metric, class, slice) (tidegate_shadow_kpi)",
                    "{{model}} {{version}} {{metric}} {{class}} {{slice}}",
                )
            ],
            0,
            40,
            w=24,
        ),
        panel(
            12,
            "Shadow: verdict (1 = the verdict it has) and requests compared",
            [
                (
                    "max by (model, version, verdict) (tidegate_shadow_verdict) == 1",
                    "{{model}} {{version}} {{verdict}}",
                ),
                ("max by (model, version) (tidegate_shadow_compared)", "compared {{model}} {{version}}"),
            ],
            0,
            48,
            kind="table",
            w=12,
        ),
        panel(
            13,
            "Shadow: samples behind each KPI (thin slices stay pending)",
            [
                (
                    "max by (model, version, metric, class, slice) (tidegate_shadow_samples)",
                    "{{model}} {{version}} {{metric}} {{class}} {{slice}}",
                )
            ],
            12,
            48,
        ),
    ],
    ["slo"],
)

CAMPAIGNS = dashboard(
    "tidegate-campaigns",
    "Tidegate: campaign health",
    [
        panel(
            1, "Campaigns by state", [("sum by (state) (tidegate_campaigns)", "{{state}}")], 0, 0, kind="stat"
        ),
        panel(
            2,
            "Job executions by status",
            [("sum by (status) (tidegate_job_executions)", "{{status}}")],
            12,
            0,
        ),
        panel(
            3,
            "Failed share of finished executions",
            [
                (
                    'sum(tidegate_job_executions{status=~"FAILED|TIMED_OUT|REJECTED"}) / '
                    'sum(tidegate_job_executions{status=~"SUCCEEDED|FAILED|TIMED_OUT|REJECTED"})',
                    "failed",
                )
            ],
            0,
            8,
            unit="percentunit",
            thresholds=[0.02, 0.05],
        ),
        panel(
            4,
            "Device protocol: requests and batches per second",
            [
                ("rate(tidegate_jobs_requests_total[1m])", "requests"),
                ("rate(tidegate_jobs_batches_total[1m])", "batches"),
            ],
            12,
            8,
            unit="reqps",
        ),
        panel(
            5,
            "Jobs bridge busy share",
            [("rate(tidegate_jobs_busy_seconds_total[1m])", "busy")],
            0,
            16,
            unit="percentunit",
        ),
        panel(
            6,
            "Telemetry stored / rejected per second",
            [
                ("rate(tidegate_telemetry_stored_total[1m])", "stored"),
                ("rate(tidegate_telemetry_rejected_total[1m])", "rejected"),
            ],
            12,
            16,
        ),
        panel(7, "Devices by version", [("sum by (version) (tidegate_fleet_devices)", "{{version}}")], 0, 24),
        panel(
            8,
            "Throttled devices and hottest zone by SKU",
            [
                ("sum by (sku) (tidegate_fleet_throttled_devices)", "throttled {{sku}}"),
                ("max by (sku) (tidegate_fleet_max_temperature_celsius)", "max °C {{sku}}"),
            ],
            12,
            24,
        ),
    ],
    ["fleet"],
)

DRIFT = dashboard(
    "tidegate-drift",
    "Tidegate: drift",
    [
        panel(
            1,
            "Running campaigns: score PSI, updated vs other devices",
            [("tidegate_campaign_score_psi", "{{campaign}}")],
            0,
            0,
            thresholds=[0.1, 0.25],
        ),
        panel(
            2,
            "Fleet: out-of-distribution share by SKU and version",
            [
                (
                    "sum by (sku, version) (tidegate_fleet_inference_ood) / sum by (sku, version) (tidegate_fleet_inference_requests)",
                    "{{sku}} {{version}}",
                )
            ],
            12,
            0,
            unit="percentunit",
        ),
        panel(
            3,
            "Gateway: answers by fallback (a model that breached its guardrails)",
            [(f'sum by (model) (rate({REQ}{{outcome="fallback"}}[5m]))', "{{model}}")],
            0,
            8,
            unit="reqps",
        ),
        panel(
            4,
            "Fleet: error ratio by region",
            [
                (
                    "sum by (region) (tidegate_fleet_inference_errors) / sum by (region) (tidegate_fleet_inference_requests)",
                    "{{region}}",
                )
            ],
            12,
            8,
            unit="percentunit",
        ),
        panel(
            5,
            "Gateway: out-of-distribution inputs (learned input profile)",
            [
                (
                    f"sum by (model, version) (rate(tidegate_serving_ood_total[5m])) / sum by (model, version) (rate({REQ}[5m]))",
                    "{{model}} {{version}}",
                )
            ],
            0,
            16,
            unit="percentunit",
        ),
        panel(
            6,
            "Gateway: abstention rate (label below threshold)",
            [
                (
                    f"sum by (model, version) (rate(tidegate_serving_abstentions_total[5m])) / sum by (model, version) (rate({REQ}[5m]))",
                    "{{model}} {{version}}",
                )
            ],
            12,
            16,
            unit="percentunit",
        ),
        panel(
            7,
            "Gateway: median top-class score by class",
            [
                (
                    "histogram_quantile(0.5, sum by (le, model, version, class) (rate(tidegate_serving_top_score_bucket[15m])))",
                    "{{model}} {{version}} class {{class}}",
                )
            ],
            0,
            24,
            w=24,
        ),
        panel(
            8,
            "Gateway: calibration (ECE) from late labels, by version",
            [("max by (model, version) (tidegate_serving_ece)", "{{model}} {{version}}")],
            0,
            32,
            thresholds=[0.05, 0.1],
        ),
        panel(
            9,
            "Gateway: accuracy and labelled answers, by version",
            [
                ("max by (model, version) (tidegate_serving_accuracy)", "accuracy {{model}} {{version}}"),
                ("sum by (model, version) (tidegate_serving_labelled)", "labelled {{model}} {{version}}"),
            ],
            12,
            32,
        ),
    ],
    ["drift"],
)


AGENT = "tidegate_agent_"
DEVICES = dashboard(
    "tidegate-devices",
    "Tidegate: devices (each agent's /metrics, scraped on the bench or through a device gateway)",
    [
        panel(
            1,
            "Agents connected to the broker",
            [(f"sum({AGENT}mqtt_connected)", "connected"), (f"count({AGENT}mqtt_connected)", "scraped")],
            0,
            0,
            kind="stat",
            w=6,
        ),
        panel(
            2,
            "Thermal throttle level by device",
            [(f"max by (instance) ({AGENT}throttle_level)", "{{instance}}")],
            6,
            0,
            w=18,
            thresholds=[1, 2],
        ),
        panel(
            3,
            "Temperature by device and zone",
            [(f"max by (instance, zone) ({AGENT}temperature_celsius)", "{{instance}} {{zone}}")],
            0,
            8,
            unit="celsius",
            thresholds=[70, 85],
        ),
        panel(
            4,
            "Telemetry outbox depth and drops",
            [
                (f"sum by (instance) ({AGENT}outbox_depth)", "waiting {{instance}}"),
                (f"sum by (instance) (delta({AGENT}telemetry_dropped[1h]))", "dropped/h {{instance}}"),
            ],
            12,
            8,
        ),
        panel(
            5,
            "Jobs finished by status (1 h)",
            [(f"sum by (status) (increase({AGENT}jobs_total[1h]))", "{{status}}")],
            0,
            16,
        ),
        panel(
            6,
            "Local inference by result, and the batcher's queue",
            [
                (f"sum by (result) (rate({AGENT}inference_requests_total[5m]))", "{{result}}"),
                (f"max by (instance) ({AGENT}batcher_queue_depth)", "queue {{instance}}"),
            ],
            12,
            16,
        ),
        panel(
            7,
            "Device CPU busy and GPU load",
            [
                ("tidegate_system_cpu_utilisation", "cpu {{instance}}"),
                ("tidegate_gpu_utilisation", "gpu {{gpu}} {{instance}}"),
            ],
            0,
            24,
            unit="percentunit",
        ),
        panel(
            8,
            "Agent resident memory and the device's available memory",
            [
                ("tidegate_process_resident_memory_bytes", "agent {{instance}}"),
                ("tidegate_system_memory_available_bytes", "available {{instance}}"),
            ],
            12,
            24,
            unit="bytes",
        ),
    ],
    ["devices"],
)

BOARDS = {"slo": SLO, "campaigns": CAMPAIGNS, "drift": DRIFT, "devices": DEVICES}


def main() -> None:
    for name, board in BOARDS.items():
        (HERE / f"{name}.json").write_text(json.dumps(board, indent=2) + "\n")


if __name__ == "__main__":
    main()
