"""The agent's recent log lines, kept in memory: what a failed install's receipt carries (its
own lines, since it began) and what a `log-pull` job uploads. Bounded in lines, in line
length and in bytes sent, and redacted as the JSON log is (e-mail addresses, VINs, phone
numbers, IP addresses become hashes) before anything leaves the device."""

from __future__ import annotations

import logging
import threading
from collections import deque
from datetime import UTC, datetime

from shared.logs import DEFAULT_REDACTOR, Redactor

KEEP = 2000  # lines in memory
LINE_MAX = 400  # characters a line keeps


class LogTail(logging.Handler):
    def __init__(self, keep: int = KEEP, redactor: Redactor = DEFAULT_REDACTOR) -> None:
        super().__init__(logging.INFO)
        self.redactor = redactor
        self._lines: deque[tuple[int, str]] = deque(maxlen=keep)
        self._count = 0
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            at = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            line = f"{at} {record.levelname.lower()} {record.name}: {record.getMessage()}"
            text = self.redactor.string(line)
        except Exception:  # a log line that cannot be formatted is not worth failing for
            return
        with self._lock:
            self._count += 1
            self._lines.append((self._count, text[:LINE_MAX]))

    def mark(self) -> int:
        """A position: `since(mark)` returns what was logged after it."""
        with self._lock:
            return self._count

    def since(self, mark: int, *, lines: int = 50, max_bytes: int = 8192) -> list[str]:
        with self._lock:
            picked = [text for n, text in self._lines if n > mark]
        return _bounded(picked[-lines:], max_bytes)

    def recent(self, *, lines: int = 500, max_bytes: int = 64 * 1024) -> list[str]:
        with self._lock:
            picked = [text for _, text in self._lines]
        return _bounded(picked[-lines:], max_bytes)


def _bounded(lines: list[str], max_bytes: int) -> list[str]:
    """The newest lines that fit in `max_bytes` (UTF-8), oldest first."""
    out: list[str] = []
    size = 0
    for line in reversed(lines):
        size += len(line.encode()) + 1
        if size > max_bytes:
            break
        out.append(line)
    return out[::-1]
