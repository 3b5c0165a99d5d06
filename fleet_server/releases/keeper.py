"""The repository keeper: re-signs snapshot and timestamp before they expire.

A timestamp lives a day by default; a device that meets an expired one refuses every update
(the freeze-attack defence), so a server that forgets to re-sign freezes its own fleet. The
keeper checks on the server's own schedule and re-signs in the last half of the validity
(`UpdateRepository.refresh_due`), holding the repository lock like every other writer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

from shared.errors import TidegateError
from shared.trust import UpdateRepository

log = logging.getLogger("tidegate.repository")


class RepositoryKeeper:
    def __init__(
        self, repo: UpdateRepository, clock: Callable[[], datetime], *, interval_s: float = 300.0
    ) -> None:
        self.repo = repo
        self.clock = clock
        self.interval_s = interval_s
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> bool:
        """Re-sign if due; returns whether it did. A failure (a key gone) is logged and kept for
        /readyz, and tried again next time."""
        now = self.clock()
        try:
            if not self.repo.refresh_due(now):
                return False
            snap, ts = self.repo.refresh(now=now)
        except TidegateError as exc:
            self.last_error = str(exc)
            log.error("repository refresh failed: %s", exc, extra={"event": "repository.refresh_failed"})
            return False
        self.last_error = None
        log.info(
            "re-signed snapshot v%d and timestamp v%d before they expire",
            snap,
            ts,
            extra={"event": "repository.refreshed"},
        )
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="repository-keeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
