"""Model-quality signals on the request path, cheap enough for every request.

`InputProfile` learns each feature's mean and spread from a model's first requests (Welford,
then frozen) and counts later inputs as out of distribution when any feature lies more than
`z` standard deviations out. `top_score` reads the answer's confidence and class from a
probability vector. Both feed the gateway's Prometheus metrics.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np


class InputProfile:
    def __init__(self, *, warmup: int = 1000, z: float = 6.0) -> None:
        self.warmup, self.z = warmup, z
        self.n = 0
        self.mean: np.ndarray[Any, Any] | None = None
        self._m2: np.ndarray[Any, Any] | None = None
        self.std: np.ndarray[Any, Any] | None = None  # set once frozen

    def out_of_distribution(self, sample: np.ndarray[Any, Any]) -> bool:
        x = np.asarray(sample, dtype=np.float64).reshape(-1)
        if self.std is not None:
            return x.shape == self.std.shape and bool(np.max(np.abs(x - self.mean) / self.std) > self.z)  # type: ignore[operator]
        if self.mean is None or self.mean.shape != x.shape:
            self.n, self.mean, self._m2 = 0, np.zeros_like(x), np.zeros_like(x)
        self.n += 1
        delta = x - self.mean
        self.mean = self.mean + delta / self.n
        self._m2 = self._m2 + delta * (x - self.mean)  # type: ignore[operator]
        if self.n >= self.warmup:
            self.std = np.maximum(np.sqrt(self._m2 / (self.n - 1)), 1e-6)
        return False


def top_score(outputs: dict[str, np.ndarray[Any, Any]], name: str | None) -> tuple[int, float] | None:
    """(class, score) of the answer's top class, when its scores output is a probability vector."""
    scores = outputs.get(name) if name else next(iter(outputs.values()), None)
    if scores is None or scores.ndim != 1 or scores.size < 2 or not np.issubdtype(scores.dtype, np.floating):
        return None
    k = int(np.argmax(scores))
    s = float(scores[k])
    return (k, s) if 0.0 <= s <= 1.0 else None


class Cohort:
    """A uniform sample (reservoir, Algorithm R) of at most `capacity` requests of one kind:
    every request of the kind had the same chance to be kept, however many came."""

    def __init__(self, capacity: int = 500, seed: int | None = None) -> None:
        import random

        self.capacity, self.seen = capacity, 0
        self.items: list[dict[str, Any]] = []
        self._rng = random.Random(seed)

    def offer(self, make: Any) -> None:
        """`make()` builds the record only when it is kept (most are not, once full)."""
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(make())
        elif (j := self._rng.randrange(self.seen)) < self.capacity:
            self.items[j] = make()


COHORT_KINDS = ("novelty", "failure", "uncertain")  # OOD inputs, fallback answers, abstentions


class Calibration:
    """One version's last labelled answers (confidence, correct): the ground truth callers
    post after the fact, turned into ECE and accuracy over a sliding window."""

    def __init__(self, window: int = 5000) -> None:
        self.window: deque[tuple[float, bool]] = deque(maxlen=window)
        self.labelled = 0  # ever, for the counter

    def add(self, confidence: float, correct: bool) -> None:
        self.window.append((confidence, correct))
        self.labelled += 1

    def __len__(self) -> int:
        return len(self.window)

    def accuracy(self) -> float | None:
        return sum(c for _, c in self.window) / len(self.window) if self.window else None

    def ece(self, bins: int = 10) -> float | None:
        if not self.window:
            return None
        from shared.drift.stats import ece  # scipy: loaded when labels first arrive

        conf = np.fromiter((p for p, _ in self.window), dtype=np.float64, count=len(self.window))
        correct = np.fromiter((c for _, c in self.window), dtype=np.float64, count=len(self.window))
        return ece(conf, correct, bins)[0]
