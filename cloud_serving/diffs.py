"""Task-aware diff KPIs: how a candidate's answers differ from production's on the same inputs.

A shadow has no ground truth: production's answer is the reference, so "recall" here is the
share of production's class-c answers the candidate reproduces, and its delta (recall - 1) is
what a budget bounds (``abs(Δ recall pedestrian, slice time=night) <= 1.5 %``). The task
declared in the model's ``inference_config.json`` (or serving.toml) picks the comparison:

- classification: argmax agreement, per-class precision/recall deltas, max |Δ score|;
- detection (boxes with class scores): boxes matched greedily at IoU >= 0.5 with the same
  class; per-class box recall/precision deltas, mean IoU of matches, box-count delta per
  frame, and NMS stability (the share of production's boxes reproduced, per frame, with its
  spread over frames);
- trajectory (points as offsets from the current position): ADE and FDE between candidate
  and production, also relative to production's own displacement.

Every KPI is a `Row` (metric, class, slice, value, samples): the budget verdict, `/metrics`
and the reports read the same rows. Pure numpy; the shadow's process keeps one accumulator
overall and one per request-metadata slice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, Protocol, cast

import numpy as np

Arrays = Mapping[str, np.ndarray[Any, Any]]


class Task(StrEnum):
    CLASSIFICATION = "classification"
    DETECTION = "detection"
    TRAJECTORY = "trajectory"


@dataclass(frozen=True)
class Metric:
    name: str
    better: str  # "higher", "lower", or "zero" (a signed delta: its absolute value is bounded)
    per_class: bool
    doc: str


METRICS: dict[Task, dict[str, Metric]] = {
    Task.CLASSIFICATION: {
        m.name: m
        for m in (
            Metric("agreement", "higher", False, "share of answers whose top class is production's"),
            Metric("diff_rate", "lower", False, "share of answers whose top class is not production's"),
            Metric("recall_delta", "zero", True, "share of production's class-c answers lost, signed"),
            Metric("precision_delta", "zero", True, "candidate's class-c answers not production's"),
            Metric("max_abs_diff", "lower", False, "largest |Δ| of any output value"),
        )
    },
    Task.DETECTION: {
        m.name: m
        for m in (
            Metric("box_recall_delta", "zero", True, "production boxes not matched (IoU >= 0.5, same class)"),
            Metric("box_precision_delta", "zero", True, "candidate boxes not matching production's"),
            Metric("mean_iou", "higher", False, "mean IoU of matched boxes"),
            Metric("box_count_delta", "zero", False, "candidate boxes minus production's, per frame"),
            Metric("nms_stability", "higher", False, "share of production's boxes reproduced, per frame"),
            Metric("nms_stability_spread", "lower", False, "standard deviation of that share over frames"),
        )
    },
    Task.TRAJECTORY: {
        m.name: m
        for m in (
            Metric("ade", "lower", False, "average displacement from production's points"),
            Metric("fde", "lower", False, "final displacement from production's last point"),
            Metric("ade_relative", "lower", False, "ADE over production's mean displacement"),
            Metric("fde_relative", "lower", False, "FDE over production's final displacement"),
        )
    },
}
# Whatever the task: the mirror's own measurements, overall only.
COMMON = {
    m.name: m
    for m in (
        Metric("error_rate", "lower", False, "share of mirrored requests the candidate failed"),
        Metric("p95_ms", "lower", False, "the candidate's p95 latency in the mirror, ms"),
    )
}


def metric(task: Task, name: str) -> Metric | None:
    return METRICS[task].get(name) or COMMON.get(name)


@dataclass(frozen=True)
class Row:
    metric: str
    cls: str | None  # class name (or index as text); None: all classes
    slice: str | None  # "key=value" from request metadata; None: all traffic
    value: float
    samples: int  # the denominator: answers, boxes or frames the value is over

    def as_dict(self) -> dict[str, Any]:
        value = self.value if math.isfinite(self.value) else None
        return {
            "metric": self.metric,
            "class": self.cls,
            "slice": self.slice,
            "value": value,
            "samples": self.samples,
        }


@dataclass(frozen=True)
class TaskSpec:
    """Which outputs hold what, for the task's comparison."""

    task: Task = Task.CLASSIFICATION
    scores_output: str | None = None  # classification: class scores; detection: per-box scores
    boxes_output: str = "boxes"
    classes_output: str | None = None  # detection: per-box class ids (else argmax of the scores)
    box_format: str = "xyxy"  # or "cxcywh"
    score_threshold: float = 0.5  # detection: a box is present when its score reaches it
    trajectory_output: str | None = None
    iou: float = 0.5
    class_names: tuple[str, ...] = ()

    def name_of(self, c: int) -> str:
        return self.class_names[c] if 0 <= c < len(self.class_names) else str(c)


