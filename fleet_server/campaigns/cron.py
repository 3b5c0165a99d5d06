"""Blackout and maintenance windows: a 5-field cron expression, a duration and a time zone.

A window is open at `now` when the cron expression fired at some minute in
``(now - duration, now]`` in the window's time zone. Fields: minute, hour,
day of month, month, day of week (0-6, Sunday = 0 or 7); each ``*``, a number,
``a-b``, ``*/n``, ``a-b/n`` or a comma list of those.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


class CronError(ValueError):
    """A cron expression or time zone that cannot be understood."""


def _field(text: str, lo: int, hi: int) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise CronError(f"bad step in {part!r}")
        if base == "*":
            a, b = lo, hi
        elif "-" in base:
            a_text, b_text = base.split("-", 1)
            a, b = int(a_text), int(b_text)
        else:
            a = b = int(base)
        if not (lo <= a <= hi and lo <= b <= hi and a <= b):
            raise CronError(f"{part!r} is outside {lo}-{hi}")
        out.update(range(a, b + 1, step))
    return frozenset(out)


@dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, expr: str) -> Cron:
        fields = expr.split()
        if len(fields) != 5:
            raise CronError(f"cron {expr!r} needs 5 fields: minute hour day month weekday")
        try:
            parsed = [_field(f, lo, hi) for f, (lo, hi) in zip(fields, _RANGES, strict=True)]
        except ValueError as exc:
            raise CronError(f"cron {expr!r}: {exc}") from None
        weekdays = frozenset(d % 7 for d in parsed[4])
        return cls(parsed[0], parsed[1], parsed[2], parsed[3], weekdays, fields[2] == "*", fields[4] == "*")

    def matches(self, t: datetime) -> bool:
        if t.minute not in self.minutes or t.hour not in self.hours or t.month not in self.months:
            return False
        dom, dow = t.day in self.days, (t.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:  # cron: both restricted means either may match
            return dom and dow
        return dom or dow


@dataclass(frozen=True)
class Window:
    cron: Cron
    duration: timedelta
    tz: ZoneInfo

    @classmethod
    def parse(cls, cron: str, duration_minutes: int, tz: str = "UTC") -> Window:
        if not 1 <= duration_minutes <= 7 * 24 * 60:
            raise CronError("window duration must be 1 minute to 7 days")
        try:
            zone = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise CronError(f"unknown time zone {tz!r}") from None
        return cls(Cron.parse(cron), timedelta(minutes=duration_minutes), zone)

    def is_open(self, now: datetime) -> bool:
        local = now.astimezone(self.tz).replace(second=0, microsecond=0)
        minutes = int(self.duration.total_seconds() // 60)
        return any(self.cron.matches(local - timedelta(minutes=m)) for m in range(minutes))
