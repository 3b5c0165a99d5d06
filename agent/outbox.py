"""A bounded, ordered, on-disk queue of telemetry waiting for the broker.

SQLite (one file under the device root) so that beacons and receipts
queued while offline survive an agent restart. When the bound is hit the
oldest messages go first, and the number dropped is kept (and reported in
the next beacon).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Queued:
    id: int
    topic: str
    payload: bytes


class Outbox:
    def __init__(self, path: Path, *, max_messages: int = 10_000) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        self.max_messages = max_messages
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a receipt or beacon is durable once put() returns (a power cut keeps every
        # message queued before it, in order; test_crash_consistency shows it). NORMAL would
        # lose whatever was queued since the last checkpoint.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
            "payload BLOB NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"
        )
        self._db.execute("INSERT OR IGNORE INTO counters VALUES ('dropped', 0)")
        self._db.execute("INSERT OR IGNORE INTO counters VALUES ('seq', 0)")

    def next_seq(self) -> int:
        """A sequence number that keeps growing across restarts (receivers order and dedupe by it)."""
        with self._lock:
            self._db.execute("UPDATE counters SET value = value + 1 WHERE name = 'seq'")
            (value,) = self._db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()
        return int(value)

    def put(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO outbox (topic, payload) VALUES (?, ?)", (topic, payload))
                (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
                excess = count - self.max_messages
                if excess > 0:
                    self._db.execute(
                        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)",
                        (excess,),
                    )
                    self._db.execute(
                        "UPDATE counters SET value = value + ? WHERE name = 'dropped'", (excess,)
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def peek(self, limit: int = 1) -> list[Queued]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload FROM outbox ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [Queued(r[0], r[1], bytes(r[2])) for r in rows]

    def ack(self, message_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count)

    @property
    def dropped(self) -> int:
        with self._lock:
            (value,) = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        return int(value)

    def close(self) -> None:
        with self._lock:
            self._db.close()
