"""What an operator asks of a campaign, validated (the API's request body and the stored spec).

Vocabulary from AWS IoT Jobs and Eclipse hawkBit: waves (groups) as counts or
percentages, success and error gates, soak time, maximum concurrency, a
rollout rate with exponential ramp, maintenance/blackout windows, snapshot or
continuous targeting, in-progress timeouts and retries.
"""

from __future__ import annotations

import itertools
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fleet_server.campaigns.cron import CronError, Window
from shared.gates import Comparator, Condition, Gate
from shared.jobdoc import Preconditions

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
    `increase_after_succeeded` more devices succeed, capped at `maximum_per_minute`."""

    maximum_per_minute: int = Field(default=1000, ge=1, le=100_000)
    base_rate_per_minute: int | None = Field(default=None, ge=1)
    increment_factor: float = Field(default=2.0, ge=1.0, le=5.0)
    increase_after_succeeded: int = Field(default=50, ge=1)

    def per_minute(self, succeeded: int) -> int:
        if self.base_rate_per_minute is None:
            return self.maximum_per_minute
        steps = succeeded // self.increase_after_succeeded
        rate = self.base_rate_per_minute * self.increment_factor**steps
        return int(min(self.maximum_per_minute, rate))


class WindowSpec(_Spec):
    cron: str
    duration_minutes: int = Field(ge=1, le=7 * 24 * 60)
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _valid(self) -> WindowSpec:
        try:
            Window.parse(self.cron, self.duration_minutes, self.timezone)
        except CronError as exc:
            raise ValueError(str(exc)) from None
        return self

    def window(self) -> Window:
        return Window.parse(self.cron, self.duration_minutes, self.timezone)


class Cohort(_Spec):
    """Which devices: a SKU plus equality filters over inventory fields and attributes."""

    sku: str = Field(min_length=1, max_length=64)
    regions: list[str] | None = None
    customers: list[str] | None = None
    attributes: dict[str, str] = Field(default_factory=dict)
    things: list[str] | None = None


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
    preconditions: Preconditions = Preconditions()
    in_progress_timeout_min: int | None = Field(default=None, ge=1, le=10080)
    seed: int = 0

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
