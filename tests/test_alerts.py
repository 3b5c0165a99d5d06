"""Alert rules (pure) and their remediations in the gateway, notified to a real webhook."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from cloud_serving.canary import CanarySpec
from cloud_serving.config import ServingConfig, load_config
from cloud_serving.gateway import Gateway
from fleet_server.jobs.models import JobExecution
from shared.alerts import (
    AlertRule,
    AlertRuleError,
    AlertState,
    CountSample,
    Severity,
    ValueSample,
    burn_rate,
    step,
)
from tests.helpers import ADMIN, ServedApp, caller
from tests.mqtt_helpers import free_port
from tests.test_cloud_serving import SAMPLES, Clock, serve

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def test_burn_rate_is_the_error_ratio_over_the_budget() -> None:
    samples = [CountSample(at(i), good=95, bad=5) for i in range(10)]  # 5 % errors
    rate, n = burn_rate(samples, at(9), window_s=60, slo=0.99)
    assert n == 1000 and rate == pytest.approx(5.0)  # 5 % against a 1 % budget
    assert burn_rate(samples, at(100), window_s=60, slo=0.99) == (0.0, 0)  # nothing in the window


def test_a_burn_rate_rule_needs_both_windows_then_fires_once_and_resolves() -> None:
    rule = AlertRule(
        "errors",
        "burn_rate",
        Severity.CRITICAL,
        threshold=10,
        window_s=60,
        short_window_s=10,
        slo=0.99,
        for_s=5,
        action="rollback",
    )
    state = AlertState()
    old_burst = [CountSample(at(i), 50, 50) for i in range(0, 20)]  # a burst 40 s ago ...
    healthy = [CountSample(at(i), 100, 0) for i in range(20, 60)]  # ... then healthy
    assert (
        step(rule, old_burst + healthy, at(59), state) is None and state.status == "ok"
    )  # short window is clean
    bad = [CountSample(at(i), 0, 100) for i in range(60, 80)]  # every request failing
    series = healthy + bad
    assert step(rule, series, at(70), state) is None and state.status == "pending"  # for_s not yet held
    fired = step(rule, series, at(76), state)
    assert fired is not None and fired.status == "firing" and fired.action == "rollback"
    assert "burn rate" in fired.detail
    assert step(rule, series, at(77), state) is None  # once per incident
    clean = series + [CountSample(at(i), 100, 0) for i in range(80, 200)]
    resolved = step(rule, clean, at(199), state)
    assert resolved is not None and resolved.status == "resolved"


def test_threshold_rules_and_too_few_samples() -> None:
    rule = AlertRule("ood", "above", threshold=0.05, window_s=30, min_samples=3)
    state = AlertState()
    assert step(rule, [ValueSample(at(1), 0.9)], at(2), state) is None and state.status == "ok"
    series = [ValueSample(at(i), 0.1) for i in range(3)]
    event = step(rule, series, at(3), state)
    assert event is not None and event.status == "firing" and "mean 0.1" in event.detail
    low = AlertRule("calibrated", "below", threshold=0.5, min_samples=1)
    assert step(low, [ValueSample(at(1), 0.4)], at(2), AlertState()) is not None
    with pytest.raises(AlertRuleError, match="slo"):
        AlertRule("x", "burn_rate", slo=1.5)


class _Hook:
    """A real webhook receiver on a free port."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        app = FastAPI()

        @app.post("/hook")
        async def hook(body: dict[str, Any]) -> dict[str, str]:
            self.received.append(body)
            return {"ok": "yes"}

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.served = ServedApp(app, self.port)


