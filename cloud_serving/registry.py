"""Recording releases in the fleet server's model registry, over its HTTP API.

When the gateway promotes a version (a canary that passed, an experiment's winner) the
registry learns it: a model-card section with the evidence, and the stage moved on to
production (through staging when the release is still a candidate). The gateway keeps
serving if the registry is down: records wait in a queue and are retried.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import httpx

from shared.errors import TidegateError

log = logging.getLogger("tidegate.serving.registry")


class RegistryError(TidegateError):
    """The registry refused a record, or has no such release."""


@dataclass(frozen=True)
class Promotion:
    model: str
    version: str
    section: str  # "canary" or "experiment"
    content: dict[str, Any]


class RegistryClient:
    def __init__(self, url: str, token: str, *, timeout_s: float = 5.0) -> None:
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 3.0)),
        )
        self.pending: deque[Promotion] = deque()

    def close(self) -> None:
        self._http.close()

    def _release(self, name: str, version: str) -> dict[str, Any]:
        r = self._http.get("/api/v1/releases", params={"name": name})
        r.raise_for_status()
        for release in r.json():
            if release["version"] == version:
                return dict(release)
        raise RegistryError(f"the registry has no release {name} {version}")

    def record(self, p: Promotion) -> dict[str, Any]:
        """Append the evidence and move the release to production; returns the release."""
        release = self._release(p.model, p.version)
        rid = release["id"]
        r = self._http.post(
            f"/api/v1/releases/{rid}/model-card", json={"section": p.section, "content": p.content}
        )
        if r.status_code >= 400:
            raise RegistryError(f"model card for {p.model} {p.version}: HTTP {r.status_code}: {r.text[:200]}")
        path = {"candidate": ["staging", "production"], "staging": ["production"]}.get(release["stage"], [])
        for stage in path:
            r = self._http.post(f"/api/v1/releases/{rid}/stage", json={"stage": stage})
            if r.status_code >= 400:
                raise RegistryError(
                    f"stage {stage} for {p.model} {p.version}: HTTP {r.status_code}: {r.text[:200]}"
                )
            release = r.json()
        return release

    def flush(self) -> int:
        """Send what is queued; a failure leaves the rest queued for the next flush."""
        sent = 0
        while self.pending:
            p = self.pending[0]
            try:
                self.record(p)
            except (httpx.HTTPError, RegistryError) as exc:
                log.warning("registry: %s %s not recorded yet: %s", p.model, p.version, exc)
                return sent
            self.pending.popleft()
            sent += 1
        return sent
