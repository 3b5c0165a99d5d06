"""The operators' dashboard in a real headless Chromium (Debian's chromium, driven by Playwright):
live tiles per campaign, the decision log, and the pause and resume buttons."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from fleet_server.app import create_app
from fleet_server.auth.service import Role, create_token
from fleet_server.campaigns import service
from fleet_server.campaigns.spec import CampaignSpec
from fleet_server.db import Database
from fleet_server.devices.service import register_device
from fleet_server.jobs import protocol
from fleet_server.migrate import upgrade
from fleet_server.telemetry.service import ingest
from tests.mqtt_helpers import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextmanager
def dashboard(db: Database, token: str) -> Iterator[Any]:
    """The fleet server's app on a free port and a headless Chromium page on its dashboard."""
    playwright = pytest.importorskip("playwright.sync_api")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(db), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/#token={token}")
            yield page
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)


def test_dashboard_page_is_served_without_secrets(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    db = Database(f"sqlite:///{tmp_path / 'd.db'}")
    upgrade(db)
    page = TestClient(create_app(db)).get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/api/v1/campaigns" in page.text and "tg_" not in page.text


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (Debian package chromium) not installed")
def test_dashboard_live_in_headless_chromium(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'd.db'}")
    upgrade(db)
    now = datetime.now(UTC)
    with db.session() as s:
        token = create_token(s, name="ops", role=Role.ADMIN, now=now)
        for i in range(4):
            register_device(s, thing_name=f"car-{i}", sku="edge-cpu", region="eu" if i % 2 else "us", now=now)
        c = service.create(
            s,
            spec=CampaignSpec.model_validate(
                {
                    "name": "classifier 2.0",
                    "target": "t",
                    "repository": "r",
                    "cohort": {"sku": "edge-cpu"},
                    "waves": [{"percent": 50}, {"percent": 100}],
                }
            ),
            actor="ops",
            now=now,
        )
        service.submit(s, campaign_id=c.id, actor="ops", now=now)
        service.approve(s, campaign_id=c.id, actor="ops", now=now, override_reason="test fleet: no bench")
        service.tick(s, campaign_id=c.id, now=now)
        cid = c.id
        for i, errors in ((0, 0), (1, 5)):  # two devices report: 5 errors in 200 answers
            body = {
                "seq": 1,
                "device_id": f"car-{i}",
                "sku": "edge-cpu",
                "at": now.isoformat(),
                "agent_version": "0.1.0",
                "active_version": "1.0.0",
                "throttle_level": i,
                "inference": {"count": 100, "errors": errors, "p95_ms": 4.0 + i},
            }
            assert ingest(s, f"tidegate/things/car-{i}/beacon", json.dumps(body).encode(), now) == "stored"
    with dashboard(db, token) as page:
        card = page.locator(f"[data-campaign='{cid}']")
        card.wait_for(timeout=10_000)
        assert "RUNNING" in card.inner_text().upper() and "classifier 2.0" in card.inner_text()
        assert "QUEUED" in card.inner_text()
        # the fleet's key tiles, from the beacons and the KPIs
        fleet = page.locator("#fleet")
        fleet.locator("[data-tile='devices']").wait_for(timeout=10_000)
        assert fleet.locator("[data-tile='devices'] b").inner_text() == "2"
        assert fleet.locator("[data-tile='error ratio'] b").inner_text() == "2.5 %"
        assert fleet.locator("[data-tile='p95 ms (worst)'] b").inner_text() == "5.0"
        assert "alarm" in (fleet.locator("[data-tile='throttled']").get_attribute("class") or "")
        assert fleet.locator("[data-tile='1.0.0'] b").inner_text() == "2 · 2.5 %"
        assert fleet.locator("[data-tile='mitigations'] b").inner_text() == "0"
        # a device answers: the tiles update live, without a reload
        thing = next(t for t in ("car-0", "car-1", "car-2", "car-3") if _has_execution(db, t))
        with db.session() as s:
            out = protocol.handle(s, f"$aws/things/{thing}/jobs/start-next", b"{}", datetime.now(UTC))
            ver = out[0].payload["execution"]["versionNumber"]
            protocol.handle(
                s,
                f"$aws/things/{thing}/jobs/{cid}/update",
                f'{{"status":"SUCCEEDED","expectedVersion":{ver}}}'.encode(),
                datetime.now(UTC),
            )
            # The scheduler's next tick re-counts the running campaign's view (the API serves
            # it between ticks); this test runs no scheduler, so it re-counts as a tick would.
            service.refresh_view(s, service.get(s, cid), datetime.now(UTC))
        page.wait_for_function(
            f"document.querySelector(\"[data-campaign='{cid}'] .tile.SUCCEEDED\") !== null",
            timeout=10_000,
        )
        # progress over time, per wave and per region, drawn from the executions that finished
        chart = f"[data-campaign='{cid}'] [data-chart='finished per wave'] polyline"
        page.wait_for_selector(chart, state="attached", timeout=10_000)
        assert page.locator(chart).get_attribute("data-label") == "wave 1"
        region = page.locator(f"[data-campaign='{cid}'] [data-chart='finished per region'] polyline")
        assert region.count() == 1 and region.get_attribute("data-label") in ("eu", "us")
        assert "No releases yet." in page.locator("#releases").inner_text()
        card.get_by_role("button", name="Pause").click()
        page.wait_for_function(
            f"document.querySelector(\"[data-campaign='{cid}'] .state.paused\") !== null", timeout=10_000
        )
        assert "paused from the dashboard" in card.inner_text()
        card.get_by_role("button", name="Decision log").click()
        page.wait_for_selector(f"[data-campaign='{cid}'] .log", timeout=10_000)
        assert "paused (ops)" in card.locator(".log").inner_text()
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        card.get_by_role("button", name="Resume").click()
        page.wait_for_function(
            f"document.querySelector(\"[data-campaign='{cid}'] .state.running\") !== null", timeout=10_000
        )
    with db.session() as s:
        assert service.get(s, cid).state == "running"


def _has_execution(db: Database, thing: str) -> bool:
    from sqlalchemy import select

    from fleet_server.jobs.models import JobExecution

    with db.session() as s:
        return s.scalars(select(JobExecution).where(JobExecution.thing_name == thing)).first() is not None


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (Debian package chromium) not installed")
def test_devices_are_searched_paged_and_opened_in_headless_chromium(tmp_path: Path) -> None:
    """Operators find a device by name, SKU or region, page through the rest, and open its page:
    its versions, its executions (why one waits) and its receipts with the log tail."""
    db = Database(f"sqlite:///{tmp_path / 'd.db'}")
    upgrade(db)
    now = datetime.now(UTC)
    with db.session() as s:
        token = create_token(s, name="ops", role=Role.OPERATOR, now=now)
        for i in range(60):
            where = {"region": "eu" if i % 2 else "us", "firmware": "4.2.0"}
            register_device(s, thing_name=f"van-{i:03d}", sku="edge-cpu", now=now, **where)
        protocol.create_execution(s, "van-007", "job-7", {"operation": "tidegate.log-pull"}, now)
        receipt = {
            "seq": 1,
            "device_id": "van-007",
            "at": now.isoformat(),
            "job_id": "job-6",
            "target": "m/2.0.0/e.bundle",
            "outcome": "rolled_back",
            "reason": "self-test failed",
            "log_tail": ["selftest: p95 9.1 ms over budget"],
        }
        assert ingest(s, "tidegate/things/van-007/receipt", json.dumps(receipt).encode(), now) == "stored"
    with dashboard(db, token) as page:
        table = page.locator("#device-table")
        page.wait_for_selector("[data-device='van-000']", timeout=10_000)
        assert table.locator("[data-device]").count() == 25  # one page
        page.locator("#device-next").click()
        page.wait_for_selector("[data-device='van-025']", timeout=10_000)
        assert table.locator("[data-device='van-000']").count() == 0
        form = page.locator("#device-search")
        form.locator("[name='region']").fill("eu")
        form.locator("[name='name']").fill("van-00")
        form.get_by_role("button", name="Search").click()
        page.wait_for_function("document.querySelectorAll('#device-table [data-device]').length === 5")
        shown = [table.locator("[data-device]").nth(i).inner_text() for i in range(5)]
        assert shown == ["van-001", "van-003", "van-005", "van-007", "van-009"]
        table.locator("[data-device='van-007']").click()
        page.wait_for_selector("[data-device-page='van-007']", timeout=10_000)
        detail = page.locator("#device-page").inner_text()
        assert "firmware 4.2.0" in detail and "job-7" in detail and "QUEUED" in detail
        assert "rolled_back" in detail and "selftest: p95 9.1 ms over budget" in detail
        page.get_by_role("button", name="Pull log").click()
        requested = "document.querySelector('#device-page button').textContent === 'Log requested'"
        page.wait_for_function(requested)
        page.screenshot(path=str(tmp_path / "devices.png"), full_page=True)
    with db.session() as s:
        from sqlalchemy import select

        from fleet_server.jobs.models import JobExecution

        pulls = s.scalars(select(JobExecution).where(JobExecution.thing_name == "van-007")).all()
        assert len(pulls) == 2 and any(p.job_id.startswith("log-") for p in pulls)  # the button's job


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (Debian package chromium) not installed")
def test_a_campaign_is_previewed_created_and_approved_in_headless_chromium(tmp_path: Path) -> None:
    """The form checks the spec with the server first (a bad one is named, nothing made), shows
    the cohort and each wave's size, then creates and submits; an admin approves on the card."""
    db = Database(f"sqlite:///{tmp_path / 'd.db'}")
    upgrade(db)
    now = datetime.now(UTC)
    with db.session() as s:
        token = create_token(s, name="ops", role=Role.ADMIN, now=now)
        for i in range(8):
            register_device(s, thing_name=f"car-{i}", sku="edge-cpu", region="eu" if i % 2 else "us", now=now)
    with dashboard(db, token) as page:
        form = page.locator("#campaign-form")
        form.wait_for(timeout=10_000)
        for name, value in (
            ("name", "eu rollout"),
            ("target", "classifier/2.0.0/edge-cpu.bundle"),
            ("repository", "https://fleet.example/repo"),
            ("sku", "edge-cpu"),
            ("region", "eu"),
            ("waves", "50,10"),
        ):
            form.locator(f"[name='{name}']").fill(value)
        plan = page.locator("#campaign-plan")
        page.locator("#campaign-preview").click()
        invalid = "document.getElementById('campaign-plan').textContent.startsWith('Not valid')"
        page.wait_for_function(invalid)
        assert "cumulative" in plan.inner_text()
        form.locator("[name='waves']").fill("25,100")
        page.locator("#campaign-preview").click()
        page.wait_for_function("document.getElementById('campaign-plan').textContent.startsWith('cohort')")
        assert plan.inner_text() == "cohort 4 devices; waves 1 · 3"
        form.get_by_role("button", name="Create and submit").click()
        card = page.locator("[data-campaign]")
        card.wait_for(timeout=10_000)
        waiting = "document.querySelector('[data-campaign] .state.waiting_for_approval') !== null"
        page.wait_for_function(waiting)
        card.locator("input.override").fill("pilot SKU: bench report pending")
        card.get_by_role("button", name="Approve").click()
        page.wait_for_function("document.querySelector('[data-campaign] .state.scheduled') !== null")
    from fleet_server.campaigns.models import Campaign

    with db.session() as s:
        (c,) = s.query(Campaign).all()
        assert (c.name, c.state, c.approved_by) == ("eu rollout", "scheduled", "ops")
        assert c.spec["cohort"]["regions"] == ["eu"]
