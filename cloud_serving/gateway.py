"""The gateway's core, without HTTP: models, their versions, and the release in progress.

Per model: the loaded versions (backends), the production version, a routing split by
weight with a per-release salt, and at most one of each: a shadow, a canary, a fallback.
`infer` routes one request and never lets a candidate's failure reach the caller (the
request is answered by production instead, and the failure counts against the candidate);
a production failure goes to the fallback when there is one. `tick` advances canaries on
the shared gate engine and rolls back or promotes them.

The parts: `model_state` (one model's state), `release_ops` (release operations and the
tick's decisions), `monitoring` (alerts, KPIs, captures, providers, status); this module
builds the gateway and holds the request path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np

from cloud_serving.backends import Backend, BackendError, ConstantFallback, TritonBackend
from cloud_serving.config import ConfigError, ServingConfig, VersionConfig
from cloud_serving.core import onnx_backend
from cloud_serving.diffs import displacement
from cloud_serving.errors import (
    GatewayError,
    InvalidReleaseError,
    OverloadError,
    ReleaseError,
    UnavailableError,
    UnknownModelError,
)
from cloud_serving.experiments import Experiment
from cloud_serving.flags import FileFlags, FlagCache, FlagSource, HttpFlags
from cloud_serving.graylog import GrayLog
from cloud_serving.incidents import IncidentRecorder
from cloud_serving.model_state import RECENT_MAX, Answer, ModelState
from cloud_serving.monitoring import Monitoring
from cloud_serving.observability import refresh_tracing, span
from cloud_serving.quality import Calibration, InputProfile, top_score
from cloud_serving.registry import LocalRegistry, Registry, RegistryClient
from cloud_serving.release_ops import ReleaseOperations, ShadowGateError
from cloud_serving.replication import (
    SEALED_POINTS_MAX,
    Replication,
    inner_id,
    seal,
    seal_answer,
    seal_path,
    unseal,
    unseal_answer,
    unseal_path,
)
from cloud_serving.shadow_worker import ShadowWorkerError, WorkerAddress, authkey, parse_address
from shared.batching import InferencePool, NonFiniteOutputError, OverloadedError
from shared.kpis import Mitigation
from shared.logs import DEFAULT_KEYS, DEFAULT_PATTERNS, RateLimitedLog, Redactor

log = logging.getLogger("tidegate.serving")

__all__ = [
    "Answer",
    "Gateway",
    "GatewayError",
    "ModelState",
    "ReleaseError",
    "ShadowGateError",
    "UnknownModelError",
]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Gateway(ReleaseOperations, Monitoring, Replication):
    def __init__(
        self, config: ServingConfig, *, clock: Callable[[], datetime] = _utcnow, seed: int | None = None
    ) -> None:
        self.config, self.clock = config, clock
        self.models: dict[str, ModelState] = {}
        # Failures the request path answers around (the caller never sees them), logged at most
        # once a minute per model and version so a dead backend cannot flood the log.
        self.handled = RateLimitedLog(log)
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
        self._init_replication()
        self.shadow_worker = None
        if (address := config.gateway.shadow_worker) is not None:
            try:
                self.shadow_worker = WorkerAddress(*parse_address(address), authkey())
            except ShadowWorkerError as exc:
                raise ConfigError(f"[gateway] shadow_worker: {exc}") from exc

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
        if self.replicas is not None:  # adopt the stored release state before serving
            await self._open_replication()
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
        return onnx_backend(version, vc.path, vc.batching, self.pool)

    async def stop(self) -> None:
        await self.drain_notifications()
        if self._ticker is not None:
            self._ticker.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self._close_replication()
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

    async def infer(
        self,
        name: str,
        sample: np.ndarray[Any, Any],
        *,
        key: str | None = None,
        metadata: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """`headers`: the caller's request headers a cohort canary may select on (``header:NAME``
        keys in its cohort), apart from the metadata so they never become shadow slices."""
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
        if (
            canary is not None
            and version == canary.candidate
            and not canary.spec.admits(metadata or {}, headers)
        ):
            version = st.production  # a cohort canary: callers outside it stay on production
        t0 = time.perf_counter()
        try:
            if version == st.production and st.ensemble is not None:
                answer = await self._ensemble(st, st.ensemble, sample)
            else:
                answer = await self._run(st, version, sample)
        except OverloadedError as exc:
            raise OverloadError(f"{name} {version}: {exc}") from exc
        except Exception as exc:  # BackendError, TimeoutError, the runtime's own errors
            self.handled.exception(f"{name}/{version}", f"{name} {version} failed a request", exc)
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
                    lambda: {"version": version, **_exchange(key, metadata, sample, answer.outputs, None)},
                )
        elif canary is not None and version == canary.production:
            canary.record(self.clock(), ok=True, latency_ms=answer.latency_ms, baseline=True)
        if st.shadow is not None and version == st.production:
            st.shadow.offer(sample, answer.outputs, answer.latency_ms, metadata)
        self._remember(st, answer, always=False)
        return answer

    def _remember(self, st: ModelState, answer: Answer, *, always: bool, arm: str | None = None) -> None:
        """Give the answer a request id and keep what its late label is judged against (bounded:
        the oldest go first): a classifier's top class and score, a trajectory's points. An
        experiment's answer on a replicated gateway carries its arm, sealed (any replica can
        count its reward)."""
        trajectory = st.config.task.kind == "trajectory"
        best = None if trajectory else top_score(answer.outputs, st.config.scores_output)
        if best is None and not always and not trajectory:
            return
        answer.request_id = request_id = uuid.uuid4().hex
        if arm is not None and st.experiment is not None and self.replicas is not None:
            answer.request_id = request_id = seal(request_id, st.experiment, arm)
        if trajectory:
            name = st.config.task.trajectory_output or next(iter(answer.outputs))
            points = answer.outputs[name]
            if (
                self.replicas is not None and points.size <= SEALED_POINTS_MAX
            ):  # its truth may reach another replica
                answer.request_id = request_id = seal_path(request_id, st.seal_key, answer.version, points)
            st.recent_paths[request_id] = (answer.version, points)
            while len(st.recent_paths) > RECENT_MAX:
                st.recent_paths.popitem(last=False)
        elif best is not None:
            if self.replicas is not None:  # its label may reach another replica
                answer.request_id = request_id = seal_answer(request_id, st.seal_key, answer.version, *best)
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
        replicated = self.replicas is not None
        if seen is None and replicated and request_id not in st.labelled:
            seen = unseal_answer(request_id, st.seal_key)  # answered by another replica
        if seen is None:
            raise UnknownModelError(f"no answer {request_id!r} awaits a label (unknown, labelled or too old)")
        version, predicted, confidence = seen
        correct = predicted == label
        cal = st.calibration.get(version)  # this gateway's own view (its /metrics)
        if cal is None:
            cal = st.calibration[version] = Calibration()
        cal.add(confidence, correct)
        if replicated:  # the leader counts it, once, for the alerts and the canary
            st.labelled[request_id] = None
            while len(st.labelled) > RECENT_MAX:
                st.labelled.popitem(last=False)
            st.labels.append((request_id, version, confidence, correct, self.clock().timestamp()))
        elif st.canary is not None:
            st.canary.label(self.clock(), version, confidence, correct)
        return {"version": version, "predicted": predicted, "correct": correct}

    def _path_truth(self, st: ModelState, request_id: str, points: list[list[float]]) -> dict[str, Any]:
        seen = st.recent_paths.get(request_id)
        replicated = self.replicas is not None
        if seen is None and replicated and request_id not in st.labelled:
            seen = unseal_path(request_id, st.seal_key)  # answered by another replica
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
        st.recent_paths.pop(request_id, None)
        ade, fde = displacement(predicted, truth)
        st.displacements.setdefault(version, deque(maxlen=5000)).append((ade, fde))  # this gateway's view
        if replicated:  # the leader counts it, once, for the canary
            st.labelled[request_id] = None
            while len(st.labelled) > RECENT_MAX:
                st.labelled.popitem(last=False)
            st.paths.append((request_id, version, ade, fde, self.clock().timestamp()))
        elif st.canary is not None:
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
            raise OverloadError(f"{st.name} {arm}: {exc}") from exc
        except Exception as exc:
            self.handled.exception(f"{st.name}/{arm}", f"{st.name} arm {arm} failed a request", exc)
            exp.record_error(arm)
            if arm == spec.treatment:  # the caller is answered by production instead
                answer = await self._production_or_fallback(st, sample, t0)
            else:
                answer = await self._fallback(st, sample, t0, exc)
            return answer  # no reward for an arm that did not answer
        answer.arm, answer.threshold = arm, spec.threshold_of(arm)
        self._remember(st, answer, always=True, arm=arm)
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
        if arm is None and self.replicas is not None and request_id not in st.rewarded:
            arm = unseal(inner_id(request_id), st.experiment)  # answered by another replica
        if arm is None:
            raise UnknownModelError(f"no experiment request {request_id!r} (unknown, or its reward is in)")
        if self.replicas is not None:
            st.rewarded[request_id] = None
            while len(st.rewarded) > 200_000:
                st.rewarded.popitem(last=False)
        st.experiment.feedback(arm, reward)
        return arm

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
                raise BackendError(f"{st.name} {version}: {exc}") from exc
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
            self.handled.exception(f"{st.name}/production", f"{st.name} production failed a request", exc)
            return await self._fallback(st, sample, t0, exc)

    async def _fallback(
        self, st: ModelState, sample: np.ndarray[Any, Any], t0: float, exc: BaseException
    ) -> Answer:
        if st.fallback is None:
            why = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            raise UnavailableError(
                f"{st.name}: the model failed ({why}) and no fallback is configured"
            ) from exc
        outputs = await st.fallback.infer(sample)
        return Answer(
            outputs, st.fallback.version, fallback=True, latency_ms=(time.perf_counter() - t0) * 1000
        )

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

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.gateway.tick_s)
            await asyncio.to_thread(self.poll_providers)
            if self.replicas is None:
                self.tick()
            else:
                await self._replicated_tick()
            await asyncio.to_thread(self.record_shadow_diffs)
            if self.gray is not None and self.gray.pending:
                await asyncio.to_thread(self.gray.flush)
            await self.flush_flags()
            await self.flush_registry()
            if self.flags is not None and self.flags.stale:
                await asyncio.to_thread(self.flags.refresh)


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
