"""Alert rules, pure: a rule, the samples of what it watches and a clock in; a decision out.

Two kinds of rule, one state machine:

* ``burn_rate``: the SLO's error budget burning too fast, judged on two windows at once (the
  long one says it matters, the short one says it is still happening; Google SRE workbook's
  multi-window burn-rate alert). Samples are (at, good, bad) counts.
* ``above`` / ``below``: a value (a drift index, an OOD rate, ECE, a queue depth) past a
  threshold, as the mean of the window's samples (at, value).

A rule is `pending` from the first breach, `firing` once it has held for `for_s`, and
`resolved` when it no longer holds; only the transitions are reported, so a caller acts
(notifies, remediates) once per incident. Where it runs (the fleet server's scheduler, the
gateway's tick) and what the action does are the caller's business.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from shared.errors import TidegateError


class AlertRuleError(TidegateError, ValueError):
    """A rule that cannot be evaluated as written."""


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True)
class AlertRule:
    name: str
    kind: Literal["burn_rate", "above", "below"]
    severity: Severity = Severity.WARNING
    threshold: float = 0.0  # above/below: the value; burn_rate: the burn rate (14.4: 2 % of 30 days in 1 h)
    window_s: float = 300.0  # above/below: the averaging window; burn_rate: the long window
    short_window_s: float = 60.0  # burn_rate only
    slo: float = 0.99  # burn_rate only: the success objective; the budget is 1 - slo
    for_s: float = 0.0
    min_samples: int = 20  # burn_rate: requests in the long window; above/below: samples
    action: str | None = None  # the remediation the caller runs when the rule fires

    def __post_init__(self) -> None:
        if self.kind == "burn_rate" and not 0 < self.slo < 1:
            raise AlertRuleError(f"{self.name}: slo must be between 0 and 1, got {self.slo}")
        if self.window_s <= 0 or self.short_window_s <= 0 or self.for_s < 0:
            raise AlertRuleError(f"{self.name}: windows must be positive and for_s not negative")


@dataclass(frozen=True)
class CountSample:
    at: datetime
    good: int
    bad: int


@dataclass(frozen=True)
class ValueSample:
    at: datetime
    value: float


@dataclass(frozen=True)
class Reading:
    """What the rule saw: the value it compared, or None when there were too few samples."""

    value: float | None
    detail: str


def burn_rate(
    samples: Iterable[CountSample], now: datetime, window_s: float, slo: float
) -> tuple[float, int]:
    """(burn rate, requests) over the window: the error ratio as a multiple of the budget."""
    since = now - timedelta(seconds=window_s)
    good = bad = 0
    for s in samples:
        if since < s.at <= now:
            good, bad = good + s.good, bad + s.bad
    total = good + bad
    return ((bad / total) / (1 - slo) if total else 0.0), total


def read(rule: AlertRule, samples: list[CountSample] | list[ValueSample], now: datetime) -> Reading:
    if rule.kind == "burn_rate":
        counts = [s for s in samples if isinstance(s, CountSample)]
        long_rate, n = burn_rate(counts, now, rule.window_s, rule.slo)
        short_rate, _ = burn_rate(counts, now, rule.short_window_s, rule.slo)
        if n < rule.min_samples:
            return Reading(None, f"{n} requests in {rule.window_s:g} s (needs {rule.min_samples})")
        return Reading(
            min(long_rate, short_rate),
            f"burn rate {long_rate:.1f} over {rule.window_s:g} s and {short_rate:.1f} over "
            f"{rule.short_window_s:g} s (threshold {rule.threshold:g}, SLO {rule.slo:g})",
        )
    since = now - timedelta(seconds=rule.window_s)
    values = [s.value for s in samples if isinstance(s, ValueSample) and since < s.at <= now]
    if len(values) < rule.min_samples:
        return Reading(None, f"{len(values)} samples in {rule.window_s:g} s (needs {rule.min_samples})")
    mean = sum(values) / len(values)
    return Reading(mean, f"mean {mean:.4g} over {rule.window_s:g} s ({rule.kind} {rule.threshold:g})")


def breached(rule: AlertRule, reading: Reading) -> bool:
    if reading.value is None:
        return False
    if rule.kind == "below":
        return reading.value < rule.threshold
    return reading.value >= rule.threshold if rule.kind == "burn_rate" else reading.value > rule.threshold


@dataclass
class AlertState:
    status: Literal["ok", "pending", "firing"] = "ok"
    since: datetime | None = None


@dataclass(frozen=True)
class AlertEvent:
    rule: str
    status: Literal["firing", "resolved"]
    severity: Severity
    at: datetime
    detail: str
    action: str | None


def step(
    rule: AlertRule, samples: list[CountSample] | list[ValueSample], now: datetime, state: AlertState
) -> AlertEvent | None:
    """Advance one rule's state (in place); the event when it starts firing or resolves."""
    reading = read(rule, samples, now)
    if breached(rule, reading):
        if state.status == "ok":
            state.status, state.since = "pending", now
        if (
            state.status == "pending"
            and state.since is not None
            and (now - state.since).total_seconds() >= rule.for_s
        ):
            state.status = "firing"
            return AlertEvent(rule.name, "firing", rule.severity, now, reading.detail, rule.action)
        return None
    was = state.status
    state.status, state.since = "ok", None
    if was == "firing":
        return AlertEvent(rule.name, "resolved", rule.severity, now, reading.detail, None)
    return None
