"""Alert notifications to webhooks: one JSON POST per URL, an explicit timeout, never an
exception to the caller (a notifier that is down must not stop a remediation)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import httpx

from shared.alerts import AlertEvent

log = logging.getLogger("tidegate.alerts")


def payload(event: AlertEvent, source: str, context: dict[str, Any]) -> dict[str, Any]:
    body = asdict(event)
    body["at"] = event.at.isoformat()
    return {"source": source, **body, "context": context}


def notify(urls: list[str], body: dict[str, Any], *, timeout_s: float = 5.0) -> dict[str, str]:
    """POST `body` to each URL; url → "ok" or why not. Blocking: run it off an event loop."""
    results: dict[str, str] = {}
    with httpx.Client(timeout=httpx.Timeout(timeout_s)) as http:
        for url in urls:
            try:
                r = http.post(url, json=body)
                results[url] = "ok" if r.status_code < 400 else f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                results[url] = f"{type(exc).__name__}: {exc}"
            if results[url] != "ok":
                log.warning("alert %s to %s not delivered: %s", body.get("rule"), url, results[url])
    return results
