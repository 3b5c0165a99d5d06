"""The gateway's core, without HTTP: models, their versions, and the release in progress.

Per model: the loaded versions (backends), the production version, a routing split by
weight with a per-release salt, and at most one of each: a shadow, a canary, a fallback.
`infer` routes one request and never lets a candidate's failure reach the caller (the
request is answered by production instead, and the failure counts against the candidate);
a production failure goes to the fallback when there is one. `tick` advances canaries on
the shared gate engine and rolls back or promotes them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from cloud_serving.backends import Backend, BackendError, ConstantFallback, OnnxBackend, TritonBackend
from cloud_serving.canary import Canary, CanarySpec
from cloud_serving.config import BatchingConfig, ConfigError, ModelConfig, ServingConfig, VersionConfig
from cloud_serving.diffs import Task, TaskSpec, displacement
from cloud_serving.errors import (
    InvalidReleaseError,
    OverloadError,
    ReleaseError,
    UnavailableError,
    UnknownModelError,
)
from cloud_serving.experiments import Experiment, ExperimentSpec
from cloud_serving.flags import UNSET, FileFlags, FlagCache, FlagSource, HttpFlags
from cloud_serving.graylog import GrayLog
from cloud_serving.incidents import IncidentRecorder
from cloud_serving.observability import refresh_tracing, span
from cloud_serving.quality import COHORT_KINDS, Calibration, Cohort, InputProfile, top_score
from cloud_serving.registry import LocalRegistry, Promotion, Registry, RegistryClient
from cloud_serving.release import Op, check, running
from cloud_serving.routing import Split, normalise
from cloud_serving.shadow import ShadowBudget, ShadowMirror, ShadowVerdict
from shared.alerts import AlertEvent, AlertRule, AlertState, CountSample, ValueSample, step
from shared.batching import InferencePool, NonFiniteOutputError, OverloadedError
from shared.fsutil import atomic_write_bytes
from shared.gates import Action, Decision
from shared.kpis import Mitigation
from shared.logs import DEFAULT_KEYS, DEFAULT_PATTERNS, Redactor, pass_request_id
from shared.webhooks import notify, payload

log = logging.getLogger("tidegate.serving")


class ShadowGateError(ReleaseError):
    """A canary asked for a candidate without a passing shadow verdict (409, with the
    verdict's conditions in the answer)."""

    def __init__(self, message: str, verdict: ShadowVerdict | None) -> None:
        super().__init__(message)
        self.verdict = verdict


def _utcnow() -> datetime:
    return datetime.now(UTC)


RECENT_MAX = 100_000  # answers remembered per model for a late label (calibration)


@dataclass
class Answer:
    outputs: dict[str, np.ndarray[Any, Any]]
    version: str
    fallback: bool = False
    latency_ms: float = 0.0
    # Set while an experiment runs (the caller reports its reward) and whenever the model has
    # a scores output (the caller may post the true label: calibration).
    request_id: str | None = None
    arm: str | None = None
    threshold: float | None = None  # the arm's post-processing threshold, when it has its own


@dataclass
class ModelState:
    name: str
    config: ModelConfig
    versions: dict[str, Backend]
    production: str
    weights: dict[str, float]
    salt: str
    fallback: Backend | None = None
    shadow: ShadowMirror | None = None
    canary: Canary | None = None
    history: list[str] = field(default_factory=list)  # previous production versions, newest last
    production_since: datetime | None = None  # when the production version took all traffic
    events: list[str] = field(default_factory=list)
    split: Split | None = None
    deadlines: deque[tuple[float, asyncio.Future[Any]]] = field(default_factory=deque)
    experiment: Experiment | None = None
    threshold: float | None = None  # promoted by an experiment over post-processing arms
    ensemble: dict[str, float] | None = None  # production answers as this weighted average
    assigned: OrderedDict[str, str] = field(default_factory=OrderedDict)  # request id → arm
    # Outcomes per version: counted per request ([good, bad]), turned into one timed sample
    # per version at each tick (the alert rules' input) so a request costs an increment.
    counts: dict[str, list[int]] = field(default_factory=dict)
    outcomes: dict[str, deque[CountSample]] = field(default_factory=dict)
    alert_states: dict[str, AlertState] = field(default_factory=dict)
    forced_fallback: str | None = None  # why every request goes to the fallback (an alert)
    profile: InputProfile | None = None  # the inputs' learned profile, for OOD counts
    rules: list[AlertRule] = field(default_factory=list)  # the config's alerts, built once
    cohorts: dict[str, Cohort] = field(default_factory=lambda: {k: Cohort() for k in COHORT_KINDS})
    # Calibration: answers awaiting their true label (request id → version, class, score), and
    # per version the labelled window. Inputs per version this tick: [seen, out of profile].
    recent: OrderedDict[str, tuple[str, int, float]] = field(default_factory=OrderedDict)
    calibration: dict[str, Calibration] = field(default_factory=dict)
    inputs: dict[str, list[int]] = field(default_factory=dict)
    values: dict[tuple[str, str], deque[ValueSample]] = field(default_factory=dict)
    # Each candidate's last shadow verdict (the canary's entry condition), by version.
    verdicts: dict[str, ShadowVerdict] = field(default_factory=dict)
    # Trajectories awaiting their truth (request id → version, points), and per version the
    # last (ADE, FDE) pairs against the truth.
    recent_paths: OrderedDict[str, tuple[str, np.ndarray[Any, Any]]] = field(default_factory=OrderedDict)
    displacements: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)
    # The flags a running experiment set, and what each was before it (UNSET: absent).
    flag_restore: dict[str, Any] = field(default_factory=dict)

    def running(self) -> tuple[Any, str]:
        """The release operation in progress (`cloud_serving.release`)."""
        shadow = self.shadow.version if self.shadow is not None and self.shadow.active else None
        return running(
            shadow=shadow,
            canary=self.canary.candidate if self.canary is not None else None,
            experiment=f"{self.experiment.spec.control} vs {self.experiment.spec.treatment}"
            if self.experiment is not None
            else None,
        )

    def allow(self, op: Op) -> None:
        check(self.name, op, self.running())

    def task_spec(self) -> TaskSpec:
        t = self.config.task
        return TaskSpec(
            task=Task(t.kind or "classification"),
            scores_output=self.config.scores_output,
            boxes_output=t.boxes_output,
            classes_output=t.classes_output,
            box_format=t.box_format,
            score_threshold=t.score_threshold,
            trajectory_output=t.trajectory_output,
            iou=t.iou,
            class_names=tuple(t.classes),
        )

    def seen_input(self, version: str, unusual: bool) -> None:
        c = self.inputs.get(version)
        if c is None:
            c = self.inputs[version] = [0, 0]
        c[0] += 1
        c[1] += unusual

    def count(self, version: str, ok: bool) -> None:
        c = self.counts.get(version)
        if c is None:
            c = self.counts[version] = [0, 0]
        c[0 if ok else 1] += 1

    def route(self) -> Split:
        """The prepared split for the current weights (production's range first)."""
        if self.split is None:
            self.split = Split.of(self.weights, [self.production])
        return self.split

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in ("weights", "production"):  # any change of routing invalidates the split
            super().__setattr__("split", None)
        if name == "production":  # a promoted ensemble belonged to the old production
            super().__setattr__("ensemble", None)


