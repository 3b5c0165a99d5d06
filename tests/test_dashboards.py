"""The Grafana dashboards in deploy/grafana: valid dashboard JSON, up to date with their
generator, and every query names a metric the gateway or the fleet server really exports."""

from __future__ import annotations

import asyncio
import json
import re
import runpy
from pathlib import Path
from typing import Any

import httpx

from cloud_serving.config import load_config
from cloud_serving.gateway import Gateway
from tests.helpers import caller
from tests.test_cloud_serving import SAMPLES, serve

GRAFANA = Path(__file__).parent.parent / "deploy" / "grafana"
PANEL_TYPES = {"timeseries", "stat", "gauge", "table", "bargauge"}


def _exported(text: str) -> set[str]:
    """Series names from a Prometheus exposition: counters add _total, histograms _bucket etc."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            names |= {f"{name}_total"} if kind == "counter" else set()
            names |= {f"{name}_{s}" for s in ("bucket", "count", "sum")} if kind == "histogram" else set()
    return names


def _gateway_metrics(models: Path) -> str:
    seen: dict[str, str] = {}

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        r = await client.post(
            "/v1/models/classifier/infer", json={"inputs": SAMPLES[0].tolist()}, headers=caller()
        )
        assert r.status_code == 200
        seen["text"] = (await client.get("/metrics")).text

    serve(load_config(models / "serving.toml"), body)
    return seen["text"]


def _fleet_metrics(tmp_path: Path) -> str:
    from fleet_server.app import create_app
    from fleet_server.db import Database
    from fleet_server.migrate import upgrade

    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    upgrade(db)
    counters = {
        "jobs_requests": 1.0,
        "jobs_batches": 1.0,
        "jobs_busy_seconds": 0.1,
        "telemetry_stored": 1.0,
        "telemetry_rejected": 0.0,
    }
    app = create_app(db, counters=lambda: counters, score_psi=lambda: {"c-1": 0.01})

    async def scrape() -> str:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://fleet"
        ) as client:
            return (await client.get("/metrics")).text

    return asyncio.run(scrape())


def _agent_metrics(tmp_path: Path) -> str:
    """A real daemon's registry (not started: its metrics exist from construction)."""
    from prometheus_client import generate_latest

    from agent.config import AgentConfig
    from agent.device import DeviceConfig, DeviceRoot
    from agent.runtime import AgentDaemon

    root = tmp_path / "device"
    trusted = json.dumps({"signed": {"_type": "root"}}).encode()
    DeviceRoot.provision(root, DeviceConfig(device_id="dash-1", sku="cpu-x86"), trusted)
    config = AgentConfig.model_validate({"device": {"root": str(root)}, "thermal": {"root": str(tmp_path)}})
    return generate_latest(AgentDaemon(config).registry).decode()


def test_the_dashboards_are_valid_current_and_query_only_exported_metrics(
    models: Path, tmp_path: Path
) -> None:
    exported = (
        _exported(_gateway_metrics(models))
        | _exported(_fleet_metrics(tmp_path))
        | _exported(_agent_metrics(tmp_path))
    )
    boards = runpy.run_path(str(GRAFANA / "generate.py"))["BOARDS"]
    assert set(boards) == {p.stem for p in GRAFANA.glob("*.json")}
    for name, board in boards.items():
        saved: dict[str, Any] = json.loads((GRAFANA / f"{name}.json").read_text())
        assert saved == json.loads(json.dumps(board)), f"{name}.json is stale: run deploy/grafana/generate.py"
        assert saved["uid"] and saved["title"] and isinstance(saved["schemaVersion"], int) and saved["panels"]
        ids = [p["id"] for p in saved["panels"]]
        assert len(ids) == len(set(ids))
        for p in saved["panels"]:
            assert p["type"] in PANEL_TYPES and set(p["gridPos"]) == {"h", "w", "x", "y"}
            assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
            assert p["targets"] and p["datasource"]["type"] == "prometheus"
            for t in p["targets"]:
                expr = t["expr"]
                assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
                metrics = set(re.findall(r"\b(tidegate_[a-z0-9_]+)", expr))
                assert metrics, f"{name}: panel {p['title']!r} queries no Tidegate metric"
                assert metrics <= exported, f"{name}: {p['title']!r} names {sorted(metrics - exported)}"
    # the check itself can fail: a made-up metric is not among the exported ones
    assert "tidegate_serving_made_up_total" not in exported
    assert {
        "tidegate_serving_requests_total",
        "tidegate_campaign_score_psi",
        "tidegate_fleet_inference_p95_ms",
        "tidegate_agent_throttle_level",
        "tidegate_system_cpu_utilisation",
        "tidegate_process_resident_memory_bytes",
    } <= exported
