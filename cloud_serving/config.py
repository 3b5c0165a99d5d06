"""`serving.toml`: the gateway's models, versions, batching, fallbacks and keys.

Keys are stored as SHA-256 hashes only (`tidegate serve key` makes one); the file can be
committed without secrets. Paths are relative to the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.alerts import AlertRule, Severity
from shared.errors import TidegateError
from shared.settings_file import first_error, read_toml


class ConfigError(TidegateError):
    """An unreadable or inconsistent serving configuration."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchingConfig(_Strict):
    max_batch: int = Field(default=32, ge=1, le=4096)
    max_delay_us: int = Field(default=2000, ge=0, le=1_000_000)
    preferred_sizes: list[int] = Field(default_factory=list)
    max_queue: int = Field(default=1024, ge=1)
    concurrency: int = Field(default=2, ge=1, le=64)


class TritonConfig(_Strict):
    url: str = Field(min_length=1, description="Triton's HTTP endpoint, e.g. http://triton:8000")
    model: str = Field(min_length=1)
    model_version: str = ""
    timeout_s: float = Field(default=10.0, gt=0, le=600)


class VersionConfig(_Strict):
    """An in-process ONNX model (`path`) or a model on a Triton server (`triton`)."""

    path: Path | None = None
    triton: TritonConfig | None = None
    batching: BatchingConfig = BatchingConfig()

    @model_validator(mode="after")
    def _one_kind(self) -> VersionConfig:
        if (self.path is None) == (self.triton is None):
            raise ValueError("a version has exactly one of path or triton")
        return self


class FallbackConfig(_Strict):
    kind: Literal["constant"] = "constant"
    outputs: dict[str, list[Any]]


class AlertConfig(_Strict):
    """An alert rule on one model (`shared.alerts`): over the outcomes of its production
    version or of its running canary's candidate, with a remediation when it fires.

    `burn_rate` reads the request outcomes (metric `errors`); `above` / `below` read one value
    per tick: `ece` and `accuracy` over the version's last labelled answers (ground truth
    posted to `/v1/models/{m}/labels`, at least `min_labels` of them), `ood_ratio` as the
    share of the tick's inputs outside the learned input profile."""

    name: str = Field(min_length=1, max_length=100)
    kind: Literal["burn_rate", "above", "below"] = "burn_rate"
    metric: Literal["errors", "ece", "accuracy", "ood_ratio"] = "errors"
    version: Literal["production", "canary"] = "production"
    slo: float = Field(default=0.99, gt=0, lt=1)
    threshold: float = Field(default=14.4, gt=0, description="burn rate that fires, or the value")
    window_s: float = Field(default=300, gt=0)
    short_window_s: float = Field(default=60, gt=0)
    for_s: float = Field(default=0, ge=0)
    min_samples: int = Field(default=20, ge=1, description="requests (burn rate) or ticks (values)")
    min_labels: int = Field(default=100, ge=1, description="labelled answers before ece/accuracy count")
    severity: Literal["info", "warning", "critical"] = "critical"
    action: Literal["rollback", "fallback", "scale_hint"] | None = None

    @model_validator(mode="after")
    def _metric_fits_kind(self) -> AlertConfig:
        if (self.kind == "burn_rate") != (self.metric == "errors"):
            raise ValueError(f"alert {self.name}: burn_rate reads metric 'errors'; above/below read a value")
        return self

    def rule(self) -> AlertRule:
        return AlertRule(
            name=self.name,
            kind=self.kind,
            severity=Severity(self.severity),
            threshold=self.threshold,
            window_s=self.window_s,
            short_window_s=self.short_window_s,
            slo=self.slo,
            for_s=self.for_s,
            min_samples=self.min_samples,
            action=self.action,
        )


class TaskConfig(_Strict):
    """What the model answers, so a shadow compares it the right way (`cloud_serving.diffs`).

    Default: the `task` (and `classes`) of the production version's `inference_config.json`
    when one lies beside its model file (an extracted bundle), else classification."""

    kind: Literal["classification", "detection", "trajectory"] | None = None
    classes: list[str] = Field(default_factory=list, description="class names, by index")
    boxes_output: str = "boxes"
    classes_output: str | None = None  # per-box class ids; default: argmax of the scores output
    box_format: Literal["xyxy", "cxcywh"] = "xyxy"
    score_threshold: float = Field(default=0.5, ge=0, le=1)
    trajectory_output: str | None = None
    iou: float = Field(default=0.5, gt=0, le=1)


class ModelConfig(_Strict):
    production: str
    task: TaskConfig = TaskConfig()
    versions: dict[str, VersionConfig] = Field(min_length=1)
    fallback: FallbackConfig | None = None
    scores_output: str | None = None
    timeout_ms: float = Field(default=1000, gt=0)
    salt: str | None = None  # sticky-assignment salt; default: the model name
    threshold: float = Field(default=0.0, ge=0, le=1)  # below it the answer's label is null
    threshold_flag: str | None = None  # a feature flag that overrides `threshold` live
    alerts: list[AlertConfig] = Field(default_factory=list)
    ood_z: float | None = Field(default=6.0, gt=0, description="OOD beyond this many sd; None: off")
    ood_warmup: int = Field(default=1000, ge=10, description="requests that set the input profile")

    @model_validator(mode="after")
    def _production_exists(self) -> ModelConfig:
        if self.production not in self.versions:
            raise ValueError(f"production version {self.production!r} is not among the versions")
        return self


