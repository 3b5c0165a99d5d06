"""One model's state in the gateway: its loaded versions, production, routing, the release
in progress (shadow, canary or experiment), and what its monitoring keeps (outcomes, late
labels, alert states, cohorts). `Answer` is what one request gets back."""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from cloud_serving.backends import Backend
from cloud_serving.canary import Canary
from cloud_serving.config import ModelConfig
from cloud_serving.diffs import Task, TaskSpec
from cloud_serving.experiments import Experiment
from cloud_serving.quality import COHORT_KINDS, Calibration, Cohort, InputProfile
from cloud_serving.release import Op, check, running
from cloud_serving.routing import Split
from cloud_serving.shadow import ShadowMirror, ShadowVerdict
from shared.alerts import AlertRule, AlertState, CountSample, ValueSample

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
    rewarded: OrderedDict[str, None] = field(default_factory=OrderedDict)  # replicated: rewards taken here
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
    # Replicated: labels taken here and not sent yet (request id, version, score, correct, at),
    # the request ids labelled here, and the key answers' seals are made with (shared).
    labels: list[tuple[str, str, float, bool, float]] = field(default_factory=list)
    # Replicated: trajectory truths taken here and not sent yet (request id, version, ADE, FDE, at).
    paths: list[tuple[str, str, float, float, float]] = field(default_factory=list)
    labelled: OrderedDict[str, None] = field(default_factory=OrderedDict)
    seal_key: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)  # a secret: never logged
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
