"""Telemetry the agent publishes and the fleet server stores: health beacons and
install receipts. One schema, used by both ends."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

BEACON_TOPIC = "tidegate/things/{thing}/beacon"
RECEIPT_TOPIC = "tidegate/things/{thing}/receipt"
LOG_TOPIC = "tidegate/things/{thing}/log"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


SCORE_BINS = 10


def score_bin(score: float) -> int:
    """The bin of a top-class score in [0, 1] (equal widths; 1.0 in the last bin)."""
    return min(max(int(score * SCORE_BINS), 0), SCORE_BINS - 1)


class InferenceStats(_Model):
    count: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    errors: int = 0
    ood: int = 0
    # Top-class scores of the active model's answers, `SCORE_BINS` equal-width bins over
    # [0, 1], since that model was loaded: what the server compares across versions for
    # drift (empty: the model's first output is not a probability vector).
    score_histogram: list[int] = Field(default_factory=list, max_length=SCORE_BINS)
    # A light quality proxy per condition, named by the model's owner (e.g.
    # "detections_per_frame@time=night": 2.4): what a campaign's relative wave gates compare.
    quality: dict[str, float] = Field(default_factory=dict, max_length=32)

    @field_validator("quality")
    @classmethod
    def _keys(cls, quality: dict[str, float]) -> dict[str, float]:
        for k, v in quality.items():
            if not 1 <= len(k) <= 64 or not math.isfinite(v):
                raise ValueError(f"quality proxy {k[:70]!r}: a name of 1-64 characters and a finite value")
        return quality


class HealthBeacon(_Model):
    kind: Literal["beacon"] = "beacon"
    schema_version: int = 1
    seq: int = Field(ge=0)
    device_id: str
    sku: str
    at: datetime
    agent_version: str
    active_version: str | None = None
    active_slot: str | None = None
    install_state: str = "idle"
    temperatures_c: dict[str, float] = Field(default_factory=dict)
    throttle_level: int = 0
    inference: InferenceStats = InferenceStats()
    free_disk_mb: float | None = None
    dropped_telemetry: int = 0
    restarts: int = Field(default=0, ge=0)  # agent starts since the active version was committed


class InstallReceipt(_Model):
    kind: Literal["receipt"] = "receipt"
    schema_version: int = 1
    seq: int = Field(ge=0)
    device_id: str
    at: datetime
    job_id: str | None = None
    target: str | None = None
    version: str | None = None
    outcome: Literal["committed", "failed", "rolled_back", "rejected"]
    reason: str
    figures: dict[str, object] = Field(default_factory=dict)
    # A failed install's own log lines (redacted, at most 50 lines and 8 KiB): why, on the device.
    log_tail: list[str] = Field(default_factory=list, max_length=200)


class DeviceLog(_Model):
    """The agent's recent log, uploaded for a `tidegate.log-pull` job (redacted, bounded)."""

    kind: Literal["log"] = "log"
    schema_version: int = 1
    seq: int = Field(ge=0)
    device_id: str
    at: datetime
    job_id: str | None = None
    lines: list[str] = Field(default_factory=list, max_length=5000)
