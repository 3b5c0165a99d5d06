"""A light quality proxy per condition, computed on the device from its own answers and sent
in each beacon (`InferenceStats.quality`): what a campaign's relative wave gate compares
between the devices it updated and the rest of the cohort, when no labels exist on the road.

Per time of day on the device's local clock (day 06-18, night): a classifier's mean top
score, a detector's detections per frame (boxes whose top score reaches 0.5). Pure: outputs
and the local hour in, running means out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

DETECTION_SCORE = 0.5


def top_probability(outputs: Mapping[str, Any]) -> float | None:
    """The top score of an answer whose first output is a probability vector (else None)."""
    first = np.asarray(next(iter(outputs.values()))) if outputs else None
    if first is None or first.ndim != 1 or first.size < 2 or not np.issubdtype(first.dtype, np.floating):
        return None
    top = float(first.max())
    return top if 0.0 <= top <= 1.0 else None


def condition(hour: int) -> str:
    return "time=day" if 6 <= hour < 18 else "time=night"


class QualityProxy:
    def __init__(self) -> None:
        self._sums: dict[str, list[float]] = {}  # name → [sum, count]

    def add(self, outputs: Mapping[str, Any], hour: int) -> None:
        where = condition(hour)
        scores = outputs.get("scores")
        if scores is not None and np.asarray(scores).ndim == 2:  # a detector: [boxes, classes]
            per_box = np.asarray(scores, dtype=np.float64).max(axis=1)
            self._add(f"detections_per_frame@{where}", float((per_box >= DETECTION_SCORE).sum()))
            return
        top = top_probability(outputs)
        if top is not None:
            self._add(f"top_score_mean@{where}", top)

    def _add(self, name: str, value: float) -> None:
        acc = self._sums.setdefault(name, [0.0, 0.0])
        acc[0] += value
        acc[1] += 1

    def snapshot(self) -> dict[str, float]:
        return {name: s / n for name, (s, n) in sorted(self._sums.items()) if n}