def test_an_alert_on_a_canarys_errors_rolls_it_back_and_notifies_the_webhook(models: Path) -> None:
    hook = _Hook()
    raw = load_config(models / "serving.toml").model_dump()
    raw["gateway"]["webhooks"] = [hook.url]
    raw["models"]["classifier"]["alerts"] = [
        {
            "name": "canary-errors",
            "version": "canary",
            "slo": 0.99,
            "threshold": 10,
            "window_s": 60,
            "short_window_s": 10,
            "min_samples": 20,
            "severity": "critical",
            "action": "rollback",
        }
    ]
    config = ServingConfig.model_validate(raw)
    clock = Clock()

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        # gates that never judge: only the alert can end this canary
        gw.start_canary(
            "classifier",
            "9.9.9-bad",
            CanarySpec(steps=(50, 100), bake_s=3600, min_success_rate=0.0, slo_p95_ms=1e6, slo_p99_ms=1e6),
            override_reason="the alert is under test, not the shadow gate",
        )
        for second in range(5):
            for i in range(40):
                r = await client.post(
                    "/v1/models/classifier/infer",
                    json={"inputs": SAMPLES[i].tolist(), "key": f"d{second}-{i}"},
                    headers=caller(),
                )
                assert (
                    r.status_code == 200 and r.json()["version"] == "1.0.0"
                )  # callers never see the candidate fail
            clock.now += timedelta(seconds=1)
            ended = gw.tick()
            if ended:
                break
        assert ended == [("classifier", "rolled back", None)]
        st = gw.model("classifier")
        assert st.canary is None and st.weights == {"1.0.0": 1.0}
        assert any(
            "alert canary-errors firing (critical) on 9.9.9-bad" in e and "canary 9.9.9-bad rolled back" in e
            for e in st.events
        )
        await gw.drain_notifications()
        assert len(hook.received) == 1
        note = hook.received[0]
        assert (
            note["rule"] == "canary-errors" and note["status"] == "firing" and note["severity"] == "critical"
        )
        assert note["context"] == {
            "model": "classifier",
            "version": "9.9.9-bad",
            "remediation": "canary 9.9.9-bad rolled back",
        }
        # The gateway's own KPIs: one mitigation, from the canary's start to the alert's stop.
        kpis = (await client.get("/v1/admin/kpis", headers=caller(ADMIN))).json()
        assert kpis["mitigations"] == 1 and kpis["defect_escape_rate"] == 0.0  # stopped at its first step
        m = kpis["mitigated"][0]
        assert m["subject"] == "classifier:9.9.9-bad" and m["by"] == "alerts" and m["exposed"] > 20
        assert 0 < m["seconds"] <= 5 and kpis["time_to_mitigation_s"]["p50"] == m["seconds"]
        assert (await client.get("/v1/admin/kpis", headers=caller())).status_code == 401  # not an admin key

    hook.served.start()
    try:
        serve(config, body, clock)
    finally:
        hook.served.stop()


def test_an_alert_switches_a_failing_model_to_its_fallback_until_an_operator_clears_it(models: Path) -> None:
    raw = load_config(models / "serving.toml").model_dump()
    raw["gateway"]["webhooks"] = [
        f"http://127.0.0.1:{free_port()}/nobody-listens"
    ]  # delivery fails, remediation does not
    raw["models"]["guarded"]["alerts"] = [
        {"name": "errors", "window_s": 60, "short_window_s": 10, "min_samples": 10, "action": "fallback"}
    ]
    config = ServingConfig.model_validate(raw)
    clock = Clock()

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        for _ in range(20):
            r = await client.post(
                "/v1/models/guarded/infer", json={"inputs": SAMPLES[0].tolist()}, headers=caller()
            )
            assert r.status_code == 200 and r.json()["fallback"]
        clock.now += timedelta(seconds=1)
        gw.tick()
        st = gw.model("guarded")
        assert st.forced_fallback is not None
        calls_before = st.versions["bad"].batcher.stats.count  # type: ignore[attr-defined]
        r = await client.post(
            "/v1/models/guarded/infer", json={"inputs": SAMPLES[0].tolist()}, headers=caller()
        )
        assert r.json()["fallback"] and st.versions["bad"].batcher.stats.count == calls_before  # type: ignore[attr-defined]
        await gw.drain_notifications()
        r = await client.post("/v1/admin/models/guarded/fallback/clear", headers=caller(ADMIN))
        assert r.status_code == 200 and r.json()["forced_fallback"] is None
        assert any("fallback cleared by an operator" in e for e in r.json()["events"])

    serve(config, body, clock)