Frames = dict[str, np.ndarray[Any, Any]]  # per-frame figures of one batch, leading axis B


class Accumulator(Protocol):
    """A task's comparison: `frames` judges a batch (every output with a leading batch axis)
    once, `merge` adds the figures of some of its frames (all of them, or one slice's)."""

    spec: TaskSpec

    def frames(self, production: Arrays, candidate: Arrays) -> Frames: ...

    def merge(self, frames: Frames, idx: np.ndarray[Any, Any]) -> None: ...

    def rows(self, slice_: str | None) -> list[Row]: ...


def _first(outputs: Arrays, name: str | None) -> np.ndarray[Any, Any] | None:
    if name is not None:
        return outputs.get(name)
    return next(iter(outputs.values()), None)


def abs_diff(production: Arrays, candidate: Arrays) -> np.ndarray[Any, Any]:
    """Per frame, the largest |Δ| of any output value the two answers share in shape."""
    batch = len(next(iter(production.values())))
    out = np.zeros(batch)
    for name, ref in production.items():
        got = candidate.get(name)
        if got is not None and got.shape == ref.shape and ref.size:
            delta = np.abs(got.astype(np.float64) - ref.astype(np.float64)).reshape(batch, -1)
            out = np.maximum(out, delta.max(axis=1))
    return out


def _grow(matrix: np.ndarray[Any, Any], n: int) -> np.ndarray[Any, Any]:
    """A square or per-class count array grown to `n` classes (counts kept)."""
    if matrix.shape[-1] >= n:
        return matrix
    shape = (n, n) if matrix.ndim == 2 else (n,)
    grown = np.zeros(shape, dtype=matrix.dtype)
    grown[tuple(slice(0, k) for k in matrix.shape)] = matrix
    return grown


@dataclass
class ClassificationDiff:
    spec: TaskSpec
    compared: int = 0
    max_abs_diff: float = 0.0
    confusion: np.ndarray[Any, Any] = field(
        default_factory=lambda: np.zeros((0, 0), np.int64)
    )  # [prod, cand]

    def frames(self, production: Arrays, candidate: Arrays) -> Frames:
        p, c = _first(production, self.spec.scores_output), _first(candidate, self.spec.scores_output)
        batch = len(next(iter(production.values())))
        if p is not None and c is not None and p.shape == c.shape and p[0].size > 1:
            top = (p.reshape(batch, -1).argmax(axis=1), c.reshape(batch, -1).argmax(axis=1))
        else:
            top = (np.full(batch, -1), np.full(batch, -1))
        return {"production": top[0], "candidate": top[1], "max_abs_diff": abs_diff(production, candidate)}

    def merge(self, frames: Frames, idx: np.ndarray[Any, Any]) -> None:
        p, c = frames["production"][idx], frames["candidate"][idx]
        self.compared += len(p)
        if len(p):
            self.max_abs_diff = max(self.max_abs_diff, float(frames["max_abs_diff"][idx].max()))
        known = p >= 0
        if known.any():
            self.confusion = _grow(self.confusion, int(max(p[known].max(), c[known].max())) + 1)
            np.add.at(self.confusion, (p[known], c[known]), 1)

    def rows(self, slice_: str | None) -> list[Row]:
        out = []
        m = self.confusion
        labelled = int(m.sum())
        if labelled:
            agree = int(np.trace(m))
            out.append(Row("agreement", None, slice_, agree / labelled, labelled))
            out.append(Row("diff_rate", None, slice_, 1 - agree / labelled, labelled))
        if slice_ is None and self.compared:
            out.append(Row("max_abs_diff", None, None, self.max_abs_diff, self.compared))
        actual, predicted = m.sum(axis=1), m.sum(axis=0)
        for k in range(len(m)):
            tp, name = int(m[k, k]), self.spec.name_of(k)
            if actual[k]:
                out.append(Row("recall_delta", name, slice_, tp / actual[k] - 1, int(actual[k])))
            if predicted[k]:
                out.append(Row("precision_delta", name, slice_, tp / predicted[k] - 1, int(predicted[k])))
        return out


