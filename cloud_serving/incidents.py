"""Incident captures: what an on-call engineer needs about a failed request, on disk.

A 5xx answer (the model failed and no fallback could answer) is written as one JSON file —
the request (personal data redacted), the model and version, the error, the correlation id
and the model's release state — under `<failure_dir>/incidents/<kind>/`. At most one per
model and kind per `min_interval_s` (a failing model must not fill the disk), and retention
keeps the newest `keep` files per kind and none older than `max_age_s`.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.fsutil import atomic_write_bytes
from shared.logs import Redactor


class IncidentRecorder:
    def __init__(
        self,
        root: Path,
        redactor: Redactor,
        *,
        keep: int = 200,
        max_age_s: float = 14 * 86400,
        min_interval_s: float = 1.0,
    ) -> None:
        self.root, self.redactor = root, redactor
        self.keep, self.max_age_s, self.min_interval_s = keep, max_age_s, min_interval_s
        self._last: dict[tuple[str, str], float] = {}
        self.suppressed = 0

    def record(self, kind: str, model: str, detail: dict[str, Any]) -> Path | None:
        """Write one capture (blocking: call it off the event loop); None when rate-limited."""
        now = time.monotonic()
        if now - self._last.get((kind, model), -1e18) < self.min_interval_s:
            self.suppressed += 1
            return None
        self._last[(kind, model)] = now
        at = datetime.now(UTC)
        folder = self.root / kind
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{at.strftime('%Y%m%dT%H%M%S.%fZ')}-{model}.json"
        body = {"kind": kind, "model": model, "at": at.isoformat(), **self.redactor(detail)}
        atomic_write_bytes(path, (json.dumps(body, indent=2, default=str) + "\n").encode())
        self.prune(folder)
        return path

    def prune(self, folder: Path) -> int:
        """Retention: the newest `keep` files, none older than `max_age_s`; returns removed."""
        files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        cutoff = time.time() - self.max_age_s
        removed = 0
        for i, f in enumerate(files):
            if i >= self.keep or f.stat().st_mtime < cutoff:
                f.unlink(missing_ok=True)
                removed += 1
        return removed
