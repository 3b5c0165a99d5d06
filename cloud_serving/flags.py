"""Feature flags from the fleet server's flag store, cached with a short TTL.

The gateway reads flags on the request path from memory (`get`); a background refresh
fetches `GET /api/v1/flags` when the cache is older than its TTL. When the flag store is
down the last values stay in force and serving goes on; `status` reports how stale they are.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

log = logging.getLogger("tidegate.serving.flags")


class FlagCache:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        ttl_s: float = 10.0,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self.clock = ttl_s, clock
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout_s),
        )
        self._values: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.fetched_at: float | None = None
        self.last_error: str | None = None

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._values.get(key, default)

    @property
    def stale(self) -> bool:
        return self.fetched_at is None or self.clock() - self.fetched_at >= self.ttl_s

    def refresh(self) -> bool:
        """Fetch every flag (blocking; run it off the event loop). False: kept the old values."""
        try:
            r = self._http.get("/api/v1/flags")
            r.raise_for_status()
            fresh = {f["key"]: f["value"] for f in r.json()}
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("flag store unreachable; serving with flags from %s", self.fetched_at)
            return False
        with self._lock:
            self._values = fresh
        self.fetched_at, self.last_error = self.clock(), None
        return True

    def status(self) -> dict[str, Any]:
        age = None if self.fetched_at is None else self.clock() - self.fetched_at
        return {"flags": len(self._values), "age_s": age, "last_error": self.last_error}

    def close(self) -> None:
        self._http.close()