def _corners(boxes: np.ndarray[Any, Any], fmt: str) -> np.ndarray[Any, Any]:
    """Boxes ``[..., 4]`` as (x1, y1, x2, y2) with x1 <= x2, y1 <= y2."""
    b = boxes.astype(np.float64)
    if fmt == "cxcywh":
        half = np.abs(b[..., 2:]) / 2
        return np.concatenate([b[..., :2] - half, b[..., :2] + half], axis=-1)
    lo, hi = np.minimum(b[..., :2], b[..., 2:]), np.maximum(b[..., :2], b[..., 2:])
    return np.concatenate([lo, hi], axis=-1)


def iou_matrix(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """IoU of every box in `a` ``[..., Ka, 4]`` (xyxy) with every box in `b` ``[..., Kb, 4]``."""
    lo = np.maximum(a[..., :, None, :2], b[..., None, :, :2])
    hi = np.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    area_a = np.prod(a[..., 2:] - a[..., :2], axis=-1)
    area_b = np.prod(b[..., 2:] - b[..., :2], axis=-1)
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def greedy_match(
    iou: np.ndarray[Any, Any], allowed: np.ndarray[Any, Any], threshold: float
) -> np.ndarray[Any, Any]:
    """One-to-one matching per frame, best IoU first, over ``[B, Kp, Kc]``: the IoU each
    production box was matched at (0: unmatched). Vectorised over frames: at most
    min(Kp, Kc) rounds, each taking every frame's best remaining pair."""
    batch, kp, kc = iou.shape
    work = np.where(allowed & (iou >= threshold), iou, -1.0)
    matched = np.zeros((batch, kp))
    frames = np.arange(batch)
    for _ in range(min(kp, kc)):
        flat = work.reshape(batch, -1)
        j = flat.argmax(axis=1)
        best = flat[frames, j]
        hit = np.nonzero(best >= 0)[0]
        if not hit.size:
            break
        pi, ci = j[hit] // kc, j[hit] % kc
        matched[hit, pi] = best[hit]
        work[hit, pi, :] = -1.0
        work[hit, :, ci] = -1.0
    return matched


def match_boxes(
    prod_boxes: np.ndarray[Any, Any],
    prod_cls: np.ndarray[Any, Any],
    cand_boxes: np.ndarray[Any, Any],
    cand_cls: np.ndarray[Any, Any],
    threshold: float = 0.5,
) -> list[tuple[int, int, float]]:
    """One frame's greedy one-to-one matching, best IoU first, same class only, IoU >=
    threshold: (production index, candidate index, IoU)."""
    if not len(prod_boxes) or not len(cand_boxes):
        return []
    iou = iou_matrix(prod_boxes, cand_boxes)
    work = np.where((prod_cls[:, None] == cand_cls[None, :]) & (iou >= threshold), iou, -1.0)
    out = []
    for _ in range(min(work.shape)):
        i, j = np.unravel_index(int(work.argmax()), work.shape)
        if work[i, j] < 0:
            break
        out.append((int(i), int(j), float(iou[i, j])))
        work[i, :] = -1.0
        work[:, j] = -1.0
    return out


def _per_class(classes: np.ndarray[Any, Any], mask: np.ndarray[Any, Any], n: int) -> np.ndarray[Any, Any]:
    """Per frame, how many of its masked boxes are of each class: ``[B, n]``."""
    counts: np.ndarray[Any, Any] = ((classes[..., None] == np.arange(n)) & mask[..., None]).sum(axis=1)
    return counts


@dataclass
class DetectionDiff:
    spec: TaskSpec
    frames_seen: int = 0
    prod: np.ndarray[Any, Any] = field(default_factory=lambda: np.zeros(0, np.int64))  # boxes per class
    cand: np.ndarray[Any, Any] = field(default_factory=lambda: np.zeros(0, np.int64))
    matched: np.ndarray[Any, Any] = field(default_factory=lambda: np.zeros(0, np.int64))
    iou_sum: float = 0.0
    count_delta: int = 0
    stable_frames: int = 0  # frames where production had boxes
    stable_sum: float = 0.0
    stable_sq: float = 0.0

    def boxes(
        self, outputs: Arrays
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """A batch's boxes (xyxy) ``[B, K, 4]``, their classes ``[B, K]`` and which are
        present (top score at the threshold) ``[B, K]``."""
        s = self.spec
        raw = outputs.get(s.boxes_output)
        scores = _first(outputs, s.scores_output)
        if raw is None or scores is None:
            raise KeyError(f"detection outputs {s.boxes_output!r} and scores are needed")
        batch = len(raw)
        boxes = _corners(raw.reshape(batch, -1, 4), s.box_format)
        k = boxes.shape[1]
        if s.classes_output is not None:
            classes = outputs[s.classes_output].reshape(batch, k).astype(np.int64)
            top = scores.reshape(batch, k).astype(np.float64)
        else:
            per_box = scores.reshape(batch, k, -1)
            classes, top = per_box.argmax(axis=2), per_box.max(axis=2)
        return boxes, classes, top >= s.score_threshold

    def frames(self, production: Arrays, candidate: Arrays) -> Frames:
        pb, pc, pp = self.boxes(production)
        cb, cc, cp = self.boxes(candidate)
        allowed = pp[:, :, None] & cp[:, None, :] & (pc[:, :, None] == cc[:, None, :])
        matched_iou = greedy_match(iou_matrix(pb, cb), allowed, self.spec.iou)
        hit = matched_iou > 0
        n = int(max(pc[pp].max(initial=-1), cc[cp].max(initial=-1))) + 1
        n_prod = pp.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(n_prod > 0, hit.sum(axis=1) / n_prod, np.nan)
        return {
            "prod": _per_class(pc, pp, n),
            "cand": _per_class(cc, cp, n),
            "matched": _per_class(pc, hit, n),
            "iou_sum": matched_iou.sum(axis=1),
            "count_delta": cp.sum(axis=1) - n_prod,
            "share": share,
        }

    def merge(self, frames: Frames, idx: np.ndarray[Any, Any]) -> None:
        n = frames["prod"].shape[1]
        for name in ("prod", "cand", "matched"):
            grown = _grow(getattr(self, name), n)
            grown[:n] += frames[name][idx].sum(axis=0)
            setattr(self, name, grown)
        self.frames_seen += len(frames["share"][idx])
        self.iou_sum += float(frames["iou_sum"][idx].sum())
        self.count_delta += int(frames["count_delta"][idx].sum())
        share = frames["share"][idx]
        share = share[np.isfinite(share)]
        self.stable_frames += len(share)
        self.stable_sum += float(share.sum())
        self.stable_sq += float((share * share).sum())

    def rows(self, slice_: str | None) -> list[Row]:
        out = []
        total_p, total_c, total_m = int(self.prod.sum()), int(self.cand.sum()), int(self.matched.sum())
        if total_p:
            out.append(Row("box_recall_delta", None, slice_, total_m / total_p - 1, total_p))
        if total_c:
            out.append(Row("box_precision_delta", None, slice_, total_m / total_c - 1, total_c))
        if total_m:
            out.append(Row("mean_iou", None, slice_, self.iou_sum / total_m, total_m))
        if self.frames_seen:
            out.append(
                Row("box_count_delta", None, slice_, self.count_delta / self.frames_seen, self.frames_seen)
            )
        if self.stable_frames:
            n = self.stable_frames
            mean = self.stable_sum / n
            spread = math.sqrt(max(0.0, self.stable_sq / n - mean * mean))
            out.append(Row("nms_stability", None, slice_, mean, n))
            out.append(Row("nms_stability_spread", None, slice_, spread, n))
        for k in range(len(self.prod)):
            name, m = self.spec.name_of(k), int(self.matched[k])
            if self.prod[k]:
                out.append(Row("box_recall_delta", name, slice_, m / self.prod[k] - 1, int(self.prod[k])))
            if self.cand[k]:
                out.append(Row("box_precision_delta", name, slice_, m / self.cand[k] - 1, int(self.cand[k])))
        return out


def displacement(candidate: np.ndarray[Any, Any], reference: np.ndarray[Any, Any]) -> tuple[float, float]:
    """ADE and FDE of one trajectory against a reference, points as rows of coordinates."""
    c = candidate.reshape(-1, candidate.shape[-1]).astype(np.float64)
    r = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    d = np.linalg.norm(c - r, axis=1)
    return float(d.mean()), float(d[-1])


@dataclass
class TrajectoryDiff:
    spec: TaskSpec
    frames_seen: int = 0
    ade_sum: float = 0.0
    fde_sum: float = 0.0
    scale_mean: float = 0.0  # production's mean |point| summed over frames
    scale_final: float = 0.0  # production's |last point| summed over frames

    def frames(self, production: Arrays, candidate: Arrays) -> Frames:
        p = _first(production, self.spec.trajectory_output)
        c = _first(candidate, self.spec.trajectory_output)
        if p is None or c is None or p.shape != c.shape or p.ndim < 3:
            raise KeyError("trajectory outputs of one shape [points, coordinates] are needed")
        batch = len(p)
        p = p.reshape(batch, -1, p.shape[-1]).astype(np.float64)
        c = c.reshape(batch, -1, c.shape[-1]).astype(np.float64)
        d = np.linalg.norm(c - p, axis=2)
        norms = np.linalg.norm(p, axis=2)
        return {
            "ade": d.mean(axis=1),
            "fde": d[:, -1],
            "scale_mean": norms.mean(axis=1),
            "scale_final": norms[:, -1],
        }

    def merge(self, frames: Frames, idx: np.ndarray[Any, Any]) -> None:
        self.frames_seen += len(frames["ade"][idx])
        self.ade_sum += float(frames["ade"][idx].sum())
        self.fde_sum += float(frames["fde"][idx].sum())
        self.scale_mean += float(frames["scale_mean"][idx].sum())
        self.scale_final += float(frames["scale_final"][idx].sum())

    def rows(self, slice_: str | None) -> list[Row]:
        if not self.frames_seen:
            return []
        n = self.frames_seen
        out = [Row("ade", None, slice_, self.ade_sum / n, n), Row("fde", None, slice_, self.fde_sum / n, n)]
        if self.scale_mean > 0:
            out.append(Row("ade_relative", None, slice_, self.ade_sum / self.scale_mean, n))
        if self.scale_final > 0:
            out.append(Row("fde_relative", None, slice_, self.fde_sum / self.scale_final, n))
        return out


# The accumulators are sums (and one maximum), so two of them combine exactly: what lets the
# gateway replicas' shadows be judged on every replica's comparisons (`SlicedDiff.absorb`).
MAXED = frozenset({"max_abs_diff"})


def state_of(acc: Accumulator) -> dict[str, Any]:
    """An accumulator's figures as JSON (a confusion matrix as its non-zero cells)."""
    out: dict[str, Any] = {}
    for f in fields(cast(Any, acc)):
        if f.name == "spec":
            continue
        v = getattr(acc, f.name)
        if isinstance(v, np.ndarray) and v.ndim == 2:
            cells = np.argwhere(v)
            out[f.name] = {"n": int(v.shape[0]), "cells": [[int(i), int(j), int(v[i, j])] for i, j in cells]}
        elif isinstance(v, np.ndarray):
            out[f.name] = v.tolist()
        else:
            out[f.name] = v
    return out


def absorb(acc: Accumulator, state: Mapping[str, Any]) -> None:
    """Add another accumulator's figures (`state_of`) to `acc`: the result is what one
    accumulator would hold had it merged both's frames."""
    for f in fields(cast(Any, acc)):
        if f.name == "spec" or f.name not in state:
            continue
        mine, theirs = getattr(acc, f.name), state[f.name]
        if isinstance(mine, np.ndarray) and mine.ndim == 2:
            grown = _grow(mine.copy(), int(theirs["n"]))
            for i, j, count in theirs["cells"]:
                grown[i, j] += count
            setattr(acc, f.name, grown)
        elif isinstance(mine, np.ndarray):
            arr = np.asarray(theirs, dtype=mine.dtype)
            grown = _grow(mine.copy(), len(arr))
            grown[: len(arr)] += arr
            setattr(acc, f.name, grown)
        elif f.name in MAXED:
            setattr(acc, f.name, max(mine, type(mine)(theirs)))
        else:
            setattr(acc, f.name, mine + type(mine)(theirs))
    # per-class counts of one accumulator are read side by side: one length for all of them
    per_class = [f.name for f in fields(cast(Any, acc)) if isinstance(getattr(acc, f.name), np.ndarray)]
    vectors = [n for n in per_class if getattr(acc, n).ndim == 1]
    if vectors:
        n = max(len(getattr(acc, name)) for name in vectors)
        for name in vectors:
            setattr(acc, name, _grow(getattr(acc, name), n))


def _size(state: Mapping[str, Any]) -> int:
    return int(state.get("compared", state.get("frames_seen", 0)))


def accumulator(spec: TaskSpec) -> Accumulator:
    if spec.task is Task.DETECTION:
        return DetectionDiff(spec)
    if spec.task is Task.TRAJECTORY:
        return TrajectoryDiff(spec)
    return ClassificationDiff(spec)


MAX_SLICES = 64  # distinct key=value slices a shadow keeps; the rest count only overall
MAX_SLICE_VALUE = 64


def slices_of(metadata: Mapping[str, Any] | None) -> list[str]:
    """The slices one request belongs to: each scalar metadata field as ``key=value``."""
    if not metadata:
        return []
    out = []
    for k, raw in metadata.items():
        v = str(raw).lower() if isinstance(raw, bool) else raw
        if isinstance(v, str | int) and len(str(v)) <= MAX_SLICE_VALUE and len(k) <= MAX_SLICE_VALUE:
            out.append(f"{k}={v}")
    return out


@dataclass
class SlicedDiff:
    """One accumulator over all traffic and one per slice (bounded); a batch is judged once
    and its frames' figures summed into every group they belong to."""

    spec: TaskSpec
    overall: Accumulator = field(init=False)
    slices: dict[str, Accumulator] = field(default_factory=dict)
    slices_dropped: int = 0

    def __post_init__(self) -> None:
        self.overall = accumulator(self.spec)

    def add_batch(self, production: Arrays, candidate: Arrays, slices: list[list[str]]) -> Frames:
        """Compare a batch (outputs with a leading batch axis); returns its per-frame figures."""
        frames = self.overall.frames(production, candidate)
        self.overall.merge(frames, np.arange(len(slices)))
        members: dict[str, list[int]] = {}
        for i, names in enumerate(slices):
            for name in names:
                members.setdefault(name, []).append(i)
        for name, idx in members.items():
            acc = self.slices.get(name)
            if acc is None:
                if len(self.slices) >= MAX_SLICES:
                    self.slices_dropped += len(idx)
                    continue
                acc = self.slices[name] = accumulator(self.spec)
            acc.merge(frames, np.asarray(idx))
        return frames

    def add(self, production: Arrays, candidate: Arrays, slices: list[str]) -> Frames:
        """One frame (outputs without the batch axis)."""
        one = {k: v[None] for k, v in production.items()}
        return self.add_batch(one, {k: v[None] for k, v in candidate.items()}, [slices])

    def state(self) -> dict[str, Any]:
        return {
            "overall": state_of(self.overall),
            "slices": {name: state_of(acc) for name, acc in sorted(self.slices.items())},
            "slices_dropped": self.slices_dropped,
        }

    def absorb(self, state: Mapping[str, Any]) -> None:
        """Add another `SlicedDiff`'s figures (`state`), slice by slice, within the same bound
        on slices."""
        absorb(self.overall, state["overall"])
        self.slices_dropped += int(state.get("slices_dropped", 0))
        for name, part in state["slices"].items():
            acc = self.slices.get(name)
            if acc is None:
                if len(self.slices) >= MAX_SLICES:
                    self.slices_dropped += _size(part)
                    continue
                acc = self.slices[name] = accumulator(self.spec)
            absorb(acc, part)

    def rows(self) -> list[Row]:
        out = self.overall.rows(None)
        for name in sorted(self.slices):
            out += self.slices[name].rows(name)
        return out
