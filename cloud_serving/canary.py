"""Canary releases on the same gate engine as fleet waves (`shared.gates`).

A `RolloutPlan` of traffic steps (1 → 5 → 25 → 50 → 100 % by default, a bake time each)
is advanced by `shared.gates.decide` over the candidate's own measurements: success rate,
latency p95 and p99 against the SLO and the error budget. ADVANCE raises the candidate's
weight, COMPLETE promotes it, ABORT rolls back at once and writes a failure bundle:
sampled requests and responses (PII redacted), the metrics and the decision.
"""

from __future__ import annotations

import json
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from cloud_serving.providers import ProviderCondition, ProviderError
from shared.fsutil import atomic_write_bytes
from shared.gates import (
    Action,
    Aggregation,
    Columns,
    Comparator,
    Comparison,
    Condition,
    Decision,
    Gate,
    GateDefinitionError,
    Method,
    RolloutPlan,
    RolloutState,
    RolloutStatus,
    Sample,
    Step,
    Worse,
    decide,
    family_alpha,
    resume,
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
    # Against production over the same window (None: that comparison is off). Tolerances:
    # error-rate and accuracy points (absolute), p95 latency as a relative change, ECE points.
    max_error_increase: float | None = 0.005
    max_latency_increase: float | None = 0.10
    max_accuracy_drop: float | None = None  # e.g. 0.02 where late labels arrive: the gate waits for them
    max_ece_increase: float | None = None  # e.g. 0.03
    max_fde_increase: float | None = None  # trajectories: FDE against late truths, relative (0.1)
    min_labels: int = 200  # labelled answers a side before accuracy and ECE are compared
    alpha: float = 0.05  # family-wise false-abort rate of the comparisons (Bonferroni)
    inconclusive_limit: int = 3  # bakes that cannot decide before the canary waits for a person
    manual_steps: tuple[int, ...] = ()  # 1-based steps that wait for approval once passed
    min_shadow_agreement: float | None = None  # the candidate's shadow verdict's agreement
    cohort: tuple[tuple[str, tuple[str, ...]], ...] = ()  # metadata values allowed on the candidate
    providers: tuple[ProviderCondition, ...] = ()  # conditions read from Prometheus or HTTP JSON

    def comparisons(self) -> tuple[Comparison, ...]:
        window = timedelta(seconds=self.window_s)
        wanted = [
            (self.max_error_increase, "errors", Method.PROPORTION, Worse.HIGHER, self.min_requests),
            (self.max_latency_increase, "latency_ms", Method.MANN_WHITNEY, Worse.HIGHER, self.min_requests),
            (self.max_accuracy_drop, "correct", Method.PROPORTION, Worse.LOWER, self.min_labels),
            (self.max_ece_increase, "ece", Method.DIFFERENCE, Worse.HIGHER, self.min_labels),
            (self.max_fde_increase, "fde", Method.MANN_WHITNEY, Worse.HIGHER, self.min_labels),
        ]
        on = [w for w in wanted if w[0] is not None]
        alpha = family_alpha(self.alpha, len(on), len(self.steps) * self.inconclusive_limit)
        return tuple(
            Comparison(metric, method, worse, tol, min_samples=n, window=window, alpha=alpha)
            for tol, metric, method, worse, n in on
            if tol is not None
        )

    def plan(self) -> RolloutPlan:
        window = timedelta(seconds=self.window_s)
        conditions = [
            Condition(
                "success", Comparator.GE, self.min_success_rate, min_samples=self.min_requests, window=window
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
        ]
        if self.min_shadow_agreement is not None:
            conditions.append(Condition("shadow_agreement", Comparator.GE, self.min_shadow_agreement))
        conditions += [p.condition() for p in self.providers]
        gate = Gate(tuple(conditions), name="canary", comparisons=self.comparisons())
        bake = timedelta(seconds=self.bake_s)
        manual = set(self.manual_steps)
        if any(not 1 <= m <= len(self.steps) for m in manual):
            raise GateDefinitionError(f"manual steps {sorted(manual)} are outside steps 1..{len(self.steps)}")
        return RolloutPlan(
            tuple(Step(percent=p, bake=bake, manual=i + 1 in manual) for i, p in enumerate(self.steps)),
            gate=gate,
            inconclusive_limit=self.inconclusive_limit,
        )

    def admits(self, metadata: dict[str, Any], headers: dict[str, str] | None = None) -> bool:
        """Whether a caller may be routed to the candidate (its cohort, when one is set): a
        ``header:NAME`` key matches the request's header NAME, any other key its metadata."""
        for k, values in self.cohort:
            if k.startswith("header:"):
                got = (headers or {}).get(k.removeprefix("header:").lower())
            else:
                got = metadata.get(k)
            if str(got) not in values:
                return False
        return True


EXCHANGE_EVERY = 50  # one successful exchange in 50 goes to the failure bundle; every failure does
TRIM_EVERY = 1000
MAX_SAMPLES = 200_000  # per metric and side


def redact(value: Any) -> Any:
    """Mask personal data in request metadata (`shared.logs`: keys that look personal become a
    short hash, personal-looking text anywhere too)."""
    return DEFAULT_REDACTOR(value)


SIDES = ("candidate", "baseline")
METRICS = ("success", "errors", "latency_ms", "correct", "ade", "fde")


@dataclass
class Recorded:
    """One side's samples: a request costs a few list appends; a tick moves what arrived since
    the last one into arrays once (`shared.gates.Columns`), so a tick's cost does not grow
    with the samples already converted."""

    at: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    value: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    arrays: dict[str, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = field(
        default_factory=lambda: {m: (np.empty(0), np.empty(0)) for m in METRICS}
    )
    seen: int = 0
    # How much of each metric's arrays `drain` has handed out already (gateway replicas).
    drained: dict[str, int] = field(default_factory=lambda: dict.fromkeys(METRICS, 0))

    def add(self, metric: str, t: float, v: float) -> None:
        self.at[metric].append(t)
        self.value[metric].append(v)

    def _settle(self, metric: str) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        at, value = self.arrays[metric]
        if self.at[metric]:
            at = np.concatenate([at, np.asarray(self.at[metric])])
            value = np.concatenate([value, np.asarray(self.value[metric])])
            self.at[metric].clear()
            self.value[metric].clear()
            self.arrays[metric] = (at, value)
        return at, value

    def trim(self, horizon: float) -> None:
        for m in METRICS:
            at, value = self._settle(m)
            cut = max(int(np.searchsorted(at, horizon)), at.size - MAX_SAMPLES)
            if cut > 0:
                self.arrays[m] = (at[cut:], value[cut:])
                self.drained[m] = max(0, self.drained[m] - cut)

    def drain(self) -> dict[str, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
        """What was recorded since the last drain, by metric: a replica sends it to the
        shared store, where the deciding replica combines every replica's samples."""
        out = {}
        for m in METRICS:
            at, value = self._settle(m)
            if at.size > self.drained[m]:
                out[m] = (at[self.drained[m] :], value[self.drained[m] :])
                self.drained[m] = at.size
        return out

    @classmethod
    def of(cls, arrays: dict[str, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]) -> Recorded:
        """Samples gathered elsewhere (every replica's), in time order."""
        rec = cls()
        for m, (at, value) in arrays.items():
            order = np.argsort(at, kind="stable")
            rec.arrays[m] = (at[order], value[order])
        rec.seen = int(rec.arrays["success"][0].size)
        return rec

    def columns(self) -> dict[str, Columns]:
        out = {}
        for m in METRICS:
            at, value = self._settle(m)
            if at.size:
                out[m] = Columns(at, value)
        return out

    def recent(self, metric: str, since: float) -> list[float]:
        at, value = self._settle(metric)
        return [float(v) for v in value[int(np.searchsorted(at, since)) :]]


@dataclass
class Canary:
    """One running canary: the candidate's measurements, production's over the same window
    (the baseline of the relative gates), and the plan's state."""

    model: str
    production: str
    candidate: str
    spec: CanarySpec
    state: RolloutState
    sides: dict[str, Recorded] = field(default_factory=lambda: {side: Recorded() for side in SIDES})
    # Late labels per side: (when, confidence, correct), for ECE.
    labels: dict[str, deque[tuple[float, float, bool]]] = field(
        default_factory=lambda: {side: deque(maxlen=MAX_SAMPLES) for side in SIDES}
    )
    exchanges: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=50))
    redactor: Redactor = DEFAULT_REDACTOR  # the gateway's, as configured
    log: list[str] = field(default_factory=list)
    started_at: datetime | None = None
    shadow_agreement: tuple[float, int] | None = None  # the candidate's shadow verdict
    # The providers' latest readings (one sample each: a gate judges what they say now) and
    # why a provider could not be read on its last poll.
    readings: dict[str, list[Sample]] = field(default_factory=dict)
    provider_errors: dict[str, str] = field(default_factory=dict)
    last_reason: str | None = None  # the latest decision's, holds included
    _plan: RolloutPlan | None = None
    # Names this canary among the replicas (their samples in the shared store are filed by it).
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    @property
    def answered(self) -> int:
        """Requests the candidate has answered or failed."""
        return self.sides["candidate"].seen

    @classmethod
    def begin(cls, model: str, production: str, candidate: str, spec: CanarySpec, now: datetime) -> Canary:
        c = cls(model, production, candidate, spec, start(now), started_at=now)
        c.log.append(f"{now.isoformat()} canary {candidate} over {production}: steps {list(spec.steps)} %")
        return c

    @property
    def plan(self) -> RolloutPlan:
        if self._plan is None:
            self._plan = self.spec.plan()
        return self._plan

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
        baseline: bool = False,
    ) -> None:
        """One request of the candidate (or, with `baseline`, of production while the canary
        runs). Cheap on the request path: a few appends, trimmed in bulk; an exchange is
        built (and redacted) only when it is sampled for the bundle."""
        rec = self.sides["baseline" if baseline else "candidate"]
        t = now.timestamp()
        rec.add("success", t, 1.0 if ok else 0.0)
        rec.add("errors", t, 0.0 if ok else 1.0)
        if ok:
            rec.add("latency_ms", t, latency_ms)
        rec.seen += 1
        if not baseline and exchange is not None and (not ok or rec.seen % EXCHANGE_EVERY == 1):
            self.exchanges.append(self.redactor(exchange()))
        if rec.seen % TRIM_EVERY == 0:
            rec.trim(t - self.spec.window_s * 2)

    def label(self, now: datetime, version: str, confidence: float, correct: bool) -> None:
        """A late label for an answer given while the canary ran, by the version that gave it."""
        if version not in (self.candidate, self.production):
            return
        side = "candidate" if version == self.candidate else "baseline"
        t = now.timestamp()
        self.labels[side].append((t, confidence, correct))
        self.sides[side].add("correct", t, 1.0 if correct else 0.0)

    def poll(self, client: httpx.Client, now: datetime) -> None:
        """Read every provider once (blocking: call it off the event loop). A failed read
        leaves no reading, so its condition waits, and its reason is kept for the decision."""
        for p in self.spec.providers:
            try:
                value = p.read(client)
            except ProviderError as exc:
                self.readings.pop(p.name, None)
                self.provider_errors[p.name] = str(exc)
                continue
            self.readings[p.name] = [Sample(now, value)]
            self.provider_errors.pop(p.name, None)

    def path_label(self, now: datetime, version: str, ade: float, fde: float) -> None:
        """A trajectory's late truth for an answer given while the canary ran."""
        if version not in (self.candidate, self.production):
            return
        rec = self.sides["candidate" if version == self.candidate else "baseline"]
        t = now.timestamp()
        rec.add("ade", t, ade)
        rec.add("fde", t, fde)

    def _snapshot(self, side: str, now: datetime) -> dict[str, Columns | list[Sample]]:
        snap: dict[str, Columns | list[Sample]] = dict(self.sides[side].columns())
        if side == "candidate":
            snap.update(self.readings)
        since = now.timestamp() - self.spec.window_s
        recent = [(p, c) for at, p, c in self.labels[side] if at >= since]
        if recent:
            from shared.drift.stats import ece  # scipy, as for the gateway's calibration

            conf = np.fromiter((p for p, _ in recent), dtype=np.float64, count=len(recent))
            hits = np.fromiter((c for _, c in recent), dtype=np.float64, count=len(recent))
            snap["ece"] = [Sample(now, float(ece(conf, hits, 10)[0]), len(recent))]
        if side == "candidate" and self.shadow_agreement is not None:
            value, n = self.shadow_agreement
            snap["shadow_agreement"] = [Sample(now, value, max(1, n))]
        return snap

    def tick(self, now: datetime) -> Decision:
        d = decide(
            self.plan, self.state, self._snapshot("candidate", now), now, self._snapshot("baseline", now)
        )
        if self.provider_errors:  # pending with the reason: what the provider said, not "no data"
            why = "; ".join(f"provider {n}: {e}" for n, e in sorted(self.provider_errors.items()))
            d = replace(d, reason=f"{d.reason}; {why}")
        return self._take(d, now)

    def judge(self, now: datetime, *, approve: bool, by: str) -> Decision:
        """A person's call on a canary that waits (a manual step, or gates that could not
        decide): approve moves it on, reject rolls it back."""
        return self._take(resume(self.plan, self.state, now, approve=approve, by=by), now)

    def _take(self, d: Decision, now: datetime) -> Decision:
        self.state = d.state
        self.last_reason = d.reason
        if d.action is not Action.HOLD or "inconclusive" in d.reason:
            self.log.append(f"{now.isoformat()} {d.action.value}: {d.reason}")
        return d

    def write_failure_bundle(self, root: Path, now: datetime, decision: Decision) -> Path:
        """Everything an on-call engineer needs, in one directory, written atomically."""
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        out = root / f"{self.model}-{self.candidate}-{stamp}"
        out.mkdir(parents=True, exist_ok=True)
        since = now.timestamp() - self.spec.window_s
        cand = self.sides["candidate"]
        recent = {m: cand.recent(m, since) for m in ("success", "latency_ms")}
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
                default=_plain,
            ).encode(),
        )
        atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
        atomic_write_bytes(
            out / "requests.jsonl",
            "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.exchanges).encode(),
        )
        return out


