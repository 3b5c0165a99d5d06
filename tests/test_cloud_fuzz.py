"""`tidegate serve` as a real process, fuzzed from its own OpenAPI with schemathesis: no input
crashes it or earns a 5xx (every model here has a healthy production version or a
fallback), and nothing is served without a key."""

from __future__ import annotations

import atexit
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from builder.samples import make_classifier
from cloud_serving.app import _hash
from tests.mqtt_helpers import free_port

KEY = "tgk_fuzz_admin"


def _start() -> tuple[subprocess.Popen[bytes], str]:
    """The gateway as a real process (started at collection: the schema comes from it)."""
    d = Path(tempfile.mkdtemp(prefix="tidegate-gw-fuzz-"))
    make_classifier(d / "v1.onnx", seed=0)
    make_classifier(d / "v2.onnx", seed=1)
    (d / "serving.toml").write_text(
        f"""
[gateway]
admin_keys_sha256 = ["{_hash(KEY)}"]
[models.classifier]
production = "1.0.0"
versions."1.0.0".path = "v1.onnx"
versions."1.1.0".path = "v2.onnx"
fallback = {{ outputs = {{ probabilities = [0.25, 0.25, 0.25, 0.25] }} }}
"""
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidegate", "serve", "--config", str(d / "serving.toml"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    atexit.register(proc.terminate)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.1)


PROC, URL = _start()
schema = schemathesis.openapi.from_url(URL + "/openapi.json")


@pytest.fixture(scope="module", autouse=True)
def _gateway_survives() -> Iterator[None]:
    yield
    alive = PROC.poll() is None
    PROC.terminate()
    PROC.wait(15)
    assert alive, "the gateway died under fuzzing"


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_for_any_input(case: schemathesis.Case) -> None:
    response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])


@schema.parametrize()
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
def test_nothing_is_served_without_a_key(case: schemathesis.Case) -> None:
    if case.path in ("/healthz", "/readyz", "/metrics"):  # probes are public by design
        return
    response = case.call(timeout=30)
    assert response.status_code in (401, 405, 422), (case.method, case.path, response.status_code)
