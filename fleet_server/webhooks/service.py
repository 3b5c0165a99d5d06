"""Webhook subscriptions, events and deliveries.

`emit` runs inside the transaction that made the event and only adds rows, so an event is
delivered if and only if what it reports was committed (a transactional outbox; nothing is
sent from inside a request). `deliver_due` sends what is due, one POST per delivery, signed
the Standard Webhooks way (``webhook-id``, ``webhook-timestamp``, ``webhook-signature`` =
``v1,`` base64 HMAC-SHA256 of ``id.timestamp.body`` under the subscription's secret, through
the `standardwebhooks` library receivers verify with). A failed attempt is retried after
5 s, 10 s, 20 s … up to an hour, eight attempts in all; every attempt is in the delivery log.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from fleet_server.errors import FleetError, NotFoundError
from fleet_server.webhooks.models import WebhookDelivery, WebhookSubscription

#: Event types a subscription may name (or "*"), and what each carries.
EVENTS = {
    "campaign.approved": "an admin approved a campaign (it is scheduled)",
    "campaign.running": "a campaign started, or resumed",
    "campaign.advanced": "a campaign's next wave began",
    "campaign.paused": "a campaign paused (a gate, the drift watch, or an operator), with the reason",
    "campaign.completed": "a campaign finished",
    "campaign.canceled": "a campaign was canceled",
    "execution.failed": "a device's execution ended FAILED, TIMED_OUT or REJECTED",
    "release.staged": "a release moved to another stage",
    "alert": "an alert rule fired or resolved",
    "webhook.test": "a test delivery asked for through the API",
}
MAX_ATTEMPTS = 8
FIRST_RETRY_S = 5.0
LONGEST_RETRY_S = 3600.0


class WebhookError(FleetError):
    pass


class WebhookNotFoundError(WebhookError):
    http_status = NotFoundError.http_status


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError(f"webhook URL {url!r}: an http:// or https:// URL with a host")
    return url


def subscribe(
    session: Session, *, url: str, events: list[str], actor: str, now: datetime, description: str = ""
) -> WebhookSubscription:
    if unknown := sorted(set(events) - set(EVENTS) - {"*"}):
        raise WebhookError(f"unknown event type(s) {', '.join(unknown)}; known: {', '.join(EVENTS)}")
    if not events:
        raise WebhookError("name at least one event type (or '*')")
    sub = WebhookSubscription(
        url=check_url(url),
        events=sorted(set(events)),
        secret="whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
        description=description,
        active=True,
        created_at=now,
        created_by=actor,
    )
    session.add(sub)
    session.flush()
    return sub


def get(session: Session, subscription_id: int) -> WebhookSubscription:
    sub = session.get(WebhookSubscription, subscription_id)
    if sub is None:
        raise WebhookNotFoundError(f"no webhook subscription {subscription_id}")
    return sub


def emit(session: Session, event: str, data: dict[str, Any], now: datetime) -> int:
    """Queue `event` for every active subscription that wants it, in the caller's transaction;
    returns how many deliveries were queued."""
    assert event in EVENTS, event
    subs = [
        s
        for s in session.scalars(select(WebhookSubscription).where(WebhookSubscription.active.is_(True)))
        if "*" in s.events or event in s.events
    ]
    for sub in subs:
        queue(session, sub, event, data, now)
    return len(subs)


def queue(
    session: Session, sub: WebhookSubscription, event: str, data: dict[str, Any], now: datetime
) -> WebhookDelivery:
    """One pending delivery of `event` to `sub`, due now (its message id fixed for every retry)."""
    delivery = WebhookDelivery(
        subscription_id=sub.id,
        msg_id=f"msg_{uuid.uuid4().hex}",
        event=event,
        payload={"type": event, "timestamp": now.isoformat(), "data": data},
        status="pending",
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    session.add(delivery)
    return delivery


def retry_delay(attempts: int) -> timedelta:
    """After the `attempts`-th failure: 5 s, 10 s, 20 s, … at most an hour."""
    return timedelta(seconds=min(LONGEST_RETRY_S, FIRST_RETRY_S * 2 ** (attempts - 1)))


def signed(
    sub: WebhookSubscription, delivery: WebhookDelivery, now: datetime
) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True)
    signature = Webhook(sub.secret).sign(delivery.msg_id, now, body)
    headers = {
        "content-type": "application/json",
        "webhook-id": delivery.msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
        "user-agent": "tidegate-fleet-server",
    }
    return body.encode(), headers


def deliver_due(
    session_factory: Callable[[], Any], http: httpx.Client, now: datetime, *, limit: int = 100
) -> int:
    """Send every delivery due at `now` (at most `limit`), each in its own transaction, and
    record the outcome; returns how many were attempted. Blocking: run it off the event loop."""
    with session_factory() as s:
        due = [
            d.id
            for d in s.scalars(
                select(WebhookDelivery)
                .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                .limit(limit)
            )
        ]
    for delivery_id in due:
        with session_factory() as s:
            d = s.get(WebhookDelivery, delivery_id)
            if d is None or d.status != "pending":
                continue
            sub = s.get(WebhookSubscription, d.subscription_id)
            if sub is None or not sub.active:
                d.status, d.last_error = "failed", "subscription removed"
                continue
            body, headers = signed(sub, d, now)
            try:
                r = http.post(sub.url, content=body, headers=headers)
                error = None if 200 <= r.status_code < 300 else f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
            d.attempts += 1
            if error is None:
                d.status, d.delivered_at, d.last_error = "delivered", now, None
            else:
                d.last_error = error
                if d.attempts >= MAX_ATTEMPTS:
                    d.status = "failed"
                else:
                    d.next_attempt_at = now + retry_delay(d.attempts)
    return len(due)