def spec_to_dict(spec: CanarySpec) -> dict[str, Any]:
    """A spec as JSON-able data (the replicas' shared store); `spec_from_dict` reverses it."""
    out: dict[str, Any] = json.loads(json.dumps(asdict(spec), default=_plain))
    return out


def spec_from_dict(data: dict[str, Any]) -> CanarySpec:
    fields = dict(data)
    fields["steps"] = tuple(fields["steps"])
    fields["manual_steps"] = tuple(fields["manual_steps"])
    fields["cohort"] = tuple((k, tuple(v)) for k, v in fields["cohort"])
    fields["providers"] = tuple(
        ProviderCondition(**{**p, "comparator": Comparator(p["comparator"])}) for p in fields["providers"]
    )
    return CanarySpec(**fields)


def state_to_dict(state: RolloutState) -> dict[str, Any]:
    at, status = state.step_started_at.isoformat(), state.status.value
    return {**asdict(state), "step_started_at": at, "status": status}


def state_from_dict(data: dict[str, Any]) -> RolloutState:
    return RolloutState(
        **{
            **data,
            "step_started_at": datetime.fromisoformat(data["step_started_at"]),
            "status": RolloutStatus(data["status"]),
        }
    )


def _plain(value: Any) -> Any:
    """JSON for what a spec holds besides plain values: provider conditions, tuples."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return list(value)
