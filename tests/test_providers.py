"""Gate conditions read from outside the gateway: PromQL against a real Prometheus (the Debian
package) scraping a real `tidegate serve`, and a JSON field over HTTP. A query Prometheus
refuses is a 422 when the canary is asked for; a provider that does not answer holds the
canary with the reason; a provider that reads well lets it complete."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from shared.net import free_port
from shared.procs import stop_process
from tests.helpers import ADMIN, KEY, write_serving_models

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="Prometheus (Debian package prometheus) not installed"
)


def _wait(url: str, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} did not come up at {url}")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    models = write_serving_models(tmp_path / "serving")
    toml = models / "serving.toml"
    toml.write_text(
        toml.read_text().replace('failure_dir = "failures"', 'failure_dir = "failures"\ntick_s = 0.3')
    )
    gw_port, prom_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
        f"  - job_name: gateway\n    static_configs:\n      - targets: ['127.0.0.1:{gw_port}']\n"
    )
    gw = subprocess.Popen(
        [sys.executable, "-m", "tidegate", "serve", "--config", str(toml), "--port", str(gw_port)],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "gateway.log").open("wb"),
    )
    prom = subprocess.Popen(
        [
            str(PROMETHEUS),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    try:
        _wait(f"http://127.0.0.1:{gw_port}/healthz", "the gateway")
        _wait(f"http://127.0.0.1:{prom_port}/-/ready", "Prometheus")
        yield {
            "gw": f"http://127.0.0.1:{gw_port}",
            "prom": f"http://127.0.0.1:{prom_port}",
            "caller": {"Authorization": f"Bearer {KEY}"},
            "admin": {"Authorization": f"Bearer {ADMIN}"},
        }
    finally:
        stop_process(gw, grace_s=10)
        stop_process(prom, grace_s=10)


class _Silent:
    """A TCP server that accepts and never answers: a provider that times out."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


def _traffic(s: dict[str, Any], n: int) -> None:
    x = np.random.default_rng(0).standard_normal((n, 16)).astype(np.float32)
    with httpx.Client(base_url=s["gw"], headers=s["caller"], timeout=10) as c:
        for i in range(n):
            assert (
                c.post(
                    "/v1/models/classifier/infer", json={"inputs": x[i].tolist(), "key": f"k{i}"}
                ).status_code
                == 200
            )


CANARY = {
    "steps": [50, 100],
    "bake_s": 0,
    "min_requests": 5,
    "slo_p95_ms": 10_000,
    "slo_p99_ms": 10_000,
    "max_latency_increase": None,
    "max_error_increase": None,
    "override_reason": "the providers are under test",
}


def test_prometheus_and_http_providers_gate_a_canary_and_bad_ones_are_refused_or_hold_it(
    stack: dict[str, Any],
) -> None:
    s = stack
    admin = httpx.Client(base_url=s["gw"], headers=s["admin"], timeout=30)
    _traffic(s, 30)
    query = 'sum(tidegate_serving_requests_total{model="classifier",outcome="ok"})'
    deadline = time.monotonic() + 30  # Prometheus scrapes the gateway every second
    while time.monotonic() < deadline:
        got = httpx.get(f"{s['prom']}/api/v1/query", params={"query": query}).json()["data"]["result"]
        if got and float(got[0]["value"][1]) >= 30:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("Prometheus never scraped the gateway's requests")

    # a query Prometheus refuses: 422 now, and no canary
    bad = {
        "name": "broken",
        "provider": "prometheus",
        "url": s["prom"],
        "query": "sum(rate(",
        "comparator": ">=",
        "threshold": 1,
    }
    r = admin.post(
        "/v1/admin/models/classifier/canary", json={"candidate": "1.1.0", **CANARY, "providers": [bad]}
    )
    assert (
        r.status_code == 422
        and "prometheus refuses" in r.json()["detail"]
        and "parse error" in r.json()["detail"]
    )
    assert admin.get("/v1/admin/models/classifier").json()["canary"] is None

    # a provider that never answers holds the canary, with the reason
    silent = _Silent()
    try:
        stuck = {
            "name": "stuck",
            "provider": "http",
            "url": f"http://127.0.0.1:{silent.port}/kpi",
            "field": "value",
            "comparator": ">=",
            "threshold": 0,
            "timeout_s": 0.5,
        }
        r = admin.post(
            "/v1/admin/models/classifier/canary", json={"candidate": "1.1.0", **CANARY, "providers": [stuck]}
        )
        assert r.status_code == 200, r.text
        _traffic(s, 40)
        time.sleep(2)
        status = admin.get("/v1/admin/models/classifier").json()
        assert status["production"] == "1.0.0" and status["canary"] is not None
        assert "no answer within 0.5 s" in status["canary"]["providers"]["stuck"]["error"]
        assert "provider stuck: " in status["canary"]["last_decision"]
        assert admin.post("/v1/admin/models/classifier/rollback").status_code == 200
    finally:
        silent.close()

    # real readings: PromQL over the gateway's own counters, and a JSON field over HTTP
    providers = [
        {
            "name": "served",
            "provider": "prometheus",
            "url": s["prom"],
            "query": query,
            "comparator": ">=",
            "threshold": 30,
        },
        {
            "name": "via_http",
            "provider": "http",
            "url": f"{s['prom']}/api/v1/query?query=vector(7)",
            "field": "data.result.0.value.1",
            "comparator": "<=",
            "threshold": 10,
        },
    ]
    r = admin.post(
        "/v1/admin/models/classifier/canary", json={"candidate": "1.1.0", **CANARY, "providers": providers}
    )
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 60
    while admin.get("/v1/admin/models/classifier").json()["production"] != "1.1.0":
        _traffic(s, 20)
        if time.monotonic() > deadline:
            raise AssertionError(admin.get("/v1/admin/models/classifier").json()["canary"])
    events = admin.get("/v1/admin/models/classifier").json()["events"]
    assert any("canary 1.1.0 promoted" in e for e in events)
    admin.close()
