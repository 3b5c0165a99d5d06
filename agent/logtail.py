"""The agent's recent log lines, kept in memory: what a failed install's receipt carries (its
own lines, since it began) and what a `log-pull` job uploads. Bounded in lines, in line
length and in bytes sent, and redacted as the JSON log is (e-mail addresses, VINs, phone
numbers, IP addresses become hashes) before anything leaves the device."""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import deque
from datetime import UTC, datetime

from shared.logs import DEFAULT_REDACTOR, Redactor

KEEP = 2000  # lines in memory
AGENT_LOGGERS = ("agent", "tidegate.agent")  # the agent's own modules' loggers

#: Which daemon's work a record comes from: set in the daemon's task (asyncio copies it into
#: its tasks and `to_thread` calls), so several daemons in one process (the demo, tests) each
#: keep their own lines; records from threads outside any daemon (paho's) are kept by all.
owner: contextvars.ContextVar[int | None] = contextvars.ContextVar("tidegate_logtail_owner", default=None)
LINE_MAX = 400  # characters a line keeps


class LogTail(logging.Handler):
    def __init__(self, keep: int = KEEP, redactor: Redactor = DEFAULT_REDACTOR) -> None:
        super().__init__(logging.INFO)
        self.redactor = redactor
        self._lines: deque[tuple[int, str]] = deque(maxlen=keep)
        self._count = 0
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        who = owner.get()
        if who is not None and who != id(self):
            return  # another daemon's line
        if not record.name.startswith(AGENT_LOGGERS):
            return  # a server or gateway sharing the process (the demo): not this device's log
        try:
            at = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            # Only the message is redacted: a timestamp looks like a phone number to the patterns.
            message = self.redactor.string(record.getMessage())
            text = f"{at} {record.levelname.lower()} {record.name}: {message}"
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
