"""The fleet server's webhook dispatcher: a thread sending what is due every `interval_s`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

import httpx

from fleet_server.db import Database
from fleet_server.webhooks.service import deliver_due

log = logging.getLogger("tidegate.webhooks")


class WebhookDispatcher:
    def __init__(
        self, db: Database, clock: Callable[[], datetime], *, interval_s: float = 1.0, timeout_s: float = 10.0
    ) -> None:
        self.db, self.clock, self.interval_s = db, clock, interval_s
        self.http = httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhook-dispatcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                deliver_due(self.db.session, self.http, self.clock())
            except Exception:  # a database hiccup: logged, and the rows are still there next time
                log.exception("webhook delivery round failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        self.http.close()
