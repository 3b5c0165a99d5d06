"""Blackout and maintenance windows: a 5-field cron expression, a duration and a time zone.

A window is open at `now` when the cron expression last fired, in the window's time zone, less
than `duration` of real (UTC) time before `now`. The expression is read and stepped by cronsim,
which follows Debian's cron across daylight-saving changes: a firing in the hour skipped when
clocks go forward happens at the change, one in the hour repeated when they go back happens
once. Durations are real time: a two-hour window opened at 01:00 on the night the clocks go
forward closes at 04:00 local time, not 03:00 (hand-rolled wall-clock arithmetic got that wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from fleet_server.errors import FleetError


class CronError(FleetError, ValueError):
    """A cron expression or time zone that cannot be understood (a ValueError too, so that a
    spec validator raising it is a field error in pydantic's report)."""


def check_cron(expr: str) -> str:
    if len(expr.split()) != 5:
        raise CronError(f"cron {expr!r} needs 5 fields: minute hour day month weekday")
    try:
        CronSim(expr, datetime(2026, 1, 1))
    except CronSimError as exc:
        raise CronError(f"cron {expr!r}: {str(exc).lower()}") from exc
    return expr


@dataclass(frozen=True)
class Window:
    cron: str
    duration: timedelta
    tz: ZoneInfo

    @classmethod
    def parse(cls, cron: str, duration_minutes: int, tz: str = "UTC") -> Window:
        if not 1 <= duration_minutes <= 7 * 24 * 60:
            raise CronError("window duration must be 1 minute to 7 days")
        try:
            zone = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise CronError(f"unknown time zone {tz!r}") from exc
        return cls(check_cron(cron), timedelta(minutes=duration_minutes), zone)

    def opened_within(self, now: datetime) -> datetime | None:
        """The first time the window opened in ``(now - duration, now]``, if it did. Stepped
        forward from ``now - duration``: cronsim's reverse stepping loses track of the fold in
        the hour repeated when clocks go back."""
        now_utc = now.astimezone(UTC)
        start_utc = now_utc - self.duration
        # Compared in UTC: two datetimes of one zone compare by wall-clock time, and in the
        # repeated hour cronsim may answer a firing from its first pass, before `start`.
        for fired in CronSim(self.cron, start_utc.astimezone(self.tz)):
            at = fired.astimezone(UTC)
            if at > start_utc:
                return fired if at <= now_utc else None
        return None

    def is_open(self, now: datetime) -> bool:
        return self.opened_within(now) is not None