def _beacon(db: Any, thing: str, seq: int, histogram: list[int], now: datetime) -> None:
    import json as _json

    from fleet_server.telemetry.service import ingest

    body = {
        "seq": seq,
        "device_id": thing,
        "sku": "edge-cpu",
        "at": now.isoformat(),
        "agent_version": "0.1.0",
        "inference": {"count": sum(histogram), "score_histogram": histogram},
    }
    with db.session() as s:
        assert ingest(s, f"tidegate/things/{thing}/beacon", _json.dumps(body).encode(), now) == "stored"


def test_a_wave_whose_updated_devices_answer_differently_is_paused(db: Any) -> None:
    """The fleet's side: beacons carry score histograms; once the updated devices' scores
    drift from the rest of the cohort's, the scheduler's watch pauses the campaign with its
    reason and tells the webhook."""
    from fleet_server.alerts.watch import DriftWatch, DriftWatchConfig
    from fleet_server.campaigns import service
    from fleet_server.scheduler import CampaignScheduler
    from tests.test_campaign_service import T0 as C0
    from tests.test_campaign_service import devices_answer, fleet, make

    hook = _Hook()
    hook.served.start()
    try:
        things = fleet(db, 40)
        cid = make(db, waves=[{"percent": 25, "soak_s": 3600}, {"percent": 100}])
        now = C0 + timedelta(seconds=1)
        scheduler = CampaignScheduler(
            db,
            lambda out: None,
            lambda: now,
            watch=DriftWatch(DriftWatchConfig(psi_threshold=0.25, min_scores=100, interval_s=0)),
            webhooks=[hook.url],
        )
        scheduler.tick_all()
        assert devices_answer(db, now) == 10  # the first wave installed
        with db.session() as s:
            updated = set(
                s.scalars(select(JobExecution.thing_name).where(JobExecution.status == "SUCCEEDED"))
            )
        usual = [0, 0, 0, 0, 1, 2, 4, 8, 10, 15]  # confident answers
        for t in things:
            _beacon(db, t, 1, usual, now)
        scheduler.tick_all()
        with db.session() as s:
            assert service.get(s, cid).state == "running"  # the same scores: no alarm
        eu = {t for t in updated if int(t.split("-")[1]) % 2}  # fleet(): odd cars are in region eu
        assert 0 < len(eu) < len(updated)
        for t in eu:  # the new version's answers slump, in one region only
            _beacon(db, t, 2, [4, 6, 10, 12, 6, 2, 0, 0, 0, 0], now)
        now += timedelta(seconds=5)
        scheduler.tick_all()
        with db.session() as s:
            c = service.get(s, cid)
            assert c.state == "paused" and c.paused_reason is not None
            assert c.paused_reason.startswith("alert score-drift: ")
            assert "region=eu: score PSI" in c.paused_reason and "region=us" not in c.paused_reason
        # The same computation as a report, per slice, through the API (JSON and HTML).
        from fastapi.testclient import TestClient

        from fleet_server.app import create_app
        from fleet_server.auth.service import Role, create_token

        with db.session() as s:
            token = create_token(s, name="viewer-d", role=Role.VIEWER, now=now)
        client = TestClient(create_app(db))
        auth = {"Authorization": f"Bearer {token}"}
        report = client.get(f"/api/v1/campaigns/{cid}/drift", headers=auth).json()
        slices = {sl["slice"]: sl for sl in report["slices"]}
        assert report["alarm"] and set(slices) == {"region=eu", "region=us", "sku=edge-cpu"}
        assert slices["region=eu"]["features"][0]["drifted"] is True
        assert slices["region=us"]["features"][0]["psi"] < 0.01  # its updated devices answer as before
        assert slices["region=eu"]["current_rows"] == 40 * len(eu)
        page = client.get(f"/api/v1/campaigns/{cid}/drift?format=html", headers=auth)
        assert page.headers["content-type"].startswith("text/html") and "region=eu" in page.text
        assert client.get(f"/api/v1/campaigns/{cid}/drift?format=pdf", headers=auth).status_code == 422
        # The drifted slice's updated devices, exported as a feedback cohort.
        cohort = client.get(f"/api/v1/campaigns/{cid}/cohorts/drift", headers=auth).json()
        assert {i["thing_name"] for i in cohort["items"]} >= eu
        assert all("region=eu" in i["slices"] for i in cohort["items"] if i["thing_name"] in eu)
        assert any(q["slice"] == "region=eu" for q in cohort["query"]["slices"])
        assert len(hook.received) == 1
        note = hook.received[0]
        assert (
            note["source"] == "fleet-server" and note["rule"] == "score-drift" and note["status"] == "firing"
        )
        assert note["context"] == {"campaign": cid, "remediation": "campaign paused"}
    finally:
        hook.served.stop()


