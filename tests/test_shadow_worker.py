"""A shadow on its own capacity (issue 18): the candidate runs in a `tidegate serve
shadow-worker` process, reached over an authenticated connection; the gateway spawns no
mirror process, a wrong key or an absent worker stops the shadow with the reason."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cloud_serving.config import ConfigError, load_config
from cloud_serving.gateway import Gateway
from cloud_serving.shadow import ShadowBudget
from tests.helpers import ADMIN, caller, write_serving_models
from tests.mqtt_helpers import free_port
from tests.test_cloud_serving import serve
from tests.test_fleet_e2e import wait

KEY = "0123456789abcdef-shadow-test-key"
SAMPLES = np.random.default_rng(3).standard_normal((300, 16)).astype(np.float32)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[dict[str, Any]]:
    port = free_port()
    log = tmp_path / "worker.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidegate", "serve", "shadow-worker", "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "TIDEGATE_SHADOW_AUTHKEY": KEY},
    )
    wait(lambda: "shadow worker on" in log.read_text(), 60, "the shadow worker listening")
    yield {"port": port, "log": log, "proc": proc}
    proc.terminate()
    proc.wait(10)


def _config(tmp_path: Path, port: int) -> Path:
    models = write_serving_models(tmp_path / "models")
    toml = models / "serving.toml"
    body = toml.read_text().replace(
        'failure_dir = "failures"', f'failure_dir = "failures"\nshadow_worker = "127.0.0.1:{port}"'
    )
    toml.write_text(body)
    return toml


def _run(config: Path, body: Any) -> None:
    serve(load_config(config), body)


async def _stopped(gw: Gateway) -> str:
    """Start a shadow and wait for it to stop by itself; the reason."""
    gw.start_shadow("classifier", "1.1.0", share=1.0, budget=ShadowBudget())
    shadow = gw.model("classifier").shadow
    assert shadow is not None
    for _ in range(250):
        if shadow.stopped_reason is not None:
            return shadow.stopped_reason
        await asyncio.sleep(0.02)
    raise AssertionError("the shadow did not stop")


def test_a_shadow_runs_on_the_worker_and_its_verdict_comes_back(
    worker: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIDEGATE_SHADOW_AUTHKEY", KEY)
    config = _config(tmp_path, worker["port"])

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        r = await client.post(
            "/v1/admin/models/classifier/shadow",
            json={"version": "1.1.0", "share": 1.0, "max_diff_rate": 0.99, "min_samples": 50},
            headers=caller(ADMIN),
        )
        assert r.status_code == 200, r.text
        shadow = gw.model("classifier").shadow
        assert shadow is not None and shadow.link is not None  # no child process: the worker
        for i, x in enumerate(SAMPLES):
            r = await client.post(
                "/v1/models/classifier/infer", json={"inputs": x.tolist(), "key": f"k{i}"}, headers=caller()
            )
            assert r.status_code == 200 and r.json()["version"] == "1.0.0"
            if i % 20 == 0:
                await asyncio.sleep(0.01)
        for _ in range(500):
            if shadow.stats.kpis()["compared"] >= len(SAMPLES):
                break
            await asyncio.sleep(0.02)
        r = await client.delete("/v1/admin/models/classifier/shadow", headers=caller(ADMIN))
        assert r.status_code == 200, r.text
        k = shadow.stats.kpis()
        assert k["compared"] == len(SAMPLES) and shadow.stats.dropped == 0, k
        assert k["diff_rate"] > 0  # two differently seeded models: the worker really ran the candidate
        assert shadow.verdict.final and shadow.verdict.verdict == "pass", shadow.verdict

    _run(config, body)
    assert "shadow from" in worker["log"].read_text()


def test_a_wrong_key_or_no_worker_stops_the_shadow_with_the_reason(
    worker: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIDEGATE_SHADOW_AUTHKEY", "not-the-key-the-worker-has")

    async def refused(gw: Gateway, client: httpx.AsyncClient) -> None:
        reason = await _stopped(gw)
        assert "AuthenticationError" in reason and f"shadow worker 127.0.0.1:{worker['port']}" in reason
        x = SAMPLES[0].tolist()
        r = await client.post("/v1/models/classifier/infer", json={"inputs": x}, headers=caller())
        assert r.status_code == 200  # callers never notice

    _run(_config(tmp_path / "wrong", worker["port"]), refused)
    wait(lambda: "refused a connection" in worker["log"].read_text(), 10, "the worker logged the refusal")

    async def absent(gw: Gateway, client: httpx.AsyncClient) -> None:
        assert "ConnectionRefusedError" in await _stopped(gw)

    _run(_config(tmp_path / "absent", free_port()), absent)

    monkeypatch.delenv("TIDEGATE_SHADOW_AUTHKEY")
    with pytest.raises(ConfigError, match=r"shadow_worker: .*TIDEGATE_SHADOW_AUTHKEY"):
        Gateway(load_config(_config(tmp_path / "nokey", worker["port"])))
    env = {k: v for k, v in os.environ.items() if k != "TIDEGATE_SHADOW_AUTHKEY"}
    run = subprocess.run(
        [sys.executable, "-m", "tidegate", "serve", "shadow-worker", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode == 1 and "TIDEGATE_SHADOW_AUTHKEY" in run.stderr, run.stderr
