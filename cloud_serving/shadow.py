"""Shadow: a share of live traffic mirrored to a candidate, off the caller's path.

The caller's request is answered by production; `offer` only puts a copy on a bounded
queue (`put_nowait`, dropped and counted when full), so the caller pays a queue hand-off
and nothing else. One worker runs the candidate and compares: argmax agreement, per-class
precision and recall of the candidate against production's labels, the largest output
difference and the latency delta. A budget (diff rate, error rate, candidate p95) stops
the shadow by itself once enough samples are in.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloud_serving.backends import Backend


@dataclass(frozen=True)
class ShadowBudget:
    max_diff_rate: float = 0.05  # share of samples whose argmax disagrees with production
    max_error_rate: float = 0.01
    max_p95_ms: float | None = None
    min_samples: int = 100


@dataclass
class ShadowStats:
    offered: int = 0
    dropped: int = 0  # the queue was full: never delays the caller
    compared: int = 0
    errors: int = 0
    disagreements: int = 0
    max_abs_diff: float = 0.0
    latency_delta_ms: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    candidate_ms: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    confusion: dict[tuple[int, int], int] = field(default_factory=dict)  # (production, candidate) → n

    def kpis(self) -> dict[str, Any]:
        classes = sorted({c for pair in self.confusion for c in pair})
        per_class = {}
        for c in classes:
            tp = self.confusion.get((c, c), 0)
            predicted = sum(n for (p, q), n in self.confusion.items() if q == c)
            actual = sum(n for (p, q), n in self.confusion.items() if p == c)
            per_class[str(c)] = {
                "precision_vs_production": tp / predicted if predicted else None,
                "recall_vs_production": tp / actual if actual else None,
            }
        return {
            "offered": self.offered,
            "dropped": self.dropped,
            "compared": self.compared,
            "errors": self.errors,
            "diff_rate": self.disagreements / self.compared if self.compared else None,
            "argmax_agreement": 1 - self.disagreements / self.compared if self.compared else None,
            "error_rate": self.errors / (self.compared + self.errors)
            if self.compared + self.errors
            else None,
            "max_abs_diff": self.max_abs_diff,
            "latency_delta_ms_p50": _quantile(self.latency_delta_ms, 0.5),
            "candidate_ms_p95": _quantile(self.candidate_ms, 0.95),
            "per_class": per_class,
        }


def _quantile(values: deque[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class ShadowMirror:
    def __init__(
        self,
        candidate: Backend,
        *,
        share: float,
        budget: ShadowBudget = ShadowBudget(),
        scores_output: str | None = None,
        queue_max: int = 256,
        rng_seed: int | None = None,
    ) -> None:
        import random

        self.candidate, self.share, self.budget = candidate, share, budget
        self.scores_output = scores_output
        self.stats = ShadowStats()
        self.stopped_reason: str | None = None
        self.noted = False  # the gateway has logged the stop
        self._queue: asyncio.Queue[tuple[np.ndarray[Any, Any], dict[str, np.ndarray[Any, Any]], float]] = (
            asyncio.Queue(maxsize=queue_max)
        )
        self._rng = random.Random(rng_seed)
        self._worker: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self.stopped_reason is None

    def start(self) -> None:
        self._worker = asyncio.create_task(self._work())

    async def stop(self, reason: str = "stopped by an operator") -> None:
        if self.stopped_reason is None:
            self.stopped_reason = reason
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._worker, 5)

    def offer(
        self, sample: np.ndarray[Any, Any], production: dict[str, np.ndarray[Any, Any]], production_ms: float
    ) -> None:
        """Called on the caller's path: never blocks, never raises."""
        if not self.active or self._rng.random() >= self.share:
            return
        self.stats.offered += 1
        try:
            self._queue.put_nowait((sample, production, production_ms))
        except asyncio.QueueFull:
            self.stats.dropped += 1

    async def _work(self) -> None:
        """Take whatever has queued (up to 32) and run it concurrently, so the candidate's
        batcher can batch the mirror's traffic as it batches a caller's."""
        while self.active:
            items = [await self._queue.get()]
            while len(items) < 32 and not self._queue.empty():
                items.append(self._queue.get_nowait())
            results = await asyncio.gather(*(self._one(sample) for sample, _, _ in items))
            for (_, production, production_ms), (got, ms) in zip(items, results, strict=True):
                if got is None:
                    self.stats.errors += 1
                else:
                    self._compare(production, got, production_ms, ms)
            self._check_budget()

    async def _one(
        self, sample: np.ndarray[Any, Any]
    ) -> tuple[dict[str, np.ndarray[Any, Any]] | None, float]:
        t0 = time.perf_counter()
        try:
            got = await self.candidate.infer(sample)
        except Exception:
            return None, 0.0
        return got, (time.perf_counter() - t0) * 1000

    def _compare(
        self,
        production: dict[str, np.ndarray[Any, Any]],
        got: dict[str, np.ndarray[Any, Any]],
        prod_ms: float,
        ms: float,
    ) -> None:
        s = self.stats
        s.compared += 1
        s.candidate_ms.append(ms)
        s.latency_delta_ms.append(ms - prod_ms)
        for name, ref in production.items():
            if name in got and got[name].shape == ref.shape and ref.size:
                s.max_abs_diff = max(s.max_abs_diff, float(np.max(np.abs(got[name] - ref))))
        scores = self.scores_output or next(iter(production))
        if scores in got and production[scores].ndim >= 1 and production[scores].size > 1:
            p, c = int(np.argmax(production[scores])), int(np.argmax(got[scores]))
            s.confusion[(p, c)] = s.confusion.get((p, c), 0) + 1
            if p != c:
                s.disagreements += 1

    def _check_budget(self) -> None:
        k, b = self.stats.kpis(), self.budget
        if self.stats.compared + self.stats.errors < b.min_samples:
            return
        if k["error_rate"] is not None and k["error_rate"] > b.max_error_rate:
            self.stopped_reason = f"error rate {k['error_rate']:.3f} above the budget {b.max_error_rate}"
        elif k["diff_rate"] is not None and k["diff_rate"] > b.max_diff_rate:
            self.stopped_reason = f"diff rate {k['diff_rate']:.3f} above the budget {b.max_diff_rate}"
        elif b.max_p95_ms is not None and (k["candidate_ms_p95"] or 0) > b.max_p95_ms:
            self.stopped_reason = (
                f"candidate p95 {k['candidate_ms_p95']:.1f} ms above the budget {b.max_p95_ms} ms"
            )
