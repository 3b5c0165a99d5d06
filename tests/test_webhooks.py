"""Webhooks end to end: a subscription made through the API, an event committed by a campaign
action, delivered over real HTTP to a receiver that fails twice before it answers, signed so
that the Standard Webhooks library the docs show accepts it and refuses a forgery."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from fleet_server.app import create_app
from fleet_server.auth.service import Role, create_token
from fleet_server.db import Database
from fleet_server.webhooks.service import MAX_ATTEMPTS, deliver_due, retry_delay


class Receiver:
    """An HTTP endpoint that answers 500 to the first `failures` requests, then 204."""

    def __init__(self, failures: int) -> None:
        self.failures, self.requests = failures, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.requests.append((dict(self.headers), body))
                self.send_response(500 if len(outer.requests) <= outer.failures else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def t0() -> datetime:
    """Now, when the test runs: receivers refuse signatures more than 5 minutes off their clock."""
    return datetime.now(UTC)


@pytest.fixture
def admin(db: Database, t0: datetime) -> tuple[TestClient, dict[str, str]]:
    app = create_app(db, clock=lambda: t0)
    with db.session() as s:
        token = create_token(s, name="root", role=Role.ADMIN, now=t0)
    return TestClient(app), {"Authorization": f"Bearer {token}"}


CAMPAIGN = {
    "name": "hooks",
    "target": "classifier/1.0.0/edge-cpu.bundle",
    "repository": "http://repo",
    "cohort": {"sku": "edge-cpu"},
    "waves": [{"percent": 100}],
}


def test_a_failing_receiver_gets_one_signed_delivery_after_two_retries(
    db: Database, admin: tuple[TestClient, dict[str, str]], t0: datetime
) -> None:
    client, h = admin
    receiver = Receiver(failures=2)
    try:
        r = client.post(
            "/api/v1/webhooks", json={"url": receiver.url, "events": ["campaign.approved"]}, headers=h
        )
        assert r.status_code == 201
        sub = r.json()
        assert sub["secret"].startswith("whsec_")
        assert "secret" not in client.get("/api/v1/webhooks", headers=h).json()[0]  # shown once
        cid = client.post("/api/v1/campaigns", json=CAMPAIGN, headers=h).json()["id"]
        client.post(f"/api/v1/campaigns/{cid}/submit", headers=h).raise_for_status()
        client.post(
            f"/api/v1/campaigns/{cid}/approve", json={"override_reason": "test: no bench"}, headers=h
        ).raise_for_status()
        with httpx.Client(timeout=httpx.Timeout(5.0)) as http:
            now = t0
            assert deliver_due(db.session, http, now) == 1  # 500: retried in 5 s
            assert deliver_due(db.session, http, now + timedelta(seconds=4)) == 0  # not yet due
            now += retry_delay(1)
            assert deliver_due(db.session, http, now) == 1  # 500 again: in 10 s
            now += retry_delay(2)
            assert deliver_due(db.session, http, now) == 1  # 204
            assert deliver_due(db.session, http, now + timedelta(hours=2)) == 0  # nothing left
        assert len(receiver.requests) == 3
        ids = {headers["webhook-id"] for headers, _ in receiver.requests}
        assert len(ids) == 1  # one message, retried: a receiver de-duplicates on webhook-id
        headers, body = receiver.requests[-1]
        event = Webhook(sub["secret"]).verify(body, headers)  # the helper README shows
        assert event["type"] == "campaign.approved" and event["data"]["campaign_id"] == cid
        forged = {**headers, "webhook-signature": "v1," + "A" * 44}
        with pytest.raises(WebhookVerificationError):
            Webhook(sub["secret"]).verify(body, forged)
        with pytest.raises(WebhookVerificationError):  # a body changed in flight
            Webhook(sub["secret"]).verify(body.replace(b"approved", b"canceled"), headers)
        log = client.get(f"/api/v1/webhooks/{sub['id']}/deliveries", headers=h).json()
        assert [(d["event"], d["status"], d["attempts"]) for d in log] == [
            ("campaign.approved", "delivered", 3)
        ]
    finally:
        receiver.close()


def test_a_receiver_that_never_answers_is_given_up_after_the_last_attempt(
    db: Database, admin: tuple[TestClient, dict[str, str]], t0: datetime
) -> None:
    client, h = admin
    receiver = Receiver(failures=10**6)
    try:
        sub = client.post("/api/v1/webhooks", json={"url": receiver.url, "events": ["*"]}, headers=h).json()
        assert client.post(f"/api/v1/webhooks/{sub['id']}/test", headers=h).status_code == 202
        with httpx.Client(timeout=httpx.Timeout(5.0)) as http:
            now = t0
            for attempt in range(1, MAX_ATTEMPTS + 1):
                assert deliver_due(db.session, http, now) == 1
                now += retry_delay(attempt)
            assert deliver_due(db.session, http, now + timedelta(days=1)) == 0
        log = client.get(f"/api/v1/webhooks/{sub['id']}/deliveries", headers=h).json()
        assert [(d["event"], d["status"], d["attempts"], d["last_error"]) for d in log] == [
            ("webhook.test", "failed", MAX_ATTEMPTS, "HTTP 500")
        ]
        assert len(receiver.requests) == MAX_ATTEMPTS
        assert json.loads(receiver.requests[0][1])["data"] == {"by": "root"}
    finally:
        receiver.close()


def test_bad_subscriptions_are_refused_by_name(admin: tuple[TestClient, dict[str, str]]) -> None:
    client, h = admin
    for body, needle in (
        ({"url": "ftp://hooks.example/x", "events": ["alert"]}, "an http:// or https:// URL"),
        (
            {"url": "https://hooks.example/x", "events": ["campaign.exploded"]},
            "unknown event type(s) campaign.exploded",
        ),
        ({"url": "https://hooks.example/x", "events": []}, "events"),
    ):
        r = client.post("/api/v1/webhooks", json=body, headers=h)
        assert r.status_code == 422 and needle in json.dumps(r.json()), r.json()
    assert client.get("/api/v1/webhooks", headers=h).json() == []  # nothing half-made
    assert client.post("/api/v1/webhooks/999/test", headers=h).status_code == 404
