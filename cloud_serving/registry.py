"""Recording releases in a model registry: the fleet server's (over its HTTP API) or, for a
standalone gateway, a local JSON file.

When the gateway promotes a version (a canary that passed, an experiment's winner) the
registry learns it: a model-card section with the evidence, and the stage moved on to
production (through staging when the release is still a candidate). The gateway keeps
serving if the registry is down: records wait in a queue and are retried.

The local file holds the same vocabulary as the fleet server (stages candidate → staging →
production, append-only model-card sections) plus the standalone gateway's feature flags:

    {"releases": {"classifier": {"1.1.0": {"stage": "production", "model_card": [...]}}},
     "flags": {"classifier.threshold": 0.4}}
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from shared.errors import TidegateError
from shared.fsutil import atomic_write_bytes
from shared.logs import pass_request_id

log = logging.getLogger("tidegate.serving.registry")


class RegistryError(TidegateError):
    """The registry refused a record, or has no such release."""


@dataclass(frozen=True)
class Promotion:
    model: str
    version: str
    section: str  # "canary", "experiment", "shadow" (its verdict) or "override"
    content: dict[str, Any]
    promote: bool = True  # move the release on to production; False: evidence only


# The stages a promotion walks through from each stage (the fleet server's transitions).
_TO_PRODUCTION = {"candidate": ["staging", "production"], "staging": ["production"]}


class Registry(ABC):
    """Promotions queue here and are sent by `flush`; `record` is the one transport call."""

    def __init__(self) -> None:
        self.pending: deque[Promotion] = deque()

    @abstractmethod
    def record(self, p: Promotion) -> dict[str, Any]:
        """Record one promotion (model-card section, stages); returns the release."""

    def close(self) -> None:
        return None

    def flush(self) -> int:
        """Send what is queued; a failure leaves the rest queued for the next flush."""
        sent = 0
        while self.pending:
            p = self.pending[0]
            try:
                self.record(p)
            except (httpx.HTTPError, OSError, ValueError, RegistryError) as exc:
                log.warning("registry: %s %s not recorded yet: %s", p.model, p.version, exc)
                return sent
            self.pending.popleft()
            sent += 1
        return sent


class RegistryClient(Registry):
    """The fleet server's model registry."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 5.0) -> None:
        super().__init__()
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            event_hooks={"request": [pass_request_id]},
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 3.0)),
        )

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
        for stage in _TO_PRODUCTION.get(release["stage"], []) if p.promote else []:
            r = self._http.post(f"/api/v1/releases/{rid}/stage", json={"stage": stage})
            if r.status_code >= 400:
                raise RegistryError(
                    f"stage {stage} for {p.model} {p.version}: HTTP {r.status_code}: {r.text[:200]}"
                )
            release = r.json()
        return release


class LocalRegistry(Registry):
    """A standalone gateway's registry: one JSON file, rewritten atomically on each record
    (the gateway is its only writer; operators may edit its flags by hand between)."""

    def __init__(self, path: Path, *, clock: Callable[[], datetime] | None = None) -> None:
        super().__init__()
        self.path = path
        self._now = clock or (lambda: datetime.now(UTC))

    def read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"releases": {}, "flags": {}}
        data = json.loads(self.path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("releases", {}), dict):
            raise RegistryError(f"{self.path} is not a registry file (no 'releases' object)")
        data.setdefault("releases", {})
        data.setdefault("flags", {})
        return data

    def record(self, p: Promotion) -> dict[str, Any]:
        from cloud_serving.flags import file_lock

        with file_lock(self.path):
            return self._record(p)

    def _record(self, p: Promotion) -> dict[str, Any]:
        data = self.read()
        release = (
            data["releases"]
            .setdefault(p.model, {})
            .setdefault(p.version, {"stage": "candidate", "model_card": []})
        )
        at = self._now().isoformat()
        release["model_card"].append({"section": p.section, "at": at, "by": "gateway", "content": p.content})
        for stage in _TO_PRODUCTION.get(release["stage"], []) if p.promote else []:
            move = {"from": release["stage"], "to": stage}
            release["model_card"].append({"section": "stage", "at": at, "by": "gateway", "content": move})
            release["stage"] = stage
        atomic_write_bytes(self.path, (json.dumps(data, indent=2) + "\n").encode())
        return dict(release)