class RegistryConfig(_Strict):
    """Where promotions are recorded and feature flags come from: the fleet server (`url`,
    token from the environment) or, for a standalone gateway, a local JSON file (`file`)."""

    url: str | None = None
    file: Path | None = None
    token_env: str = "TIDEGATE_REGISTRY_TOKEN"
    timeout_s: float = Field(default=5.0, gt=0, le=60)
    flags_ttl_s: float = Field(default=10.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _one_kind(self) -> RegistryConfig:
        if (self.url is None) == (self.file is None):
            raise ValueError("a registry has exactly one of url (the fleet server) or file (standalone)")
        return self


class ReplicationConfig(_Strict):
    """Several gateways as replicas of one (`cloud_serving.replication`): the release state
    (production, weights, a canary at its step) in PostgreSQL, one replica deciding per model,
    every replica routing from the same state and sending its canary samples there."""

    url: str = Field(min_length=1, description="SQLAlchemy URL of a PostgreSQL database")
    replica_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="unique per replica (default: host name and process id)",
    )
    lease_s: float = Field(default=5.0, gt=0, le=300, description="a dead decider's models move on after")
    timeout_s: float = Field(default=5.0, gt=0, le=60, description="connecting to the store")

    @model_validator(mode="after")
    def _postgres(self) -> ReplicationConfig:
        if not self.url.startswith("postgresql"):
            raise ValueError(
                "replication needs PostgreSQL (a SQLite file cannot be shared by gateway processes on "
                f"several hosts): {self.url.split('://')[0]}://"
            )
        return self


class TracingConfig(_Strict):
    """OTLP/HTTP export with tail-biased sampling (`cloud_serving.tracing`; the `otel` extra)."""

    otlp_endpoint: str = Field(min_length=1, description="e.g. http://collector:4318/v1/traces")
    sample_rate: float = Field(default=0.05, ge=0, le=1, description="share of ordinary traces kept")
    slow_ms: float = Field(default=250, gt=0, description="traces at least this slow are all kept")
    service_name: str = "tidegate-gateway"


class GatewayConfig(_Strict):
    api_keys_sha256: list[str] = Field(default_factory=list)
    admin_keys_sha256: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    failure_dir: Path = Path("failures")
    tick_s: float = Field(default=1.0, gt=0)
    registry: RegistryConfig | None = None
    tracing: TracingConfig | None = None
    replication: ReplicationConfig | None = None
    shadow_worker: str | None = Field(
        default=None,
        pattern=r"^[^\s:]+:\d{1,5}$",
        description="host:port of a `tidegate serve shadow-worker` (key: $TIDEGATE_SHADOW_AUTHKEY)",
    )

    webhooks: list[str] = Field(default_factory=list, description="alert notifications (JSON POST)")
    redact_keys: str | None = Field(default=None, description="regex of personal keys (default: shared.logs)")
    redact_patterns: list[str] = Field(
        default_factory=list, description="regexes of personal text, added to shared.logs' defaults"
    )
    redact_default_patterns: bool = True  # e-mail, VIN, phone, IPv4
    webhook_timeout_s: float = Field(default=5.0, gt=0, le=60)
    gray_log: bool = Field(default=True, description="keep every canary request/response pair (redacted)")
    gray_log_max_mb: float = Field(default=16, gt=0, description="per canary file; one rotated file kept")
    gray_log_max_age_days: float = Field(default=7, gt=0)
    incidents_keep: int = Field(default=200, ge=1, description="captures kept per kind")
    incidents_max_age_days: float = Field(default=14, gt=0)

    @model_validator(mode="after")
    def _regexes_compile(self) -> GatewayConfig:
        for p in [self.redact_keys or "", *self.redact_patterns]:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"redaction pattern {p!r} does not compile: {exc}") from exc
        return self


class ServingConfig(_Strict):
    gateway: GatewayConfig = GatewayConfig()
    models: dict[str, ModelConfig] = Field(min_length=1)


def load_config(path: Path) -> ServingConfig:
    raw = read_toml(path, ConfigError, "serving configuration")
    try:
        cfg = ServingConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {first_error(exc)}") from exc
    base = path.parent
    for name, model in cfg.models.items():
        for v in model.versions.values():
            if v.path is not None and not v.path.is_absolute():
                v.path = base / v.path
        _declared_task(name, model)
    reg = cfg.gateway.registry
    if reg is not None and reg.file is not None and not reg.file.is_absolute():
        reg.file = base / reg.file
    if not cfg.gateway.failure_dir.is_absolute():
        cfg.gateway.failure_dir = base / cfg.gateway.failure_dir
    return cfg


def _declared_task(name: str, model: ModelConfig) -> None:
    """Take the task and class names from the production model's `inference_config.json`
    (the builder writes them) unless serving.toml says; a contradiction is an error."""
    path = model.versions[model.production].path
    declared = path.parent / "inference_config.json" if path is not None else None
    if declared is None or not declared.is_file():
        return
    try:
        info = json.loads(declared.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{declared}: not readable JSON ({exc})") from exc
    task = info.get("task") if isinstance(info, dict) else None
    if task is None:
        return
    if model.task.kind is not None and model.task.kind != task:
        raise ConfigError(f"models.{name}: task {model.task.kind!r} but {declared} declares {task!r}")
    try:
        model.task = TaskConfig.model_validate({**model.task.model_dump(), "kind": task})
    except ValidationError as exc:
        raise ConfigError(f"{declared}: {first_error(exc)}") from exc
    classes = info.get("classes")
    if not model.task.classes and isinstance(classes, list) and all(isinstance(c, str) for c in classes):
        model.task.classes = classes