def test_a_campaigns_failures_are_exported_with_the_query_that_selects_them_again(db: Any) -> None:
    from fastapi.testclient import TestClient
    from sqlalchemy import text

    from fleet_server.app import create_app
    from fleet_server.auth.service import Role, create_token
    from fleet_server.scheduler import CampaignScheduler
    from tests.test_campaign_service import T0 as C0
    from tests.test_campaign_service import devices_answer, fleet, make

    fleet(db, 20)
    cid = make(db, waves=[{"percent": 50, "soak_s": 3600}, {"percent": 100}])
    now = C0 + timedelta(seconds=1)
    CampaignScheduler(db, lambda out: None, lambda: now).tick_all()
    with db.session() as s:
        first_wave = sorted(s.scalars(select(JobExecution.thing_name).where(JobExecution.campaign_id == cid)))
    failing = first_wave[:2]
    assert devices_answer(db, now, fail=set(failing)) == 10
    with db.session() as s:
        token = create_token(s, name="viewer-f", role=Role.VIEWER, now=now)
    client = TestClient(create_app(db))
    r = client.get(f"/api/v1/campaigns/{cid}/cohorts/failure", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    cohort = r.json()
    assert [i["thing_name"] for i in cohort["items"]] == failing and cohort["seen"] == 2
    first = cohort["items"][0]
    assert first["status"] == "FAILED" and first["status_details"] == {"reason": "sim"} and first["wave"] == 0
    assert first["descriptors"]["sku"] == "edge-cpu"
    assert first["descriptors"]["region"] == ("eu" if int(failing[0].split("-")[1]) % 2 else "us")
    with db.session() as s:  # the exported query selects the same devices on this database
        rows = s.execute(text(cohort["query"]["sql"]), cohort["query"]["params"]).all()
    assert sorted(r[0] for r in rows) == failing
    assert (
        client.get(
            f"/api/v1/campaigns/{cid}/cohorts/nope", headers={"Authorization": f"Bearer {token}"}
        ).status_code
        == 422
    )


def test_personal_data_never_reaches_the_log_and_every_line_carries_the_request_id(models: Path) -> None:
    """Through the real app: a request whose metadata and key hold personal data, answered by
    the fallback (which logs a warning with the metadata), with a configured extra pattern."""
    import io
    import json
    import logging

    from shared.logs import JsonFormatter

    raw = load_config(models / "serving.toml").model_dump()
    raw["gateway"]["redact_patterns"] = [r"ticket-\d{6}"]  # on top of the defaults (e-mail, VIN, phone)
    config = ServingConfig.model_validate(raw)
    personal = ["driver@example.com", "WVWZZZ1JZXW000001", "ticket-123456", "+49 170 1234567"]
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    seen: dict[str, str] = {}

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        handler.setFormatter(JsonFormatter(gw.redactor))
        logger = logging.getLogger("tidegate")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            metadata = {
                "email": personal[0],
                "vehicle": personal[1],
                "note": f"see {personal[2]} call {personal[3]}",
            }
            r = await client.post(
                "/v1/models/guarded/infer",
                json={"inputs": SAMPLES[0].tolist(), "metadata": metadata},
                headers={**caller(), "X-Request-ID": "req-42.a"},
            )
            assert r.status_code == 200 and r.json()["fallback"]
            seen["echoed"] = r.headers["X-Request-ID"]
            logging.getLogger("tidegate.serving").warning(
                "free text from %s about %s", personal[0], personal[1]
            )
            r = await client.post(
                "/v1/models/guarded/infer",
                json={"inputs": [1.0]},
                headers={**caller(), "X-Request-ID": "bad id with spaces"},
            )
            seen["made_up"] = r.headers["X-Request-ID"]
        finally:
            logger.removeHandler(handler)

    serve(config, body)
    text = out.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines and any(line["message"] == "fallback answered" for line in lines)
    for secret in personal:
        assert secret not in text
    fallback = next(line for line in lines if line["message"] == "fallback answered")
    assert fallback["request_id"] == "req-42.a" == seen["echoed"]
    assert (
        fallback["metadata"]["email"].startswith("redacted:") and "redacted:" in fallback["metadata"]["note"]
    )
    assert seen["made_up"] != "bad id with spaces" and len(seen["made_up"]) == 32
    raw["gateway"]["redact_patterns"] = ["(unclosed"]
    with pytest.raises(ValueError, match="does not compile"):
        ServingConfig.model_validate(raw)


def test_the_request_id_follows_a_call_from_the_gateway_to_the_fleet_server(tmp_path: Path) -> None:
    """The gateway's outgoing registry calls carry the id of the request being served, and the
    fleet server answers with it (and logs with it)."""
    from fleet_server.app import create_app
    from fleet_server.db import Database
    from fleet_server.migrate import upgrade
    from shared.logs import REQUEST_ID_HEADER, pass_request_id, request_id

    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    upgrade(db)
    port = free_port()
    served = ServedApp(create_app(db), port).start()
    try:
        token = request_id.set("req-from-gateway")
        try:
            with httpx.Client(event_hooks={"request": [pass_request_id]}, timeout=5) as http:
                r = http.get(
                    f"http://127.0.0.1:{port}/api/v1/flags"
                )  # unauthenticated: 401, still correlated
        finally:
            request_id.reset(token)
        assert r.status_code == 401 and r.headers[REQUEST_ID_HEADER] == "req-from-gateway"
        assert r.request.headers[REQUEST_ID_HEADER] == "req-from-gateway"
    finally:
        served.stop()


def _latency_beacon(db: Any, thing: str, seq: int, p95_ms: float, now: datetime) -> None:
    import json as _json

    from fleet_server.telemetry.service import ingest

    body = {
        "seq": seq,
        "device_id": thing,
        "sku": "edge-cpu",
        "at": now.isoformat(),
        "agent_version": "0.1.0",
        "inference": {"count": 500, "p95_ms": p95_ms, "quality": {"detections_per_frame@time=night": 2.0}},
    }
    with db.session() as s:
        assert ingest(s, f"tidegate/things/{thing}/beacon", _json.dumps(body).encode(), now) == "stored"


@pytest.mark.parametrize("slower", [1.5, 1.0])
def test_a_wave_whose_updated_devices_are_slower_than_the_rest_pauses(db: Any, slower: float) -> None:
    """The relative wave gate on beacons: updated devices 50 % slower at p95 than the cohort's
    devices not yet updated pause the campaign before its next wave; equal ones go on."""
    from fleet_server.campaigns import service
    from tests.test_campaign_service import T0 as C0
    from tests.test_campaign_service import devices_answer, fleet, make

    things = fleet(db, 60)
    cid = make(
        db,
        waves=[{"percent": 50}, {"percent": 100}],
        compare=[
            {"metric": "p95_ms", "tolerance": 0.2, "min_devices": 20},
            {"metric": "quality", "quality_key": "detections_per_frame@time=night", "worse": "lower"},
        ],
    )
    now = C0 + timedelta(seconds=1)
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=now)
    assert devices_answer(db, now) == 30
    with db.session() as s:
        updated = set(s.scalars(select(JobExecution.thing_name).where(JobExecution.status == "SUCCEEDED")))
    rng = random.Random(4)
    for t in things:
        base = 20.0 * (slower if t in updated else 1.0)
        _latency_beacon(db, t, 1, base * rng.lognormvariate(0, 0.1), now)
    now += timedelta(seconds=5)
    with db.session() as s:
        service.tick(s, campaign_id=cid, now=now)
        c = service.get(s, cid)
        if slower > 1:
            assert c.state == "paused" and c.wave == 0 and c.paused_reason is not None
            assert "updated devices worse than the rest of the cohort: p95_ms vs baseline" in c.paused_reason
        else:
            assert c.state == "running" and c.wave == 1, c.paused_reason
