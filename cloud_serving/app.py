"""The gateway's HTTP side: ingress → auth → size cap → schema → route → model → response.

`POST /v1/models/{model}/infer` with ``{"inputs": [...one sample...], "key": "...",
"metadata": {...}}``; the answer names the version that served it. Operators drive
releases under `/v1/admin/` with an admin key. Errors: 401 no or wrong key, 413 too
large, 422 schema or shape, 404 unknown model, 409 a release operation the state does not
allow, 429 overloaded, 503 the model failed and no fallback is configured.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import httpx
import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloud_serving import observability
from cloud_serving.canary import CanarySpec
from cloud_serving.errors import GatewayError
from cloud_serving.experiments import ExperimentSpec
from cloud_serving.gateway import Gateway, ShadowGateError
from cloud_serving.providers import ProviderCondition
from cloud_serving.providers import check as check_providers
from cloud_serving.quality import top_score
from cloud_serving.shadow import Budget, ShadowBudget
from shared.gates import Comparator
from shared.kpis import summarise
from shared.logs import REQUEST_ID_HEADER, correlated, request_id
from shared.settings_file import first_error
from shared.sysmetrics import register_system_metrics


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[Any] | float = Field(description="One sample, without the batch axis.")
    key: str | None = Field(default=None, max_length=256, description="Caller key for sticky assignment.")
    metadata: dict[str, Any] = Field(default_factory=dict)


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=64)
    reward: float = Field(ge=0, le=1)


class LabelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=64)
    label: (
        Annotated[int, Field(ge=0)] | Annotated[list[list[float]], Field(min_length=1, max_length=1000)]
    ) = Field(description="the true class of the answered request, or a trajectory's true points")


class ExperimentBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    control: str = Field(min_length=1, max_length=64)
    treatment: str = Field(min_length=1, max_length=64)
    treatment_share: float = Field(default=0.5, gt=0, lt=1)
    baseline_rate: float = Field(default=0.1, gt=0, lt=1)
    mde: float = Field(default=0.02, gt=0, lt=1)
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    power: float = Field(default=0.8, gt=0.5, lt=1)
    mode: Literal["ab", "bandit"] = "ab"
    burn_in: int = Field(default=200, ge=0, le=1_000_000)
    max_error_rate: float = Field(default=0.02, ge=0, le=1)
    cohort: dict[str, list[str]] | None = Field(default=None, description="metadata values that take part")
    control_version: str | None = Field(default=None, max_length=64, description="default: the arm's name")
    treatment_version: str | None = Field(default=None, max_length=64, description="default: the arm's name")
    control_threshold: float | None = Field(default=None, ge=0, le=1)
    treatment_threshold: float | None = Field(default=None, ge=0, le=1)
    control_ensemble: dict[str, Annotated[float, Field(gt=0)]] | None = Field(
        default=None, description="the arm averages these versions' outputs, by weight"
    )
    treatment_ensemble: dict[str, Annotated[float, Field(gt=0)]] | None = None
    hours_utc: tuple[int, int] | None = Field(default=None, description="[start, end) hours, UTC")
    flags: dict[str, Any] | None = Field(
        default=None, description="flags set while it runs; reverted unless the treatment wins"
    )


class WeightsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[str, float] = Field(min_length=1)


class VersionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=1, max_length=64)


class BudgetBody(BaseModel):
    """``{"metric": "recall_delta", "class": "pedestrian", "slice": "time=night", "bound":
    0.015}``: abs(Δ recall pedestrian, slice time=night) <= 1.5 %."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    metric: str = Field(min_length=1, max_length=64)
    cls: str | None = Field(default=None, alias="class", min_length=1, max_length=64)
    slice: str | None = Field(default=None, min_length=3, max_length=130, description="key=value")
    bound: float
    min_samples: int = Field(default=100, ge=1, le=10_000_000)


class ShadowBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=1, max_length=64)
    share: float = Field(default=1.0, gt=0, le=1)
    max_diff_rate: float | None = Field(default=0.05, ge=0, le=1, description="classifiers only")
    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    max_p95_ms: float | None = Field(default=None, gt=0, le=600_000)
    min_samples: int = Field(default=100, ge=1, le=10_000_000)
    capture_abs_diff: float | None = Field(default=None, gt=0)
    budgets: list[BudgetBody] = Field(default_factory=list, max_length=200)


class CanaryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidate: str = Field(min_length=1, max_length=64)
    steps: list[float] = Field(default=[1, 5, 25, 50, 100], min_length=1, max_length=20)
    bake_s: float = Field(default=300, ge=0, le=30 * 86400)
    min_requests: int = Field(default=50, ge=1, le=10_000_000)
    min_success_rate: float = Field(default=0.99, ge=0, le=1)
    slo_p95_ms: float = Field(default=100, gt=0, le=600_000)
    slo_p99_ms: float = Field(default=250, gt=0, le=600_000)
    window_s: float = Field(default=300, gt=0, le=7 * 86400)
    # Against production over the same window; null switches a comparison off.
    max_error_increase: float | None = Field(default=0.005, ge=0, le=1)
    max_latency_increase: float | None = Field(default=0.10, ge=0, le=100, description="relative, at p95")
    # With late labels (the gate waits for min_labels a side), e.g. 0.02 and 0.03.
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1)
    max_ece_increase: float | None = Field(default=None, ge=0, le=1)
    max_fde_increase: float | None = Field(default=None, ge=0, le=100, description="relative, trajectories")
    min_labels: int = Field(default=200, ge=1, le=10_000_000)
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="family-wise false-abort rate")
    inconclusive_limit: int = Field(default=3, ge=1, le=100)
    manual_steps: list[int] = Field(default_factory=list, description="1-based steps that wait for approval")
    min_shadow_agreement: float | None = Field(default=None, ge=0, le=1)
    cohort: dict[str, list[str]] | None = Field(
        default=None, description='metadata values on the candidate; "header:NAME" keys match request headers'
    )
    override_reason: str | None = Field(
        default=None, min_length=3, max_length=500, description="start without a passing shadow verdict"
    )
    providers: list[ProviderBody] = Field(default_factory=list, max_length=20)


