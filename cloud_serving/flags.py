"""Feature flags, cached with a short TTL, from one of two sources.

The gateway reads flags on the request path from memory (`get`); a background refresh
fetches them from the source when the cache is older than its TTL: the fleet server's flag
store (`GET /api/v1/flags`) or, for a standalone gateway, the `flags` object of its local
registry file. When the source is down or unreadable the last values stay in force and
serving goes on; `status` reports how stale they are.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import httpx

from shared.fsutil import atomic_write_bytes
from shared.logs import pass_request_id

log = logging.getLogger("tidegate.serving.flags")
UNSET: Any = object()  # "no such flag": what a flag an experiment created reverts to


class FlagSource(Protocol):
    def fetch(self) -> dict[str, Any]:
        """Every flag now (blocking). Raises on any failure; the cache keeps its values."""
        ...

    def put(self, key: str, value: Any, why: str) -> None:
        """Set one flag at the source (blocking); raises on failure."""
        ...

    def delete(self, key: str) -> None:
        """Remove one flag at the source (blocking); absent is fine."""
        ...

    def close(self) -> None: ...


# One lock per local registry file: the flags and the registry's records share it.
_FILE_LOCKS: dict[Path, threading.Lock] = {}


def file_lock(path: Path) -> threading.Lock:
    return _FILE_LOCKS.setdefault(path.resolve(), threading.Lock())


class HttpFlags:
    """The fleet server's flag store."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 2.0) -> None:
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            event_hooks={"request": [pass_request_id]},
            timeout=httpx.Timeout(timeout_s),
        )

    def fetch(self) -> dict[str, Any]:
        r = self._http.get("/api/v1/flags")
        r.raise_for_status()
        return {f["key"]: f["value"] for f in r.json()}

    def put(self, key: str, value: Any, why: str) -> None:
        self._http.put(
            f"/api/v1/flags/{key}", json={"value": value, "description": why[:1024]}
        ).raise_for_status()

    def delete(self, key: str) -> None:
        r = self._http.delete(f"/api/v1/flags/{key}")
        if r.status_code != 404:
            r.raise_for_status()

    def close(self) -> None:
        self._http.close()


class FileFlags:
    """The `flags` object of a local registry file (see `registry.LocalRegistry`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fetch(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        flags = json.loads(self.path.read_text()).get("flags", {})
        if not isinstance(flags, dict):
            raise ValueError(f"{self.path}: 'flags' is not an object")
        return dict(flags)

    def _edit(self, change: Callable[[dict[str, Any]], None]) -> None:
        with file_lock(self.path):
            data = json.loads(self.path.read_text()) if self.path.exists() else {"releases": {}, "flags": {}}
            flags = data.setdefault("flags", {})
            if not isinstance(flags, dict):
                raise ValueError(f"{self.path}: 'flags' is not an object")
            change(flags)
            atomic_write_bytes(self.path, (json.dumps(data, indent=2) + "\n").encode())

    def put(self, key: str, value: Any, why: str) -> None:
        self._edit(lambda flags: flags.__setitem__(key, value))

    def delete(self, key: str) -> None:
        self._edit(lambda flags: flags.pop(key, None))

    def close(self) -> None:
        return None


class FlagCache:
    def __init__(
        self,
        source: FlagSource,
        *,
        ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source, self.ttl_s, self.clock = source, ttl_s, clock
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
            fresh = self.source.fetch()
        except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("flag source unavailable; serving with flags from %s", self.fetched_at)
            return False
        with self._lock:
            self._values = fresh
        self.fetched_at, self.last_error = self.clock(), None
        return True

    def known(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)

    def write(self, key: str, value: Any, why: str) -> None:
        """Set (or, with value `UNSET`, remove) a flag at the source and in the cache (blocking)."""
        if value is UNSET:
            self.source.delete(key)
        else:
            self.source.put(key, value, why)
        with self._lock:
            if value is UNSET:
                self._values.pop(key, None)
            else:
                self._values[key] = value

    def status(self) -> dict[str, Any]:
        age = None if self.fetched_at is None else self.clock() - self.fetched_at
        return {"flags": len(self._values), "age_s": age, "last_error": self.last_error}

    def close(self) -> None:
        self.source.close()
