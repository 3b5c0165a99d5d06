"""Gray logging: every request/response pair a canary's candidate answers, kept for a person
to read when the gates cannot say what is wrong. Redacted (`shared.logs`) before it is
kept, bounded in memory (the request path only appends to a deque), written off the event
loop by the tick, and bounded on disk by size (one rotated file kept) and by age."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.logs import Redactor

BUFFER = 10_000  # pairs held between ticks; more are dropped and counted


class GrayLog:
    def __init__(
        self,
        root: Path,
        redactor: Redactor,
        *,
        max_bytes: int = 16 << 20,
        max_age_s: float = 7 * 86400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root, self.redactor = root, redactor
        self.max_bytes, self.max_age_s, self.clock = max_bytes, max_age_s, clock
        self.pending: deque[tuple[str, dict[str, Any]]] = deque()
        self.dropped = 0
        self.written = 0

    def offer(self, name: str, pair: Callable[[], dict[str, Any]]) -> None:
        """On the request path: build and keep one pair for `name` (model-candidate); the
        pair is redacted when written, its time is not (a date is not personal data)."""
        if len(self.pending) >= BUFFER:
            self.dropped += 1
            return
        self.pending.append(
            (name, {"pair": pair(), "at": datetime.fromtimestamp(self.clock(), UTC).isoformat()})
        )

    def flush(self) -> int:
        """Write what is pending (blocking), rotating a file past `max_bytes` and removing
        files older than `max_age_s`."""
        if not self.pending:
            return 0
        self.root.mkdir(parents=True, exist_ok=True)
        lines: dict[str, list[str]] = {}
        while self.pending:
            name, pair = self.pending.popleft()
            record = {"at": pair["at"], **self.redactor(pair["pair"])}
            lines.setdefault(name, []).append(json.dumps(record, sort_keys=True) + "\n")
        for name, chunk in lines.items():
            path = self.root / f"{name}.jsonl"
            data = "".join(chunk).encode()
            if path.exists() and path.stat().st_size + len(data) > self.max_bytes:
                os.replace(path, path.with_suffix(".jsonl.1"))  # the one older file kept
            with path.open("ab") as f:
                f.write(data)
            self.written += len(chunk)
        cutoff = self.clock() - self.max_age_s
        for old in self.root.glob("*.jsonl*"):
            if old.stat().st_mtime < cutoff:
                old.unlink(missing_ok=True)
        return sum(len(c) for c in lines.values())