class ProviderBody(BaseModel):
    """A gate condition read from outside the gateway: a PromQL instant query against a
    Prometheus, or a JSON field of an HTTP endpoint."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    provider: Literal["prometheus", "http"]
    url: str = Field(
        min_length=1, max_length=2048, pattern=r"^https?://", description="Prometheus, or the endpoint"
    )
    query: str = Field(default="", max_length=4096, description="PromQL (prometheus)")
    field: str = Field(default="", max_length=256, description="dotted JSON path (http)")
    comparator: Literal[">=", ">", "<=", "<"]
    threshold: float
    timeout_s: float = Field(default=5.0, gt=0, le=60)


class JudgeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    by: str = Field(default="an operator", min_length=1, max_length=100)


log = logging.getLogger("tidegate.serving")


def _canary_spec(body: CanaryBody) -> CanarySpec:
    fields = body.model_dump(exclude={"candidate", "override_reason", "providers"})
    fields["providers"] = tuple(
        ProviderCondition(
            p.name, p.provider, Comparator(p.comparator), p.threshold, p.url, p.query, p.field, p.timeout_s
        )
        for p in body.providers
    )
    fields["steps"] = tuple(body.steps)
    fields["manual_steps"] = tuple(body.manual_steps)
    fields["cohort"] = tuple((k, tuple(v)) for k, v in (body.cohort or {}).items())
    spec = CanarySpec(**fields)
    try:
        spec.plan()
    except ValueError as exc:  # the gate engine's GateDefinitionError: steps, thresholds
        raise HTTPException(422, str(exc)) from exc
    return spec


def _cohort_headers(st: Any, request: Request) -> dict[str, str] | None:
    """The headers a running cohort canary selects on (none read otherwise)."""
    canary = st.canary
    if canary is None or not any(k.startswith("header:") for k, _ in canary.spec.cohort):
        return None
    return {k.lower(): v for k, v in request.headers.items()}


def _check_providers(providers: tuple[ProviderCondition, ...]) -> None:
    if providers:
        with httpx.Client() as client:
            check_providers(providers, client)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _check(request: Request, allowed: frozenset[str]) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token or _hash(token) not in allowed:
        raise HTTPException(401, "missing or invalid key", headers={"WWW-Authenticate": "Bearer"})


def _caller(request: Request) -> None:
    _check(request, request.app.state.caller_keys)


def _admin(request: Request) -> None:
    _check(request, request.app.state.admin_keys)


Caller = Annotated[None, Depends(_caller)]
Admin = Annotated[None, Depends(_admin)]


def create_app(gateway: Gateway, *, start: bool = True, observe: bool = True) -> FastAPI:
    """The HTTP face of `gateway`. `observe=False` leaves the request metrics out (the
    observability bench's baseline); tracing follows the process's OpenTelemetry setup."""
    cfg = gateway.config.gateway
    registry = CollectorRegistry()
    register_system_metrics(registry)
    requests = Counter(
        "tidegate_serving_requests",
        "Requests by model, version, experiment arm ('-' outside experiments) and outcome",
        ["model", "version", "arm", "outcome"],
        registry=registry,
    )
    latency = Histogram(
        "tidegate_serving_latency_seconds",
        "Latency through the gateway by model, version and experiment arm",
        ["model", "version", "arm"],
        registry=registry,
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    )
    top = Histogram(
        "tidegate_serving_top_score",
        "The answer's top-class score, by model, version and class",
        ["model", "version", "class"],
        registry=registry,
        buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
    )
    abstained = Counter(
        "tidegate_serving_abstentions",
        "Answers whose label is null (top score below the threshold)",
        ["model", "version", "arm"],
        registry=registry,
    )
    ood = Counter(
        "tidegate_serving_ood",
        "Inputs out of the model's learned input profile",
        ["model", "version"],
        registry=registry,
    )
    queue = Gauge(
        "tidegate_serving_queue_depth", "Batcher queue depth", ["model", "version"], registry=registry
    )
    batch = Gauge(
        "tidegate_serving_mean_batch", "Mean batch size since start", ["model", "version"], registry=registry
    )
    ece = Gauge(
        "tidegate_serving_ece",
        "Expected calibration error over the version's last labelled answers",
        ["model", "version"],
        registry=registry,
    )
    accuracy = Gauge(
        "tidegate_serving_accuracy",
        "Accuracy over the version's last labelled answers",
        ["model", "version"],
        registry=registry,
    )
    labelled = Gauge(
        "tidegate_serving_labelled",
        "Answers whose true label was posted",
        ["model", "version"],
        registry=registry,
    )

    path_error = Gauge(
        "tidegate_serving_displacement",
        "Mean ADE and FDE (metric) of a trajectory version's last answers against their late truths",
        ["model", "version", "metric"],
        registry=registry,
    )
    shadow_kpi = Gauge(
        "tidegate_shadow_kpi",
        "A shadow's diff KPI against production (metric: agreement, recall_delta, box_recall_delta, "
        "mean_iou, nms_stability, ade, fde, ...) per model, candidate version, class and slice ('-': all)",
        ["model", "version", "metric", "class", "slice"],
        registry=registry,
    )
    shadow_samples = Gauge(
        "tidegate_shadow_samples",
        "Answers, boxes or frames behind each shadow KPI",
        ["model", "version", "metric", "class", "slice"],
        registry=registry,
    )
    shadow_compared = Gauge(
        "tidegate_shadow_compared", "Requests the shadow compared", ["model", "version"], registry=registry
    )
    shadow_verdict = Gauge(
        "tidegate_shadow_verdict",
        "The shadow's verdict now: 1 for the verdict it has (pass, fail, pending), 0 for the others",
        ["model", "version", "verdict"],
        registry=registry,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        if start:
            await gateway.start()
        yield
        if start:
            await gateway.stop()

    app = FastAPI(title="Tidegate inference gateway", lifespan=lifespan)
    app.state.caller_keys = frozenset(cfg.api_keys_sha256 + cfg.admin_keys_sha256)
    app.state.admin_keys = frozenset(cfg.admin_keys_sha256)

    @app.middleware("http")
    async def authenticate_first(request: Request, call_next: Any) -> Response:
        """Keys are checked before anything reads the body, so a caller without one learns
        nothing, not even how its request would have been parsed."""
        with correlated(request.headers.get(REQUEST_ID_HEADER)) as rid:
            path = request.url.path
            if path.startswith("/v1/"):
                allowed = app.state.admin_keys if path.startswith("/v1/admin/") else app.state.caller_keys
                header = request.headers.get("authorization", "")
                scheme, _, token = header.partition(" ")
                if scheme.lower() != "bearer" or not token or _hash(token) not in allowed:
                    return JSONResponse(
                        {"detail": "missing or invalid key"},
                        status_code=401,
                        headers={"WWW-Authenticate": "Bearer", REQUEST_ID_HEADER: rid},
                    )
            response: Response = await call_next(request)
            response.headers[REQUEST_ID_HEADER] = rid
            return response

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        content: dict[str, Any] = {"detail": str(exc)}
        if isinstance(exc, ShadowGateError):
            content["verdict"] = exc.verdict.as_dict() if exc.verdict is not None else None
        return JSONResponse(status_code=exc.http_status, content=content)

    @app.post(
        "/v1/models/{model}/infer",
        openapi_extra={
            "requestBody": {
                "content": {"application/json": {"schema": InferRequest.model_json_schema()}},
                "required": True,
            }
        },
    )
    async def infer(model: str, request: Request, _: Caller) -> dict[str, Any]:
        with observability.span("gateway.request", model=model) as span:
            with observability.span("gateway.preprocess"):
                body = await _read_capped(request, cfg.max_body_bytes)
                try:
                    req = InferRequest.model_validate_json(body)
                except ValidationError as exc:
                    raise HTTPException(422, first_error(exc, root="body")) from exc
                st = gateway.model(model)
                sample = _sample(req.inputs, getattr(st.versions[st.production], "sample_shape", None))
                unusual = st.profile.out_of_distribution(sample) if st.profile is not None else False
            t0 = time.perf_counter()
            try:
                answer = await gateway.infer(
                    model, sample, key=req.key, metadata=req.metadata, headers=_cohort_headers(st, request)
                )
            except GatewayError as exc:
                if observe:
                    requests.labels(model, "-", "-", type(exc).__name__).inc()
                span.set_attribute("tidegate.error", type(exc).__name__)
                observability.failed(span, str(exc))
                if exc.http_status >= 500:
                    detail = {
                        "request_id": request_id.get(),
                        "error": f"{type(exc).__name__}: {exc}",
                        "request": {"inputs": req.inputs, "key": req.key, "metadata": req.metadata},
                        "release": gateway.status(model),
                    }
                    await asyncio.to_thread(gateway.incidents.record, "5xx", model, detail)
                log.warning(
                    "request failed", extra={"model": model, "error": str(exc), "metadata": req.metadata}
                )
                raise
            span.set_attribute("tidegate.version", answer.version)
            span.set_attribute("tidegate.fallback", answer.fallback)
            if answer.fallback:
                log.warning("fallback answered", extra={"model": model, "metadata": req.metadata})
            with observability.span("gateway.postprocess"):
                reply: dict[str, Any] = {
                    "model": model,
                    "version": answer.version,
                    "fallback": answer.fallback,
                    "outputs": {k: v.tolist() for k, v in answer.outputs.items()},
                }
                if answer.request_id is not None:
                    reply["request_id"] = answer.request_id
                if answer.arm is not None:
                    reply["arm"] = answer.arm
                if st.config.scores_output is not None or answer.threshold is not None:
                    reply["label"] = gateway.label(model, answer.outputs, answer.threshold)
        if observe:
            arm = answer.arm or "-"
            requests.labels(model, answer.version, arm, "fallback" if answer.fallback else "ok").inc()
            latency.labels(model, answer.version, arm).observe(time.perf_counter() - t0)
            if (best := top_score(answer.outputs, st.config.scores_output)) is not None:
                top.labels(model, answer.version, str(best[0])).observe(best[1])
            if "label" in reply and reply["label"] is None:
                abstained.labels(model, answer.version, arm).inc()
            if unusual:
                ood.labels(model, answer.version).inc()
        if st.profile is not None:
            st.seen_input(answer.version, unusual)
        kinds = [
            k
            for k, hit in (
                ("novelty", unusual),
                ("failure", answer.fallback),
                ("uncertain", reply.get("label", 0) is None),
            )
            if hit
        ]
        for kind in kinds:
            st.cohorts[kind].offer(lambda: _cohort_item(req, answer, reply, unusual, gateway.redactor))
        return reply

    @app.post("/v1/models/{model}/labels")
    async def labels(model: str, body: LabelBody, _: Caller) -> dict[str, Any]:
        """The true class of an answered request (by its `request_id`), when it becomes known:
        the version's calibration (ECE) and accuracy are computed from these."""
        return gateway.ground_truth(model, body.request_id, body.label)

    @app.post("/v1/models/{model}/feedback")
    async def feedback(model: str, body: FeedbackBody, _: Caller) -> dict[str, str]:
        """The outcome (0-1) of an answered request, while an experiment runs."""
        return {"arm": gateway.feedback(model, body.request_id, body.reward)}

    @app.post("/v1/admin/models/{model}/experiment")
    async def experiment(model: str, body: ExperimentBody, _: Admin) -> dict[str, Any]:
        if body.baseline_rate + body.mde >= 1:
            raise HTTPException(422, "baseline_rate + mde must stay below 1")
        if body.hours_utc is not None and not all(0 <= h <= 24 for h in body.hours_utc):
            raise HTTPException(422, "hours_utc: hours between 0 and 24")
        fields = body.model_dump()
        fields["cohort"] = {k: tuple(v) for k, v in body.cohort.items()} if body.cohort else None
        async with gateway.replicated():
            gateway.start_experiment(model, ExperimentSpec(**fields))
        return gateway.status(model)

    @app.get("/v1/admin/models/{model}")
    async def status(model: str, _: Admin) -> dict[str, Any]:
        return gateway.status(model)

    @app.post("/v1/admin/models/{model}/weights")
    async def weights(model: str, body: WeightsBody, _: Admin) -> dict[str, Any]:
        async with gateway.replicated():
            gateway.set_weights(model, body.weights)
        return gateway.status(model)

    @app.post("/v1/admin/models/{model}/switch")
    async def switch(model: str, body: VersionBody, _: Admin) -> dict[str, Any]:
        async with gateway.replicated():
            await gateway.switch(model, body.version)
        return gateway.status(model)

    @app.get("/v1/admin/models/{model}/cohorts/{kind}")
    async def cohort(model: str, kind: str, _: Admin) -> dict[str, Any]:
        """A curated set for the next training loop: a uniform sample of the model's
        out-of-distribution inputs (novelty), fallback answers (failure) or abstentions
        (uncertain), with outputs, descriptors and the query that selects the same kind."""
        st = gateway.model(model)
        if kind not in st.cohorts:
            raise HTTPException(404, f"no cohort {kind!r}; cohorts: {', '.join(st.cohorts)}")
        c = st.cohorts[kind]
        return {
            "model": model,
            "kind": kind,
            "seen": c.seen,
            "kept": len(c.items),
            "query": {
                "metric": {
                    "novelty": "tidegate_serving_ood_total",
                    "failure": 'tidegate_serving_requests_total{outcome="fallback"}',
                    "uncertain": "tidegate_serving_abstentions_total",
                }[kind],
                "selector": {"model": model, "kind": kind},
            },
            "items": c.items,
        }

    @app.get("/v1/admin/kpis")
    async def kpis(_: Admin) -> dict[str, Any]:
        """Time to mitigation and defect escape rate over the releases this gateway stopped by
        itself (gates, alerts), as the fleet server reports them for campaigns."""
        return summarise(gateway.mitigations)

    @app.post("/v1/admin/models/{model}/fallback/clear")
    async def clear_fallback(model: str, _: Admin) -> dict[str, Any]:
        """End a fallback an alert switched on: the model answers again."""
        async with gateway.replicated():
            gateway.clear_fallback(model)
        return gateway.status(model)

    @app.post("/v1/admin/models/{model}/rollback")
    async def rollback(model: str, _: Admin) -> dict[str, Any]:
        async with gateway.replicated():
            await gateway.rollback(model)
        return gateway.status(model)

    @app.post("/v1/admin/models/{model}/shadow")
    async def shadow(model: str, body: ShadowBody, _: Admin) -> dict[str, Any]:
        budgets = tuple(Budget(b.metric, b.bound, b.cls, b.slice, b.min_samples) for b in body.budgets)
        budget = ShadowBudget(
            body.max_diff_rate,
            body.max_error_rate,
            body.max_p95_ms,
            body.min_samples,
            body.capture_abs_diff,
            budgets,
        )
        async with gateway.replicated():
            gateway.start_shadow(model, body.version, share=body.share, budget=budget)
        return gateway.status(model)

    @app.delete("/v1/admin/models/{model}/shadow")
    async def stop_shadow(model: str, _: Admin) -> dict[str, Any]:
        async with gateway.replicated():
            return await gateway.stop_shadow(model)

    @app.post("/v1/admin/models/{model}/canary")
    async def canary(model: str, body: CanaryBody, _: Admin) -> dict[str, Any]:
        """409 with the shadow's verdict unless the candidate's shadow ended with a pass (or
        the body gives an `override_reason`, recorded in the events and the model card); 422
        for a provider query Prometheus refuses as written."""
        spec = _canary_spec(body)
        await asyncio.to_thread(_check_providers, spec.providers)
        async with gateway.replicated():
            gateway.start_canary(model, body.candidate, spec, override_reason=body.override_reason)
        return gateway.status(model)

    @app.post("/v1/admin/models/{model}/canary/approve")
    async def approve(model: str, _: Admin, body: JudgeBody | None = None) -> dict[str, Any]:
        """Move a waiting canary (a manual step, or gates that could not decide) on."""
        async with gateway.replicated():
            return gateway.judge_canary(model, approve=True, by=(body or JudgeBody()).by)

    @app.post("/v1/admin/models/{model}/canary/reject")
    async def reject(model: str, _: Admin, body: JudgeBody | None = None) -> dict[str, Any]:
        async with gateway.replicated():
            return gateway.judge_canary(model, approve=False, by=(body or JudgeBody()).by)

    @app.post("/v1/admin/models/{model}/roll-through")
    async def roll_through(model: str, body: CanaryBody, _: Admin) -> dict[str, Any]:
        spec = _canary_spec(body)
        async with gateway.replicated():
            gateway.roll_through(model, body.candidate, spec, override_reason=body.override_reason)
        return gateway.status(model)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "models": ",".join(sorted(gateway.models))}

    @app.get("/readyz", response_model=None)
    def readyz() -> dict[str, Any] | JSONResponse:
        """Ready only when every version this replica's routing can send a request to is
        loaded (production, weighted versions, a canary's candidate): a load balancer must not
        send traffic to a replica that would answer from the fallback."""
        missing = [
            f"{name} {version}"
            for name, st in gateway.models.items()
            for version in {st.production, *st.weights, *([st.canary.candidate] if st.canary else [])}
            if version not in st.versions
        ]
        if missing:
            return JSONResponse({"ready": False, "missing": sorted(missing)}, status_code=503)
        if why := gateway.replication_unready():
            return JSONResponse({"ready": False, "replication": why}, status_code=503)
        return {"ready": True, "models": sorted(gateway.models)}

    @app.get("/metrics", response_class=Response)
    def metrics() -> Response:
        for name, st in gateway.models.items():
            for version, backend in st.versions.items():
                b = getattr(backend, "batcher", None)
                if b is not None:
                    queue.labels(name, version).set(b.queue_depth)
                    batch.labels(name, version).set(b.stats.count / b.stats.batches if b.stats.batches else 0)
            for version, cal in list(st.calibration.items()):
                labelled.labels(name, version).set(cal.labelled)
                if (e := cal.ece()) is not None:
                    ece.labels(name, version).set(e)
                    accuracy.labels(name, version).set(cal.accuracy() or 0.0)
        for name, st in gateway.models.items():
            for version, pairs in list(st.displacements.items()):
                if pairs:
                    path_error.labels(name, version, "ade").set(sum(a for a, _ in pairs) / len(pairs))
                    path_error.labels(name, version, "fde").set(sum(f for _, f in pairs) / len(pairs))
            if st.shadow is not None:
                v = st.shadow.version
                shadow_compared.labels(name, v).set(st.shadow.stats.compared)
                for row in st.shadow.stats.summary.get("rows", ()):
                    if row["value"] is None:
                        continue
                    labels = (name, v, row["metric"], row["class"] or "-", row["slice"] or "-")
                    shadow_kpi.labels(*labels).set(row["value"])
                    shadow_samples.labels(*labels).set(row["samples"])
                for word in ("pass", "fail", "pending"):
                    shadow_verdict.labels(name, v, word).set(1 if st.shadow.verdict.verdict == word else 0)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _read_capped(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise HTTPException(413, f"request body of {declared} bytes is over the {cap}-byte cap")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise HTTPException(413, f"request body is over the {cap}-byte cap")
        chunks.append(chunk)
    return b"".join(chunks)


def _sample(inputs: Any, shape: tuple[int | None, ...] | None) -> np.ndarray[Any, Any]:
    try:
        arr = np.asarray(inputs, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise HTTPException(422, "inputs: a (nested) list of numbers of one shape") from exc
    if not np.all(np.isfinite(arr)):
        raise HTTPException(422, "inputs: NaN or infinite values")
    if shape is not None and (
        arr.ndim != len(shape)
        or any(want is not None and got != want for got, want in zip(arr.shape, shape, strict=True))
    ):
        want = ["?" if d is None else d for d in shape]
        raise HTTPException(
            422, f"inputs: shape {list(arr.shape)}, the model takes one sample of shape {want}"
        )
    return arr


def keygen() -> tuple[str, str]:
    """A new API key and the SHA-256 line for serving.toml."""
    import secrets

    key = "tgk_" + secrets.token_urlsafe(32)
    return key, _hash(key)


__all__ = ["create_app", "keygen"]


def _cohort_item(
    req: Any, answer: Any, reply: dict[str, Any], unusual: bool, redactor: Any
) -> dict[str, Any]:
    best = top_score(answer.outputs, None)
    return {
        "at": datetime.now(UTC).isoformat(),
        "request_id": request_id.get(),
        "version": answer.version,
        "inputs": req.inputs,
        "metadata": redactor(req.metadata or {}),
        "outputs": reply["outputs"],
        "descriptors": {
            "label": reply.get("label"),
            "top_class": best[0] if best else None,
            "top_score": best[1] if best else None,
            "out_of_distribution": unusual,
            "fallback": answer.fallback,
        },
    }