def _onnx(version: str, path: Path, b: BatchingConfig, pool: InferencePool) -> OnnxBackend:
    return OnnxBackend(
        version,
        path,
        max_batch=b.max_batch,
        max_delay_us=b.max_delay_us,
        max_queue=b.max_queue,
        preferred_sizes=tuple(b.preferred_sizes),
        concurrency=b.concurrency,
        pool=pool,
    )


class Gateway:
    def __init__(
        self, config: ServingConfig, *, clock: Callable[[], datetime] = _utcnow, seed: int | None = None
    ) -> None:
        self.config, self.clock = config, clock
        self.models: dict[str, ModelState] = {}
        self._rng = random.Random(seed)
        self._ticker: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # One inference pool for every loaded version: as many threads as cores, however many
        # versions a release keeps loaded side by side.
        self.pool = InferencePool(os.cpu_count() or 2)
        g = config.gateway
        patterns = (*(DEFAULT_PATTERNS if g.redact_default_patterns else ()), *g.redact_patterns)
        self.redactor = Redactor(g.redact_keys or DEFAULT_KEYS, patterns)
        self.mitigations: list[Mitigation] = []  # releases the gateway stopped itself (KPIs)
        self.incidents = IncidentRecorder(
            g.failure_dir.parent / "incidents",
            self.redactor,
            keep=g.incidents_keep,
            max_age_s=g.incidents_max_age_days * 86400,
        )
        self.gray = (
            GrayLog(
                g.failure_dir.parent / "gray",
                self.redactor,
                max_bytes=int(g.gray_log_max_mb * (1 << 20)),
                max_age_s=g.gray_log_max_age_days * 86400,
            )
            if g.gray_log
            else None
        )
        self.registry: Registry | None = None
        self.flags: FlagCache | None = None
        if (reg := config.gateway.registry) is not None:
            source: FlagSource
            if reg.file is not None:
                self.registry, source = LocalRegistry(reg.file), FileFlags(reg.file)
            else:
                assert reg.url is not None  # the config allows exactly one of the two
                token = os.environ.get(reg.token_env)
                if not token:
                    raise ConfigError(f"the registry at {reg.url} needs a token in ${reg.token_env}")
                self.registry = RegistryClient(reg.url, token, timeout_s=reg.timeout_s)
                source = HttpFlags(reg.url, token, timeout_s=reg.timeout_s)
            self.flags = FlagCache(source, ttl_s=reg.flags_ttl_s)
        self._pending_starts: list[asyncio.Future[None]] = []
        self._providers_http: httpx.Client | None = None
        self._flag_writes: deque[tuple[str, Any, str]] = deque()  # (key, value or UNSET, why)
        self._notifications: set[asyncio.Task[Any]] = set()
        self.on_request: Callable[[str, Answer | None, bool], None] = lambda model, answer, ok: None

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self, *, tick: bool = True) -> Gateway:
        refresh_tracing()
        for name, mc in self.config.models.items():
            versions: dict[str, Backend] = {v: self._backend(v, vc) for v, vc in mc.versions.items()}
            fallback = ConstantFallback(mc.fallback.outputs) if mc.fallback else None
            self.models[name] = ModelState(
                name, mc, versions, mc.production, {mc.production: 1.0}, mc.salt or name, fallback
            )
            self.models[name].rules = [a.rule() for a in mc.alerts]
            self.models[name].production_since = self.clock()
            if mc.ood_z is not None:
                self.models[name].profile = InputProfile(warmup=mc.ood_warmup, z=mc.ood_z)
            for b in versions.values():
                await b.start()
        if self.flags is not None:
            await asyncio.to_thread(self.flags.refresh)  # an outage here is not fatal either
        if tick:
            self._ticker = asyncio.create_task(self._tick_loop())
        self._sweeper = asyncio.create_task(self._sweep_deadlines())
        return self

    def _backend(self, version: str, vc: VersionConfig) -> Backend:
        if vc.triton is not None:
            t = vc.triton
            return TritonBackend(
                version, t.url, t.model, model_version=t.model_version, timeout_s=t.timeout_s
            )
        assert vc.path is not None
        return _onnx(version, vc.path, vc.batching, self.pool)

    async def stop(self) -> None:
        await self.drain_notifications()
        if self._ticker is not None:
            self._ticker.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for st in self.models.values():
            if st.shadow is not None:
                await st.shadow.stop()
            for b in st.versions.values():
                await b.stop()
        self.pool.shutdown()
        await self.flush_flags()
        if self.gray is not None:
            await asyncio.to_thread(self.gray.flush)
        if self.registry is not None:
            await self.flush_registry()
            self.registry.close()
        if self.flags is not None:
            self.flags.close()
        if self._providers_http is not None:
            self._providers_http.close()

    def model(self, name: str) -> ModelState:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModelError(f"no model {name!r}; serving {', '.join(sorted(self.models))}") from None

    # ---- the request path --------------------------------------------------------------------

    async def infer(
        self,
        name: str,
        sample: np.ndarray[Any, Any],
        *,
        key: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Answer:
        st = self.model(name)
        if st.experiment is not None and st.experiment.spec.admits(metadata or {}, self.clock().hour):
            return await self._experiment_infer(st, st.experiment, sample, key)
        if st.forced_fallback is not None and st.fallback is not None:
            t0 = time.perf_counter()
            outputs = await st.fallback.infer(sample)
            return Answer(
                outputs, st.fallback.version, fallback=True, latency_ms=(time.perf_counter() - t0) * 1000
            )
        version = st.route().pick(key=key, salt=st.salt, rng=self._rng)
        canary = st.canary
        if canary is not None and version == canary.candidate and not canary.spec.admits(metadata or {}):
            version = st.production  # a cohort canary: callers outside it stay on production
        t0 = time.perf_counter()
        try:
            if version == st.production and st.ensemble is not None:
                answer = await self._ensemble(st, st.ensemble, sample)
            else:
                answer = await self._run(st, version, sample)
        except OverloadedError as exc:
            raise OverloadError(f"{name} {version}: {exc}") from None
        except Exception as exc:  # BackendError, TimeoutError, the runtime's own errors
            ms = (time.perf_counter() - t0) * 1000
            st.count(version, False)
            if canary is not None and version == canary.candidate:
                failure = exc
                canary.record(
                    self.clock(),
                    ok=False,
                    latency_ms=ms,
                    exchange=lambda: _exchange(key, metadata, sample, None, failure),
                )
                return await self._production_or_fallback(st, sample, t0)  # the caller never sees it
            if canary is not None and version == canary.production:
                canary.record(self.clock(), ok=False, latency_ms=ms, baseline=True)
            return await self._fallback(st, sample, t0, exc)
        st.count(version, True)
        if canary is not None and version == canary.candidate:
            canary.record(
                self.clock(),
                ok=True,
                latency_ms=answer.latency_ms,
                exchange=lambda: _exchange(key, metadata, sample, answer.outputs, None),
            )
            if self.gray is not None:
                self.gray.offer(
                    f"{st.name}-{version}",
                    lambda: {
                        "at": self.clock().isoformat(),
                        "version": version,
                        **_exchange(key, metadata, sample, answer.outputs, None),
                    },
                )
        elif canary is not None and version == canary.production:
            canary.record(self.clock(), ok=True, latency_ms=answer.latency_ms, baseline=True)
        if st.shadow is not None and version == st.production:
            st.shadow.offer(sample, answer.outputs, answer.latency_ms, metadata)
        self._remember(st, answer, always=False)
        return answer

    def _remember(self, st: ModelState, answer: Answer, *, always: bool) -> None:
        """Give the answer a request id and keep what its late label is judged against (bounded:
        the oldest go first): a classifier's top class and score, a trajectory's points."""
        trajectory = st.config.task.kind == "trajectory"
        best = None if trajectory else top_score(answer.outputs, st.config.scores_output)
        if best is None and not always and not trajectory:
            return
        answer.request_id = request_id = uuid.uuid4().hex
        if trajectory:
            name = st.config.task.trajectory_output or next(iter(answer.outputs))
            st.recent_paths[request_id] = (answer.version, answer.outputs[name])
            while len(st.recent_paths) > RECENT_MAX:
                st.recent_paths.popitem(last=False)
        elif best is not None:
            st.recent[request_id] = (answer.version, best[0], best[1])
            while len(st.recent) > RECENT_MAX:
                st.recent.popitem(last=False)

    def ground_truth(self, name: str, request_id: str, label: int | list[list[float]]) -> dict[str, Any]:
        """The truth of an answered request, when it becomes known: a classifier's true class
        (its version's calibration and accuracy) or a trajectory's true points (ADE, FDE)."""
        st = self.model(name)
        if isinstance(label, list):
            return self._path_truth(st, request_id, label)
        seen = st.recent.pop(request_id, None)
        if seen is None:
            raise UnknownModelError(f"no answer {request_id!r} awaits a label (unknown, labelled or too old)")
        version, predicted, confidence = seen
        cal = st.calibration.get(version)
        if cal is None:
            cal = st.calibration[version] = Calibration()
        cal.add(confidence, predicted == label)
        if st.canary is not None:
            st.canary.label(self.clock(), version, confidence, predicted == label)
        return {"version": version, "predicted": predicted, "correct": predicted == label}

    def _path_truth(self, st: ModelState, request_id: str, points: list[list[float]]) -> dict[str, Any]:
        seen = st.recent_paths.get(request_id)
        if seen is None:
            raise UnknownModelError(
                f"no trajectory {request_id!r} awaits its truth (unknown, labelled or too old)"
            )
        version, predicted = seen
        truth = np.asarray(points, dtype=np.float64)
        if truth.shape != predicted.shape:
            raise InvalidReleaseError(
                f"the true trajectory has shape {list(truth.shape)}; the answer had {list(predicted.shape)}"
            )
        st.recent_paths.pop(request_id)
        ade, fde = displacement(predicted, truth)
        st.displacements.setdefault(version, deque(maxlen=5000)).append((ade, fde))
        if st.canary is not None:
            st.canary.path_label(self.clock(), version, ade, fde)
        return {"version": version, "ade": ade, "fde": fde}

    async def _experiment_infer(
        self, st: ModelState, exp: Experiment, sample: np.ndarray[Any, Any], key: str | None
    ) -> Answer:
        spec = exp.spec
        if exp.bandit is not None:
            arm = exp.bandit.choose()
        else:
            arm = exp.split.pick(key=key, salt=f"{st.name}:experiment:{spec.treatment}", rng=self._rng)
        exp.arms[arm].assigned += 1
        t0 = time.perf_counter()
        try:
            if (ensemble := spec.ensemble_of(arm)) is not None:
                answer = await self._ensemble(st, ensemble, sample)
            else:
                answer = await self._run(st, spec.version_of(arm), sample)
        except OverloadedError as exc:
            raise OverloadError(f"{st.name} {arm}: {exc}") from None
        except Exception as exc:
            exp.record_error(arm)
            if arm == spec.treatment:  # the caller is answered by production instead
                answer = await self._production_or_fallback(st, sample, t0)
            else:
                answer = await self._fallback(st, sample, t0, exc)
            return answer  # no reward for an arm that did not answer
        answer.arm, answer.threshold = arm, spec.threshold_of(arm)
        self._remember(st, answer, always=True)
        assert answer.request_id is not None
        st.assigned[answer.request_id] = arm
        while len(st.assigned) > 200_000:
            st.assigned.popitem(last=False)
        return answer

    def label(
        self, name: str, outputs: dict[str, np.ndarray[Any, Any]], threshold: float | None = None
    ) -> int | None:
        """Post-processing: the top class of the scores output, or None below the threshold:
        an experiment arm's own, else a feature flag when one is configured (operators tune
        it live), else the one an experiment last promoted, else the configured one."""
        st = self.model(name)
        scores = outputs.get(st.config.scores_output or next(iter(outputs)))
        if scores is None or scores.size == 0:
            return None
        if threshold is not None:
            top = int(np.argmax(scores))
            return top if float(scores.reshape(-1)[top]) >= threshold else None
        threshold = st.threshold if st.threshold is not None else st.config.threshold
        if st.config.threshold_flag and self.flags is not None:
            value = self.flags.get(st.config.threshold_flag, threshold)
            threshold = float(value) if isinstance(value, int | float) else threshold
        top = int(np.argmax(scores))
        return top if float(scores.reshape(-1)[top]) >= threshold else None

    def feedback(self, name: str, request_id: str, reward: float) -> str:
        """The caller's outcome for one answered request (0-1): counted for its arm."""
        st = self.model(name)
        if st.experiment is None:
            raise ReleaseError(f"{name} has no experiment running")
        arm = st.assigned.pop(request_id, None)
        if arm is None:
            raise UnknownModelError(f"no experiment request {request_id!r} (unknown, or its reward is in)")
        st.experiment.feedback(arm, reward)
        return arm

    def start_experiment(self, name: str, spec: ExperimentSpec) -> Experiment:
        st = self.model(name)
        for arm in (spec.control, spec.treatment):
            for version in spec.ensemble_of(arm) or [spec.version_of(arm)]:
                self._known(st, version)
        if spec.control == spec.treatment:
            raise ReleaseError("an experiment needs two differently named arms")
        arms = [
            (spec.version_of(a), spec.threshold_of(a), spec.ensemble_of(a))
            for a in (spec.control, spec.treatment)
        ]
        if arms[0] == arms[1]:
            raise ReleaseError("the two arms are the same version with the same post-processing")
        st.allow(Op.START_EXPERIMENT)
        if spec.flags and self.flags is None:
            raise InvalidReleaseError(
                f"{name}: the experiment sets flags, but this gateway has no flag store ([gateway.registry])"
            )
        st.experiment = Experiment(spec, self.clock().isoformat())
        if spec.flags and self.flags is not None:
            before = self.flags.known()
            st.flag_restore = {k: before.get(k, UNSET) for k in spec.flags}
            why = f"experiment {spec.control} vs {spec.treatment} on {name}"
            self._flag_writes.extend((k, v, why) for k, v in spec.flags.items())
            self._note(st, f"experiment set flags {', '.join(f'{k}={v!r}' for k, v in spec.flags.items())}")
        st.assigned.clear()
        self._note(st, f"experiment {spec.mode}: {spec.control} vs {spec.treatment}")
        return st.experiment

    def _conclude(self, st: ModelState, decision: str) -> Path:
        exp = st.experiment
        assert exp is not None
        exp.decision = decision
        if decision == "treatment_wins":
            winner = exp.spec.version_of(exp.spec.treatment)
            if winner != st.production:
                st.history.append(st.production)
            st.production, st.weights = winner, {winner: 1.0}
            st.production_since = self.clock()
            if (threshold := exp.spec.threshold_of(exp.spec.treatment)) is not None:
                st.threshold = threshold
            st.ensemble = exp.spec.ensemble_of(exp.spec.treatment)  # after production: it clears it
            self._promoted(st.name, winner, "experiment", exp.summary())
        else:
            st.weights = {st.production: 1.0}  # everyone back on production
        if st.flag_restore:
            if decision == "treatment_wins":
                self._note(st, f"experiment flags kept: {', '.join(st.flag_restore)}")
            else:
                why = f"experiment on {st.name} ended: {decision}"
                self._flag_writes.extend((k, v, why) for k, v in st.flag_restore.items())
                undone = ", ".join(
                    f"{k} (removed)" if v is UNSET else f"{k}={v!r}" for k, v in st.flag_restore.items()
                )
                self._note(st, f"experiment {decision}: reverted the flags it set: {undone}")
            st.flag_restore = {}
        out = self.config.gateway.failure_dir.parent / "experiments" / f"{st.name}-{exp.spec.treatment}"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "ab_summary.json", json.dumps(exp.summary(), indent=2).encode())
        st.experiment = None
        self._note(
            st,
            f"experiment ended: {decision}"
            + (f"; {st.production} promoted" if decision == "treatment_wins" else ""),
        )
        return out / "ab_summary.json"

    async def _run(self, st: ModelState, version: str, sample: np.ndarray[Any, Any]) -> Answer:
        backend = st.versions[version]
        t0 = time.perf_counter()
        with span("gateway.model", version=version):
            fut = backend.submit(sample)
            # Deadlines are enforced by one sweeper per model (constant timeout: FIFO order),
            # not by a timer per request: a request costs one append.
            st.deadlines.append((t0 + st.config.timeout_ms / 1000, fut))
            try:
                outputs = await fut
            except NonFiniteOutputError as exc:  # guardrail: a model that emits NaN has failed
                raise BackendError(f"{st.name} {version}: {exc}") from None
        return Answer(outputs, version, latency_ms=(time.perf_counter() - t0) * 1000)

    async def _ensemble(
        self, st: ModelState, weights: dict[str, float], sample: np.ndarray[Any, Any]
    ) -> Answer:
        """Post-processing by ensemble: every member answers, the outputs are averaged by weight;
        any member's failure fails the ensemble."""
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(self._run(st, v, sample) for v in weights))
        outputs: dict[str, np.ndarray[Any, Any]] = {}
        for name, first in answers[0].outputs.items():
            total = np.zeros(first.shape, dtype=np.float64)
            for w, a in zip(weights.values(), answers, strict=True):
                part = a.outputs.get(name)
                if part is None or part.shape != first.shape:
                    raise BackendError(f"{st.name}: ensemble members disagree on output {name!r}")
                total += w * part
            outputs[name] = total.astype(first.dtype)
        label = "+".join(f"{v}*{w:g}" for v, w in weights.items())
        return Answer(outputs, label, latency_ms=(time.perf_counter() - t0) * 1000)

    async def _production_or_fallback(
        self, st: ModelState, sample: np.ndarray[Any, Any], t0: float
    ) -> Answer:
        try:
            if st.ensemble is not None:
                return await self._ensemble(st, st.ensemble, sample)
            return await self._run(st, st.production, sample)
        except Exception as exc:
            return await self._fallback(st, sample, t0, exc)

    async def _fallback(
        self, st: ModelState, sample: np.ndarray[Any, Any], t0: float, exc: BaseException
    ) -> Answer:
        if st.fallback is None:
            why = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            raise UnavailableError(
                f"{st.name}: the model failed ({why}) and no fallback is configured"
            ) from None
        outputs = await st.fallback.infer(sample)
        return Answer(
            outputs, st.fallback.version, fallback=True, latency_ms=(time.perf_counter() - t0) * 1000
        )

    # ---- release operations ------------------------------------------------------------------

    def _note(self, st: ModelState, text: str) -> None:
        st.events.append(f"{self.clock().isoformat()} {text}")

    def _known(self, st: ModelState, version: str) -> None:
        if version not in st.versions:
            raise ReleaseError(
                f"{st.name} has no loaded version {version!r}; loaded: {', '.join(sorted(st.versions))}"
            )

    async def load_version(
        self, name: str, version: str, path: Path, batching: BatchingConfig | None = None
    ) -> None:
        st = self.model(name)
        st.allow(Op.LOAD)
        if version in st.versions:
            raise ReleaseError(f"{name} {version} is loaded already")
        backend = _onnx(version, path, batching or BatchingConfig(), self.pool)
        await backend.start()
        st.versions[version] = backend
        self._note(st, f"loaded {version} from {path}")

    async def unload_version(self, name: str, version: str) -> None:
        st = self.model(name)
        st.allow(Op.UNLOAD)
        self._known(st, version)
        busy = {st.production, *st.weights, *([st.canary.candidate] if st.canary else [])}
        if st.shadow is not None and st.shadow.active:
            busy.add(st.shadow.version)
        if version in busy:
            raise ReleaseError(f"{name} {version} is serving traffic; route it away first")
        backend = st.versions.pop(version)
        await backend.stop()
        self._note(st, f"unloaded {version}")

    def set_weights(self, name: str, weights: dict[str, float]) -> None:
        """All at once or by weight; the largest share becomes production."""
        st = self.model(name)
        for v in weights:
            self._known(st, v)
        st.allow(Op.SET_WEIGHTS)
        split = normalise(weights)
        st.weights = split
        top = max(split, key=lambda v: split[v])
        if top != st.production:
            st.history.append(st.production)
            st.production = top
            st.production_since = self.clock()
        self._note(st, f"weights {split}")

    async def switch(self, name: str, version: str) -> None:
        """Blue/green: check the other stack answers, then move all traffic at once."""
        st = self.model(name)
        self._known(st, version)
        st.allow(Op.SWITCH)
        probe = np.zeros(
            [d or 1 for d in getattr(st.versions[version], "sample_shape", ())], dtype=np.float32
        )
        try:
            await self._run(st, version, probe)
        except Exception as exc:
            raise ReleaseError(f"{name} {version} failed its pre-switch check: {exc}") from None
        st.allow(Op.SWITCH)  # again: the probe awaited, and another operation may have begun
        if version != st.production:
            st.history.append(st.production)
        st.production, st.weights = version, {version: 1.0}
        st.production_since = self.clock()
        self._note(st, f"switched all traffic to {version}")

    async def rollback(self, name: str, reason: str = "operator rollback") -> str:
        """Back to the previous production version (or, with a canary running, end it)."""
        st = self.model(name)
        st.allow(Op.ROLLBACK)
        if st.canary is not None:
            self._end_canary(st, promoted=False, reason=reason)
            return st.production
        if not st.history:
            raise ReleaseError(f"{name} has no previous version to roll back to")
        previous = st.history.pop()
        st.production, st.weights = previous, {previous: 1.0}
        st.production_since = self.clock()
        self._note(st, f"rolled back to {previous}: {reason}")
        return previous

    def start_shadow(
        self, name: str, version: str, *, share: float, budget: ShadowBudget, queue_max: int = 4096
    ) -> None:
        st = self.model(name)
        self._known(st, version)
        st.allow(Op.START_SHADOW)
        if version == st.production:
            raise ReleaseError(f"{version} is production; shadow a candidate")
        # The mirror runs its own copy of the candidate in a low-priority process: callers'
        # requests keep the CPU and the event loop, and the shadow takes what is left.
        path = getattr(st.versions[version], "model_path", None)
        if path is None:
            raise ReleaseError(f"{name} {version} is not an in-process model; it cannot be shadowed")
        mirror = ShadowMirror(
            version,
            path,
            share=share,
            budget=budget,
            spec=st.task_spec(),
            queue_max=queue_max,
            clock=self.clock,
        )  # checks the budgets (BudgetError, 422) before any process starts
        if st.shadow is not None:  # an earlier shadow that stopped on its budget: end its process
            self._background(st.shadow.stop())
        st.shadow = mirror
        st.verdicts.pop(version, None)  # a new shadow, a new verdict
        st.shadow.start()
        self._note(st, f"shadowing {share:.0%} of traffic to {version}")

    def _background(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    async def stop_shadow(self, name: str) -> dict[str, Any]:
        """End the shadow: its verdict on its last summary becomes final, and is what a canary
        of that version is allowed on."""
        st = self.model(name)
        if st.shadow is None:
            raise ReleaseError(f"{name} has no shadow")
        shadow = st.shadow
        verdict = await shadow.stop()
        st.verdicts[shadow.version] = verdict
        if not shadow.noted:
            self._note(st, f"shadow of {shadow.version} ended: {verdict.verdict}: {verdict.reason}")
        shadow.noted = True
        st.shadow = None
        return {**shadow.stats.kpis(), "verdict": verdict.as_dict()}

    def _shadow_ended(self, st: ModelState) -> None:
        """A shadow that stopped itself (its verdict failed): the verdict is kept as final."""
        shadow = st.shadow
        if shadow is not None and shadow.stopped_reason and not shadow.noted:
            shadow.noted = True
            st.verdicts[shadow.version] = replace(shadow.verdict, final=True)
            self._note(st, f"shadow of {shadow.version} stopped: {shadow.stopped_reason}")

    def _shadow_gate(
        self, st: ModelState, candidate: str, override_reason: str | None
    ) -> ShadowVerdict | None:
        """The canary's entry condition: the candidate's shadow ended with a pass. Without one,
        a `ShadowGateError` (409, with the verdict), unless an `override_reason` is given: then
        it is noted in the events and queued for the model card."""
        self._shadow_ended(st)
        verdict = st.verdicts.get(candidate)
        if verdict is not None and verdict.verdict == "pass":
            return verdict
        why = (
            f"no shadow of {candidate} has ended"
            if verdict is None
            else f"its shadow verdict is {verdict.verdict}: {verdict.reason}"
        )
        if not override_reason:
            raise ShadowGateError(
                f"{st.name}: no canary of {candidate}: {why}; shadow it first, or give an override_reason",
                verdict,
            )
        self._note(st, f"shadow gate overridden for {candidate} ({why}): {override_reason}")
        content = {
            "gate": "shadow",
            "reason": override_reason,
            "verdict": verdict.as_dict() if verdict is not None else None,
        }
        self._promoted(st.name, candidate, "override", content, stage=False)
        return None

    def start_canary(
        self, name: str, candidate: str, spec: CanarySpec, *, override_reason: str | None = None
    ) -> Canary:
        """A canary of `candidate`, allowed only after a shadow of it ended with a passing
        verdict, or with a recorded `override_reason` (the API lets only admins give one)."""
        st = self.model(name)
        self._known(st, candidate)
        st.allow(Op.START_CANARY)
        if candidate == st.production:
            raise ReleaseError(f"{candidate} is production already")
        return self._begin_canary(st, candidate, spec, override_reason)

    def _begin_canary(
        self, st: ModelState, candidate: str, spec: CanarySpec, override_reason: str | None
    ) -> Canary:
        try:
            spec.plan()  # steps, manual steps and bounds, before anything changes
        except ValueError as exc:  # GateDefinitionError
            raise InvalidReleaseError(f"{st.name} canary: {exc}") from None
        verdict = self._shadow_gate(st, candidate, override_reason)
        if st.canary is not None:
            self._end_canary(st, promoted=False, reason=f"rolled through to {candidate}")
        st.canary = Canary.begin(st.name, st.production, candidate, spec, self.clock())
        st.canary.redactor = self.redactor
        st.canary.shadow_agreement = verdict.agreement if verdict is not None else None
        st.salt = f"{st.name}:{candidate}"  # a new release reshuffles who is in the first 1 %
        self._apply_canary_weight(st)
        cohort = f", cohort {dict(spec.cohort)}" if spec.cohort else ""
        self._note(st, f"canary {candidate}: {list(spec.steps)} %, bake {spec.bake_s:g} s{cohort}")
        return st.canary

    def roll_through(
        self, name: str, candidate: str, spec: CanarySpec, *, override_reason: str | None = None
    ) -> Canary:
        """Replace a failing (or superseded) canary with the next candidate: the old one is
        rolled back and the new one starts from the first step, through the same shadow gate
        (checked before the old canary ends, so a refusal changes nothing)."""
        st = self.model(name)
        self._known(st, candidate)
        if st.canary is None:
            raise ReleaseError(f"{name} has no canary to roll through")
        st.allow(Op.ROLL_THROUGH)
        if candidate in (st.canary.candidate, st.production):
            raise ReleaseError(f"roll through to a new candidate, not {candidate}")
        return self._begin_canary(st, candidate, spec, override_reason)

    def judge_canary(self, name: str, *, approve: bool, by: str = "an operator") -> dict[str, Any]:
        """A person's call on a canary that waits (a manual step, or gates that could not
        decide): approval moves it to the next step (or promotes it), rejection rolls it back."""
        st = self.model(name)
        if st.canary is None:
            raise ReleaseError(f"{name} has no canary")
        st.allow(Op.JUDGE_CANARY)
        try:
            decision = st.canary.judge(self.clock(), approve=approve, by=by)
        except ValueError as exc:  # not paused
            raise ReleaseError(f"{name} canary of {st.canary.candidate}: {exc}") from None
        self._apply(st, decision, self.clock(), [])
        return {"action": decision.action.value, "reason": decision.reason}

    def _apply_canary_weight(self, st: ModelState) -> None:
        assert st.canary is not None
        w = st.canary.weight
        st.weights = {st.production: 1 - w, st.canary.candidate: w} if w < 1 else {st.canary.candidate: 1.0}

    def _end_canary(self, st: ModelState, *, promoted: bool, reason: str) -> None:
        assert st.canary is not None
        candidate = st.canary.candidate
        if promoted:
            st.history.append(st.production)
            st.production = candidate
            st.production_since = self.clock()
            verdict = st.verdicts.get(candidate)
            if verdict is not None:
                self._promoted(st.name, candidate, "shadow", verdict.as_dict(), stage=False)
            self._promoted(
                st.name, candidate, "canary", {"steps": list(st.canary.spec.steps), "log": st.canary.log}
            )
        st.weights = {st.production: 1.0}
        st.canary = None
        self._note(st, f"canary {candidate} {'promoted' if promoted else 'rolled back'}: {reason}")

    def _apply(
        self, st: ModelState, decision: Decision, now: datetime, done: list[tuple[str, str, Path | None]]
    ) -> None:
        """Carry out a canary decision (a tick's or a person's)."""
        assert st.canary is not None
        if decision.action is Action.ADVANCE:
            self._apply_canary_weight(st)
            self._note(st, decision.reason)
        elif decision.action is Action.PAUSE:
            self._note(st, f"canary {st.canary.candidate} paused: {decision.reason}")
        elif decision.action is Action.COMPLETE:
            self._end_canary(st, promoted=True, reason=decision.reason)
            done.append((st.name, "promoted", None))
        elif decision.action is Action.ABORT:
            self._mitigated(st, "gates", decision.reason, now)
            bundle = st.canary.write_failure_bundle(self.config.gateway.failure_dir, now, decision)
            self._end_canary(st, promoted=False, reason=decision.reason)
            done.append((st.name, "rolled back", bundle))
        elif "inconclusive" in decision.reason:
            self._note(st, decision.reason)

    def tick(self) -> list[tuple[str, str, Path | None]]:
        """Advance every canary, check every shadow's budget and every alert rule: (model,
        what, failure bundle)."""
        now = self.clock()
        done: list[tuple[str, str, Path | None]] = []
        for st in self.models.values():
            self._alerts(st, now, done)
            self._shadow_ended(st)
            if st.experiment is not None and (verdict := st.experiment.analyse()) is not None:
                done.append((st.name, verdict, self._conclude(st, verdict)))
            if st.canary is not None:
                self._apply(st, st.canary.tick(now), now, done)
        return done

    # ---- alerts ---------------------------------------------------------------------------------

    def _alerts(self, st: ModelState, now: datetime, done: list[tuple[str, str, Path | None]]) -> None:
        for version, (good, bad) in st.counts.items():
            if good or bad:
                st.outcomes.setdefault(version, deque(maxlen=4096)).append(CountSample(now, good, bad))
        st.counts.clear()
        for cfg, rule in zip(st.config.alerts, st.rules, strict=True):
            watched = (
                st.production if cfg.version == "production" else st.canary.candidate if st.canary else None
            )
            samples: list[CountSample] | list[ValueSample]
            if watched is None:
                samples = []
            elif cfg.metric == "errors":
                samples = list(st.outcomes.get(watched, ()))
            else:
                series = st.values.setdefault((cfg.metric, watched), deque(maxlen=4096))
                if (value := self._value(st, cfg.metric, watched, cfg.min_labels)) is not None:
                    series.append(ValueSample(now, value))
                samples = list(series)
            state = st.alert_states.setdefault(cfg.name, AlertState())
            event = step(rule, samples, now, state)
            if event is None:
                continue
            remedy = self._remediate(st, event, watched, done) if event.status == "firing" else "none"
            self._note(
                st,
                f"alert {event.rule} {event.status} ({event.severity}) on {watched}: {event.detail}; "
                f"remediation: {remedy}",
            )
            record = {"model": st.name, "version": watched, "remediation": remedy}
            log.warning(
                "alert %s %s", event.rule, event.status, extra={"alert": payload(event, "gateway", record)}
            )
            if self.config.gateway.webhooks:
                self._notify(payload(event, "gateway", record))

        st.inputs.clear()

    @staticmethod
    def _value(st: ModelState, metric: str, version: str, min_labels: int) -> float | None:
        """This tick's reading of a value metric for one version, or None without a basis."""
        if metric == "ood_ratio":
            seen, unusual = st.inputs.get(version, (0, 0))
            return unusual / seen if seen else None
        cal = st.calibration.get(version)
        if cal is None or len(cal) < min_labels:
            return None
        return cal.ece() if metric == "ece" else cal.accuracy()

    def _remediate(
        self, st: ModelState, event: AlertEvent, version: str | None, done: list[tuple[str, str, Path | None]]
    ) -> str:
        """The alert's action through the gateway's own release operations; what was done."""
        if event.action in ("rollback", "fallback"):
            self._mitigated(st, "alerts", f"alert {event.rule}: {event.detail}", event.at, version)
        if event.action == "rollback":
            if st.canary is not None and version == st.canary.candidate:
                self._end_canary(st, promoted=False, reason=f"alert {event.rule}: {event.detail}")
                done.append((st.name, "rolled back", None))
                return f"canary {version} rolled back"
            if st.history:
                previous = st.history.pop()
                st.production, st.weights = previous, {previous: 1.0}
                st.production_since = self.clock()
                done.append((st.name, "rolled back", None))
                return f"rolled back to {previous}"
            return "rollback impossible: no previous version"
        if event.action == "fallback":
            if st.fallback is None:
                return "fallback impossible: none configured"
            st.forced_fallback = f"alert {event.rule} at {event.at.isoformat()}"
            return "every request to the fallback until an operator clears it"
        if event.action == "scale_hint":
            depth = sum(getattr(b, "queue_depth", 0) for b in st.versions.values())
            return f"scale hint: add capacity for {st.name} (queue depth {depth}); no change made here"
        return "none configured"

    def _mitigated(
        self, st: ModelState, by: str, reason: str, now: datetime, version: str | None = None
    ) -> None:
        """Record a defective release stopped by the gateway itself (the KPIs' input): a
        canary, exposed since it began (escaped past its first step), or the production
        version, exposed since it took all traffic (escaped: it got through its release)."""
        c = st.canary
        if c is not None and version in (None, c.candidate):
            exposed_at, exposed, escaped = c.started_at or now, c.answered, c.state.step > 0
            subject = f"{st.name}:{c.candidate}"
        else:
            exposed_at = st.production_since or now
            exposed = sum(s.good + s.bad for s in st.outcomes.get(st.production, ()))
            escaped, subject = True, f"{st.name}:{st.production}"
        self.mitigations.append(Mitigation(subject, by, reason, exposed_at, now, exposed, escaped))

    def clear_fallback(self, name: str) -> None:
        st = self.model(name)
        if st.forced_fallback is not None:
            self._note(st, f"fallback cleared by an operator (was: {st.forced_fallback})")
        st.forced_fallback = None

    def _notify(self, body: dict[str, Any]) -> None:
        cfg = self.config.gateway
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(notify, cfg.webhooks, body, timeout_s=cfg.webhook_timeout_s)
        )
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    async def drain_notifications(self) -> None:
        """Wait for webhook deliveries in flight (tests, shutdown)."""
        if self._notifications:
            await asyncio.gather(*self._notifications, return_exceptions=True)

    async def _sweep_deadlines(self, every_s: float = 0.01) -> None:
        while True:
            await asyncio.sleep(every_s)
            now = time.perf_counter()
            for st in self.models.values():
                q = st.deadlines
                while q and (q[0][1].done() or q[0][0] <= now):
                    _, fut = q.popleft()
                    if not fut.done():
                        fut.set_exception(TimeoutError(f"no answer within {st.config.timeout_ms:g} ms"))

    def _promoted(
        self, model: str, version: str, section: str, content: dict[str, Any], *, stage: bool = True
    ) -> None:
        """Queue a model-card section for the registry; `stage` also moves the release to
        production (a promotion), otherwise the section is evidence only."""
        if self.registry is not None:
            self.registry.pending.append(Promotion(model, version, section, content, promote=stage))

    def _write_flags(self) -> int:
        """Send queued flag writes to the flag store (blocking); a failure keeps the rest."""
        written = 0
        while self._flag_writes and self.flags is not None:
            key, value, why = self._flag_writes[0]
            try:
                self.flags.write(key, value, why)
            except (httpx.HTTPError, OSError, ValueError) as exc:
                log.warning("flag %s not written yet: %s", key, exc)
                return written
            self._flag_writes.popleft()
            written += 1
        return written

    async def flush_flags(self) -> int:
        if not self._flag_writes:
            return 0
        return await asyncio.to_thread(self._write_flags)

    async def flush_registry(self) -> int:
        """Send queued promotions to the registry off the event loop; retried on failure."""
        if self.registry is None or not self.registry.pending:
            return 0
        return await asyncio.to_thread(self.registry.flush)

    def record_shadow_diffs(self) -> list[Path]:
        """Write the large diffs the shadows sent back as failure captures (blocking: call it
        off the event loop). The recorder's rate limit and retention bound what reaches disk."""
        written = []
        for st in self.models.values():
            shadow = st.shadow
            while shadow is not None and shadow.captures:
                capture = shadow.captures.popleft()
                detail = {
                    "production_version": st.production,
                    "candidate_version": shadow.version,
                    **capture,
                    "kpis": shadow.stats.kpis(),
                }
                if (path := self.incidents.record("shadow_diff", st.name, detail)) is not None:
                    written.append(path)
        return written

    def poll_providers(self) -> None:
        """Read the running canaries' metric providers (Prometheus, HTTP JSON): blocking, with
        each provider's own timeout, so the tick loop calls it in a thread."""
        for st in list(self.models.values()):
            canary = st.canary
            if canary is not None and canary.spec.providers:
                if self._providers_http is None:
                    self._providers_http = httpx.Client(event_hooks={"request": [pass_request_id]})
                canary.poll(self._providers_http, self.clock())

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.gateway.tick_s)
            await asyncio.to_thread(self.poll_providers)
            self.tick()
            await asyncio.to_thread(self.record_shadow_diffs)
            if self.gray is not None and self.gray.pending:
                await asyncio.to_thread(self.gray.flush)
            await self.flush_flags()
            await self.flush_registry()
            if self.flags is not None and self.flags.stale:
                await asyncio.to_thread(self.flags.refresh)

    def status(self, name: str) -> dict[str, Any]:
        st = self.model(name)
        return {
            "model": name,
            "production": st.production,
            "post_processing": {"threshold": st.threshold, "ensemble": st.ensemble},
            "versions": sorted(st.versions),
            "weights": st.weights,
            "history": st.history,
            "fallback": st.fallback is not None,
            "running": st.running()[0].value,
            "shadow": None
            if st.shadow is None
            else {
                "candidate": st.shadow.version,
                "share": st.shadow.share,
                "active": st.shadow.active,
                "stopped_reason": st.shadow.stopped_reason,
                "task": st.shadow.spec.task.value,
                "verdict": st.shadow.verdict.as_dict(),
                "kpis": st.shadow.stats.kpis(),
            },
            "verdicts": {
                v: {"verdict": x.verdict, "reason": x.reason, "at": x.at} for v, x in st.verdicts.items()
            },
            "canary": None
            if st.canary is None
            else {
                "candidate": st.canary.candidate,
                "step": st.canary.state.step,
                "weight": st.canary.weight,
                "status": st.canary.state.status.value,
                "paused_reason": st.canary.state.paused_reason,
                "cohort": dict(st.canary.spec.cohort) or None,
                "last_decision": st.canary.last_reason,
                "providers": _readings(st.canary),
                "log": st.canary.log,
            },
            "experiment": st.experiment.summary() if st.experiment else None,
            "flags": self.flags.status() if self.flags is not None else None,
            "events": st.events[-50:],
            "forced_fallback": st.forced_fallback,
            "alerts": {name: a.status for name, a in st.alert_states.items()},
        }


def _readings(canary: Canary) -> dict[str, dict[str, Any]]:
    """Each provider condition's latest reading, or why there is none."""
    out = {}
    for p in canary.spec.providers:
        read = canary.readings.get(p.name)
        out[p.name] = {"value": read[0].value if read else None, "error": canary.provider_errors.get(p.name)}
    return out


def _exchange(
    key: str | None,
    metadata: dict[str, Any] | None,
    sample: np.ndarray[Any, Any],
    outputs: dict[str, np.ndarray[Any, Any]] | None,
    error: BaseException | None,
) -> dict[str, Any]:
    return {
        "caller_key": key,
        "metadata": metadata or {},
        "input": sample.tolist(),
        "outputs": {k: v.tolist() for k, v in outputs.items()} if outputs else None,
        "error": None if error is None else (str(error) or type(error).__name__)[:300],
    }
