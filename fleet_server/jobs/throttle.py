"""Per-device request limits for the jobs bridge: one device sending far more than the protocol
needs (a buggy retry loop, a stolen certificate) must cost the other devices nothing.

A token bucket per thing name, refilled at `rate_per_s` up to `burst`. A request over the
limit is answered ``RequestThrottled`` (AWS IoT Jobs' code) without touching the database; a
device that keeps going past that gets at most one such answer per second, and the rest are
dropped unread, so a flood costs the server a dictionary lookup per message. Pure: the caller
passes the clock's reading.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Verdict(StrEnum):
    ALLOW = "allow"
    THROTTLE = "throttle"  # answer RequestThrottled
    DROP = "drop"  # already told within the last second: acknowledge and forget


@dataclass
class _Bucket:
    tokens: float
    at: float
    told_at: float = float("-inf")


class DeviceLimiter:
    def __init__(self, rate_per_s: float = 5.0, burst: int = 50, *, max_devices: int = 1_000_000) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be positive and burst at least 1")
        self.rate, self.burst, self.max_devices = rate_per_s, float(burst), max_devices
        self._buckets: dict[str, _Bucket] = {}
        self.throttled = 0
        self.dropped = 0

    def check(self, thing: str, now: float) -> Verdict:
        b = self._buckets.get(thing)
        if b is None:
            if len(self._buckets) >= self.max_devices:
                self._forget_full(now)
            b = self._buckets[thing] = _Bucket(self.burst, now)
        b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
        b.at = now
        if b.tokens >= 1:
            b.tokens -= 1
            return Verdict.ALLOW
        if now - b.told_at >= 1.0:
            b.told_at = now
            self.throttled += 1
            return Verdict.THROTTLE
        self.dropped += 1
        return Verdict.DROP

    def _forget_full(self, now: float) -> None:
        """Bound memory: a device whose bucket has refilled is indistinguishable from a new one."""
        refill_s = self.burst / self.rate
        for thing in [t for t, b in self._buckets.items() if now - b.at >= refill_s]:
            del self._buckets[thing]
