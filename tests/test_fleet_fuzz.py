"""Fuzz the fleet server's API from its own OpenAPI document with schemathesis: whatever the
input, no 5xx, and every endpoint refuses callers without a token."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from fleet_server.app import create_app
from fleet_server.auth.service import Role, create_token
from fleet_server.db import Database
from fleet_server.devices.service import register_device
from fleet_server.migrate import upgrade
from shared.trust import UpdateRepository

_dir = Path(tempfile.mkdtemp(prefix="tidegate-fuzz-"))
_db = Database(f"sqlite:///{_dir / 'fuzz.db'}")
upgrade(_db)
with _db.session() as _s:
    TOKEN = create_token(_s, name="fuzzer", role=Role.ADMIN, now=datetime.now(UTC))
    register_device(_s, thing_name="car-1", sku="edge-cpu", now=datetime.now(UTC))
APP = create_app(_db, repository=UpdateRepository.init(_dir / "repo"))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_for_any_input(case: schemathesis.Case) -> None:
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])


@schema.parametrize()
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
def test_unauthorised_calls_are_refused(case: schemathesis.Case) -> None:
    if case.path in ("/healthz", "/readyz", "/metrics"):  # probes are public by design
        return  # probes are public by design
    response = case.call()
    assert response.status_code in (401, 405), (
        case.method,
        case.path,
        response.status_code,
    )  # 405: no such method
