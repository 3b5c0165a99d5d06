"""Canary releases on the same gate engine as fleet waves (`shared.gates`).

A `RolloutPlan` of traffic steps (1 → 5 → 25 → 50 → 100 % by default, a bake time each)
is advanced by `shared.gates.decide` over the candidate's own measurements: success rate,
latency p95 and p99 against the SLO and the error budget. ADVANCE raises the candidate's
weight, COMPLETE promotes it, ABORT rolls back at once and writes a failure bundle:
sampled requests and responses (PII redacted), the metrics and the decision.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from shared.fsutil import atomic_write_bytes
from shared.gates import (
    Action,
    Aggregation,
    Comparator,
    Condition,
    Decision,
    Gate,
    RolloutPlan,
    RolloutState,
    Sample,
    Step,
    decide,
    start,
)
from shared.logs import DEFAULT_REDACTOR, Redactor


@dataclass(frozen=True)
class CanarySpec:
    steps: tuple[float, ...] = (1, 5, 25, 50, 100)
    bake_s: float = 300
    min_requests: int = 50
    min_success_rate: float = 0.99
    slo_p95_ms: float = 100.0
    slo_p99_ms: float = 250.0
    window_s: float = 300.0

    def plan(self) -> RolloutPlan:
        window = timedelta(seconds=self.window_s)
        gate = Gate(
            (
                Condition(
                    "success",
                    Comparator.GE,
                    self.min_success_rate,
                    min_samples=self.min_requests,
                    window=window,
                ),
                Condition(
                    "latency_ms",
                    Comparator.LE,
                    self.slo_p95_ms,
                    min_samples=self.min_requests,
                    window=window,
                    aggregation=Aggregation.P95,
                ),
                Condition(
                    "latency_ms",
                    Comparator.LE,
                    self.slo_p99_ms,
                    min_samples=self.min_requests,
                    window=window,
                    aggregation=Aggregation.P99,
                ),
            ),
            name="canary",
        )
        return RolloutPlan(
            tuple(Step(percent=p, bake=timedelta(seconds=self.bake_s)) for p in self.steps), gate=gate
        )


EXCHANGE_EVERY = 50  # one successful exchange in 50 goes to the failure bundle; every failure does
TRIM_EVERY = 1000
MAX_SAMPLES = 50_000


def redact(value: Any) -> Any:
    """Mask personal data in request metadata (`shared.logs`: keys that look personal become a
    short hash, personal-looking text anywhere too)."""
    return DEFAULT_REDACTOR(value)


@dataclass
class Canary:
    """One running canary: the candidate's measurements and the plan's state."""

    model: str
    production: str
    candidate: str
    spec: CanarySpec
    state: RolloutState
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {"success": [], "latency_ms": []})
    exchanges: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=50))
    redactor: Redactor = DEFAULT_REDACTOR  # the gateway's, as configured
    log: list[str] = field(default_factory=list)
    started_at: datetime | None = None
    _seen: int = 0

    @property
    def answered(self) -> int:
        """Requests the candidate has answered or failed."""
        return self._seen

    @classmethod
    def begin(cls, model: str, production: str, candidate: str, spec: CanarySpec, now: datetime) -> Canary:
        c = cls(model, production, candidate, spec, start(now), started_at=now)
        c.log.append(f"{now.isoformat()} canary {candidate} over {production}: steps {list(spec.steps)} %")
        return c

    @property
    def weight(self) -> float:
        """The candidate's share of traffic now (0-1)."""
        return self.spec.steps[min(self.state.step, len(self.spec.steps) - 1)] / 100

    def record(
        self,
        now: datetime,
        *,
        ok: bool,
        latency_ms: float,
        exchange: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """One candidate request. Cheap on the request path: samples are appended and trimmed
        in bulk; an exchange is built (and redacted) only when it is sampled for the bundle."""
        self.samples["success"].append(Sample(now, 1.0 if ok else 0.0))
        if ok:
            self.samples["latency_ms"].append(Sample(now, latency_ms))
        self._seen += 1
        if exchange is not None and (not ok or self._seen % EXCHANGE_EVERY == 1):
            self.exchanges.append(self.redactor(exchange()))
        if self._seen % TRIM_EVERY == 0:
            horizon = now - timedelta(seconds=self.spec.window_s * 2)
            for name, values in self.samples.items():
                self.samples[name] = [s for s in values if s.at >= horizon][-MAX_SAMPLES:]

    def tick(self, now: datetime) -> Decision:
        d = decide(self.spec.plan(), self.state, self.samples, now)
        self.state = d.state
        if d.action is not Action.HOLD:
            self.log.append(f"{now.isoformat()} {d.action.value}: {d.reason}")
        return d

    def write_failure_bundle(self, root: Path, now: datetime, decision: Decision) -> Path:
        """Everything an on-call engineer needs, in one directory, written atomically."""
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        out = root / f"{self.model}-{self.candidate}-{stamp}"
        out.mkdir(parents=True, exist_ok=True)
        window = now - timedelta(seconds=self.spec.window_s)
        recent = {k: [s.value for s in v if s.at >= window] for k, v in self.samples.items()}
        metrics = {
            "requests": len(recent["success"]),
            "success_rate": sum(recent["success"]) / len(recent["success"]) if recent["success"] else None,
            "latency_ms": sorted(recent["latency_ms"])[-20:],
            "step": self.state.step,
            "weight": self.weight,
        }
        atomic_write_bytes(
            out / "decision.json",
            json.dumps(
                {
                    "model": self.model,
                    "production": self.production,
                    "candidate": self.candidate,
                    "action": decision.action.value,
                    "reason": decision.reason,
                    "at": now.isoformat(),
                    "spec": self.spec.__dict__,
                    "log": self.log,
                },
                indent=2,
                default=list,
            ).encode(),
        )
        atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
        atomic_write_bytes(
            out / "requests.jsonl",
            "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.exchanges).encode(),
        )
        return out
