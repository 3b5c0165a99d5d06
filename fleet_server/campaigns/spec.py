"""What an operator asks of a campaign, validated (the API's request body and the stored spec).

Vocabulary from AWS IoT Jobs and Eclipse hawkBit: waves (groups) as counts or
percentages, success and error gates, soak time, maximum concurrency, a
rollout rate with exponential ramp, maintenance/blackout windows, snapshot or
continuous targeting, in-progress timeouts and retries.
"""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fleet_server.campaigns.cron import CronError, Window
from shared.gates import Aggregation, Comparator, Comparison, Condition, Gate, Method, Worse
from shared.jobdoc import Preconditions
from shared.semver import InvalidVersionError, SemVer

Metric = Literal["success_rate", "failure_rate"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConditionSpec(_Spec):
    metric: Metric
    comparator: Literal[">=", ">", "<=", "<"]
    threshold: float = Field(ge=0, le=1)
    min_samples: int = Field(default=1, ge=1)

    def condition(self, reached: int) -> Condition:
        # A gate can never ask for more samples than devices reached so far.
        return Condition(
            self.metric,
            Comparator(self.comparator),
            self.threshold,
            min_samples=max(1, min(self.min_samples, reached)),
        )


class GateSpec(_Spec):
    conditions: list[ConditionSpec] = Field(min_length=1)

    def gate(self, name: str, reached: int) -> Gate:
        return Gate(tuple(c.condition(reached) for c in self.conditions), name=name)


CompareMetric = Literal["p95_ms", "ood_ratio", "restarts", "throttled", "quality"]


class CompareSpec(_Spec):
    """A wave gate relative to the cohort: the devices this campaign updated against the
    cohort's devices it has not updated yet, each device's latest beacon inside the same
    window (`shared.gates.compare`). Checked when a wave has finished and soaked, before the
    next starts; a regression pauses the campaign with the reason.

    `p95_ms` (on-device p95 latency), `restarts` (agent restarts since the active version)
    and `quality` (a proxy the beacon carries under `quality_key`, e.g.
    ``detections_per_frame@time=night``) compare per-device values by Mann-Whitney U, with a
    relative `tolerance` on the median (0.2: 20 % worse); `ood_ratio` the same way;
    `throttled` (the share of devices throttled now) by a two-proportion test with an
    absolute tolerance."""

    metric: CompareMetric
    quality_key: str | None = Field(default=None, min_length=1, max_length=64)
    worse: Literal["higher", "lower"] = "higher"
    tolerance: float = Field(default=0.2, ge=0, le=100)
    min_devices: int = Field(default=20, ge=2, le=1_000_000)
    window_s: float = Field(default=900, gt=0, le=7 * 86400)
    alpha: float = Field(default=0.01, gt=0, lt=0.5)

    @model_validator(mode="after")
    def _key(self) -> CompareSpec:
        if (self.metric == "quality") != (self.quality_key is not None):
            raise ValueError(
                "quality_key names the beacon's quality proxy, and only metric 'quality' has one"
            )
        return self

    @property
    def name(self) -> str:
        return f"quality[{self.quality_key}]" if self.metric == "quality" else self.metric

    def comparison(self) -> Comparison:
        method = Method.PROPORTION if self.metric == "throttled" else Method.MANN_WHITNEY
        return Comparison(
            self.name,
            method,
            Worse(self.worse),
            self.tolerance,
            min_samples=self.min_devices,
            window=timedelta(seconds=self.window_s),
            alpha=self.alpha,
            quantile=Aggregation.P50,
        )


class WaveSpec(_Spec):
    percent: float | None = Field(default=None, gt=0, le=100)
    count: int | None = Field(default=None, ge=1)
    soak_s: float = Field(default=0, ge=0)
    manual_advance: bool = False

    @model_validator(mode="after")
    def _one_size(self) -> WaveSpec:
        if (self.percent is None) == (self.count is None):
            raise ValueError("a wave has exactly one of percent or count")
        return self


class RateSpec(_Spec):
    """AWS's jobExecutionsRolloutConfig: a base rate that grows by `increment_factor` every time
    `increase_after_succeeded` more devices succeed (or, with `increase_after_notified`, every
    time that many more are notified), capped at `maximum_per_minute`. The rate is paced, not
    spent at once: a tick queues at most a few seconds' worth (`planner.PACE_MAX_S`)."""

    maximum_per_minute: int = Field(default=1000, ge=1, le=100_000)
    base_rate_per_minute: int | None = Field(default=None, ge=1)
    increment_factor: float = Field(default=2.0, ge=1.0, le=5.0)
    increase_after_succeeded: int = Field(default=50, ge=1)
    increase_after_notified: int | None = Field(default=None, ge=1)

    def per_minute(self, succeeded: int, notified: int = 0) -> int:
        if self.base_rate_per_minute is None:
            return self.maximum_per_minute
        if self.increase_after_notified is not None:
            steps = notified // self.increase_after_notified
        else:
            steps = succeeded // self.increase_after_succeeded
        rate = self.base_rate_per_minute * self.increment_factor**steps
        return int(min(self.maximum_per_minute, rate))


DEVICE_TZ = "device"  # a window in each device's own local time (its `timezone` attribute)


class WindowSpec(_Spec):
    """A cron window. In a named time zone it holds the whole campaign while open; with
    timezone "device" it is read in each device's local time (attribute `timezone`, UTC when
    absent) and defers only the devices it is open for, like a server-side precondition."""

    cron: str
    duration_minutes: int = Field(ge=1, le=7 * 24 * 60)
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _valid(self) -> WindowSpec:
        try:
            Window.parse(self.cron, self.duration_minutes, "UTC" if self.per_device else self.timezone)
        except CronError as exc:
            raise ValueError(str(exc)) from exc
        return self

    @property
    def per_device(self) -> bool:
        return self.timezone == DEVICE_TZ

    def window(self, device_timezone: str | None = None) -> Window:
        """The window; for a per-device one, in `device_timezone` (an unknown zone is UTC)."""
        if not self.per_device:
            return Window.parse(self.cron, self.duration_minutes, self.timezone)
        try:
            return Window.parse(self.cron, self.duration_minutes, device_timezone or "UTC")
        except CronError:
            return Window.parse(self.cron, self.duration_minutes, "UTC")


FailureType = Literal["FAILED", "TIMED_OUT", "ALL"]


class RetryCriterion(_Spec):
    """AWS's jobExecutionsRetryConfig criterion: retry this failure type up to N times.
    REJECTED is never retried: the device refused the job on purpose."""

    failure_type: FailureType
    retries: int = Field(ge=1, le=10)


class RetrySpec(_Spec):
    """Retries per failure type, each after an exponential backoff from the failure."""

    criteria: list[RetryCriterion] = Field(default_factory=list, max_length=3)
    backoff_s: float = Field(default=30.0, ge=0, le=86_400)
    backoff_factor: float = Field(default=2.0, ge=1.0, le=10.0)
    backoff_max_s: float = Field(default=3600.0, ge=0, le=7 * 86_400)

    @field_validator("criteria")
    @classmethod
    def _distinct(cls, criteria: list[RetryCriterion]) -> list[RetryCriterion]:
        kinds = [c.failure_type for c in criteria]
        if len(set(kinds)) != len(kinds):
            raise ValueError("one retry criterion per failure type")
        return criteria

    def allowed(self, status: str) -> int:
        """Retries allowed after a failure of `status`; a specific type beats ALL."""
        if status not in ("FAILED", "TIMED_OUT"):
            return 0
        by_type: dict[str, int] = {c.failure_type: c.retries for c in self.criteria}
        return by_type.get(status, by_type.get("ALL", 0))

    def delay(self, attempt: int) -> timedelta:
        """Backoff before attempt `attempt + 1`, after attempt `attempt` failed."""
        seconds = self.backoff_s * self.backoff_factor ** max(0, attempt - 1)
        return timedelta(seconds=min(seconds, self.backoff_max_s))


class ScheduleSpec(_Spec):
    """AWS's SchedulingConfig: start no earlier than `start_at`; at `end_at` stop notifying
    (`stop_rollout`), also cancel queued executions (`cancel`), or in-progress ones too
    (`force_cancel`)."""

    start_at: datetime | None = None
    end_at: datetime | None = None
    end_behavior: Literal["stop_rollout", "cancel", "force_cancel"] = "stop_rollout"

    @model_validator(mode="after")
    def _aware_and_ordered(self) -> ScheduleSpec:
        for name in ("start_at", "end_at"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name} needs a time zone (e.g. 2026-12-01T02:00:00Z)")
        if self.start_at and self.end_at and self.end_at <= self.start_at:
            raise ValueError("end_at must be after start_at")
        return self


class ServerPreconditions(_Spec):
    """Checked by the server when it is about to notify a device; a device that does not meet
    them is deferred (not failed) and notified once it does."""

    online_within_s: int | None = Field(default=None, ge=1, le=30 * 86_400)
    firmware_min: str | None = Field(default=None, max_length=64)
    regions: list[str] | None = Field(default=None, min_length=1)

    @field_validator("firmware_min")
    @classmethod
    def _semver(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                SemVer.parse(value)
            except InvalidVersionError as exc:
                raise ValueError(str(exc)) from exc
        return value

    def unmet(
        self, *, now: datetime, last_seen_at: datetime | None, firmware: str | None, region: str | None
    ) -> str | None:
        """Why a device may not be notified now, or None."""
        if self.online_within_s is not None and (
            last_seen_at is None or (now - last_seen_at).total_seconds() > self.online_within_s
        ):
            return "offline"
        if self.firmware_min is not None:
            if firmware is None:  # not "below": nobody has told the server which firmware it runs
                return f"firmware unknown (needs {self.firmware_min}; register it with the device)"
            try:
                if SemVer.parse(firmware) < SemVer.parse(self.firmware_min):
                    return f"firmware {firmware} below {self.firmware_min}"
            except InvalidVersionError:
                return f"firmware {firmware!r} is not a version"
        if self.regions is not None and region not in self.regions:
            return f"region {region!r} not allowed"
        return None


class Cohort(_Spec):
    """Which devices: a SKU plus equality filters over inventory fields and attributes."""

    sku: str = Field(min_length=1, max_length=64)
    regions: list[str] | None = None
    customers: list[str] | None = None
    attributes: dict[str, str] = Field(default_factory=dict)
    things: list[str] | None = None
    groups: list[str] | None = None  # static groups: a device in any of them


class CampaignSpec(_Spec):
    name: str = Field(min_length=1, max_length=128)
    target: str = Field(min_length=1, max_length=512)
    repository: str = Field(min_length=1, max_length=2048)
    cohort: Cohort
    targeting: Literal["snapshot", "continuous"] = "snapshot"
    waves: list[WaveSpec] = Field(min_length=1, max_length=100)
    success_gate: GateSpec = GateSpec(
        conditions=[ConditionSpec(metric="success_rate", comparator=">=", threshold=0.98, min_samples=50)]
    )
    error_gate: GateSpec = GateSpec(
        conditions=[ConditionSpec(metric="failure_rate", comparator="<=", threshold=0.05, min_samples=20)]
    )
    max_concurrent: int = Field(default=1000, ge=1)
    rate: RateSpec = RateSpec()
    blackouts: list[WindowSpec] = Field(default_factory=list)
    preconditions: Preconditions = Preconditions()  # device-side, sent in the job document
    server_preconditions: ServerPreconditions = ServerPreconditions()
    retry: RetrySpec = RetrySpec()
    schedule: ScheduleSpec = ScheduleSpec()
    in_progress_timeout_min: int | None = Field(default=None, ge=1, le=10080)
    seed: int = 0
    # Updated devices against the cohort's others, before each next wave (see CompareSpec);
    # comparisons that cannot decide hold the wave this long, then pause it for a person.
    compare: list[CompareSpec] = Field(default_factory=list, max_length=20)
    compare_wait_s: float = Field(default=1800, ge=0, le=7 * 86400)

    @field_validator("waves")
    @classmethod
    def _cumulative(cls, waves: list[WaveSpec]) -> list[WaveSpec]:
        # Counts and percentages may mix ("10 devices, then 25 %, then 100 %"); within each
        # kind the sizes are cumulative, and the planner never lets a wave shrink the reach.
        for kind in ("percent", "count"):
            sizes = [float(getattr(w, kind)) for w in waves if getattr(w, kind) is not None]
            if any(b < a for a, b in itertools.pairwise(sizes)):
                raise ValueError(f"wave {kind}s are cumulative and must not decrease")
        return waves
