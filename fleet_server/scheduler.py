"""The one loop that advances campaigns: for each active campaign, one planner tick in one
transaction, then the notifications are published. All state is in the database, so a
restarted server picks up where the last tick committed, and nothing is queued twice
(an execution per campaign and device is unique)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime

from fleet_server.alerts.watch import DriftWatch
from fleet_server.campaigns import service
from fleet_server.db import Database, try_exclusive
from fleet_server.jobs.protocol import Outgoing
from fleet_server.webhooks.service import emit
from shared.webhooks import notify, payload

log = logging.getLogger("tidegate.server.scheduler")
MAX_DUTY = 4  # a tick that took t is followed by at least 3 t of rest


class CampaignScheduler:
    def __init__(
        self,
        db: Database,
        publish: Callable[[list[Outgoing]], None],
        clock: Callable[[], datetime],
        *,
        interval_s: float = 1.0,
        watch: DriftWatch | None = None,
        webhooks: list[str] | None = None,
        busy: Callable[[], str | None] | None = None,
    ) -> None:
        """`busy` says why the jobs service has no room for more devices now (the bridge's
        `busy`); while it does, every campaign holds its new notifications."""
        self.db, self.publish, self.clock, self.interval_s = db, publish, clock, interval_s
        self.busy = busy
        self.watch, self.webhooks = watch, webhooks or []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="campaign-scheduler", daemon=True)
        self.ticks = 0
        self.skipped = 0  # campaign ticks left to another replica holding them
        self._watched_at = float("-inf")

    def start(self) -> CampaignScheduler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def tick_all(self) -> None:
        with self.db.session() as s:
            ids = service.active_ids(s)
        busy = self.busy() if self.busy is not None and ids else None
        for cid in ids:
            try:
                with self.db.session() as s:
                    if not try_exclusive(s, f"campaign:{cid}"):
                        self.skipped += 1  # another replica is ticking it right now
                        continue
                    out = service.tick(s, campaign_id=cid, now=self.clock(), busy=busy)
                self.publish(out)
            except Exception:
                log.exception("tick of campaign %s failed", cid)
        if self.watch is not None and time.monotonic() - self._watched_at >= self.watch.config.interval_s:
            self._watched_at = time.monotonic()
            self.check_alerts()
        self.ticks += 1

    def check_alerts(self) -> None:
        """The drift watch in its own transaction (a pause commits with its decision), then
        the webhooks, after the commit: a notification never announces a rolled-back pause."""
        assert self.watch is not None
        now = self.clock()
        try:
            with self.db.session() as s:
                events = self.watch.check(s, now)
                for cid, event in events:  # with the pause, in its transaction
                    remedy = "campaign paused" if event.status == "firing" else "none"
                    context = {"campaign": cid, "remediation": remedy}
                    emit(s, "alert", payload(event, "fleet-server", context), now)
        except Exception:
            log.exception("alert check failed")
            return
        for cid, event in events:
            if self.webhooks:
                remedy = "campaign paused" if event.status == "firing" else "none"
                notify(
                    self.webhooks, payload(event, "fleet-server", {"campaign": cid, "remediation": remedy})
                )

    def _loop(self) -> None:
        """Tick every `interval_s`, or less often when ticks grow long (a campaign of hundreds
        of thousands of devices): the scheduler takes at most 1/MAX_DUTY of the process, so
        the jobs bridge, which shares the interpreter, keeps serving devices."""
        wait = self.interval_s
        while not self._stop.wait(wait):
            t0 = time.monotonic()
            self.tick_all()
            wait = max(self.interval_s, (time.monotonic() - t0) * (MAX_DUTY - 1))
