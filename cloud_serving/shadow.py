"""Shadow: a share of live traffic mirrored to a candidate, off the caller's path.

The caller's request is answered by production; `offer` only appends a copy to a bounded
buffer (dropped and counted when full), so the caller pays a list append and nothing else.
The candidate runs in its own process at the lowest CPU priority, with its own ONNX Runtime
session: neither its inference nor the comparisons take the gateway's event loop or its
interpreter lock. The process compares each answer with production's (argmax, largest
output difference, latency) and sends back small records; the gateway keeps the KPIs
(argmax agreement, per-class precision and recall of the candidate against production's
labels, max |Δ|, latency delta) and stops the shadow by itself once a budget (diff rate,
error rate, candidate p95) is exceeded with enough samples in.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


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
        version: str,
        model_path: Path,
        *,
        share: float,
        budget: ShadowBudget = ShadowBudget(),
        scores_output: str | None = None,
        queue_max: int = 4096,
        rng_seed: int | None = None,
    ) -> None:
        self.version, self.model_path = version, model_path
        self.share, self.budget, self.scores_output = share, budget, scores_output
        self.queue_max = queue_max
        self.stats = ShadowStats()
        self.stopped_reason: str | None = None
        self.noted = False  # the gateway has logged the stop
        self._rng = random.Random(rng_seed)
        self._buffer: list[tuple[np.ndarray[Any, Any], dict[str, np.ndarray[Any, Any]], float]] = []
        self._outstanding = 0  # offered to the process, not answered yet
        self._lock = threading.Lock()
        ctx = multiprocessing.get_context("spawn")
        self._in: Any = ctx.Queue()
        self._out: Any = ctx.Queue()
        self._proc = ctx.Process(
            target=_mirror_process,
            args=(str(model_path), scores_output, self._in, self._out),
            name=f"tidegate-shadow-{version}",
            daemon=True,
        )
        self._reader = threading.Thread(target=self._read, name="shadow-reader", daemon=True)
        self._flusher: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self.stopped_reason is None

    def start(self) -> None:
        self._proc.start()
        self._reader.start()
        self._flusher = asyncio.create_task(self._flush_loop())

    async def stop(self, reason: str = "stopped by an operator") -> None:
        if self.stopped_reason is None:
            self.stopped_reason = reason
        if self._flusher is not None:
            self._flusher.cancel()
        with contextlib.suppress(Exception):
            self._in.put(None)
        await asyncio.to_thread(self._proc.join, 5)
        if self._proc.is_alive():
            self._proc.terminate()
        with contextlib.suppress(Exception):
            self._out.put(None)
        await asyncio.to_thread(self._reader.join, 5)

    def offer(
        self, sample: np.ndarray[Any, Any], production: dict[str, np.ndarray[Any, Any]], production_ms: float
    ) -> None:
        """Called on the caller's path: never blocks, never raises."""
        if not self.active or self._rng.random() >= self.share:
            return
        self.stats.offered += 1
        if self._outstanding + len(self._buffer) >= self.queue_max:
            self.stats.dropped += 1
            return
        self._buffer.append((sample, production, production_ms))
        if len(self._buffer) >= 32:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        items, self._buffer = self._buffer, []
        with self._lock:
            self._outstanding += len(items)
        try:
            self._in.put_nowait(items)
        except Exception:  # a dead or full pipe: drop, never block the caller
            with self._lock:
                self._outstanding -= len(items)
            self.stats.dropped += len(items)

    async def _flush_loop(self) -> None:
        while self.active:
            await asyncio.sleep(0.005)
            self._flush()

    def _read(self) -> None:
        while True:
            try:
                records = self._out.get()
            except (EOFError, OSError):
                return
            if records is None:
                return
            with self._lock:
                self._outstanding -= len(records)
                for rec in records:
                    self._merge(rec)
            self._check_budget()

    def _merge(self, rec: tuple[int, int, float, float, float] | None) -> None:
        s = self.stats
        if rec is None:
            s.errors += 1
            return
        p, c, diff, ms, prod_ms = rec
        s.compared += 1
        s.candidate_ms.append(ms)
        s.latency_delta_ms.append(ms - prod_ms)
        s.max_abs_diff = max(s.max_abs_diff, diff)
        if p >= 0:
            s.confusion[(p, c)] = s.confusion.get((p, c), 0) + 1
            if p != c:
                s.disagreements += 1

    def _check_budget(self) -> None:
        k, b = self.stats.kpis(), self.budget
        if self.stats.compared + self.stats.errors < b.min_samples or not self.active:
            return
        if k["error_rate"] is not None and k["error_rate"] > b.max_error_rate:
            self.stopped_reason = f"error rate {k['error_rate']:.3f} above the budget {b.max_error_rate}"
        elif k["diff_rate"] is not None and k["diff_rate"] > b.max_diff_rate:
            self.stopped_reason = f"diff rate {k['diff_rate']:.3f} above the budget {b.max_diff_rate}"
        elif b.max_p95_ms is not None and (k["candidate_ms_p95"] or 0) > b.max_p95_ms:
            self.stopped_reason = (
                f"candidate p95 {k['candidate_ms_p95']:.1f} ms above the budget {b.max_p95_ms} ms"
            )


def _mirror_process(model_path: str, scores_output: str | None, inq: Any, outq: Any) -> None:
    """The candidate, in its own process at the lowest priority: run each batch, compare
    with production's answers, send back one small record per sample (None: it failed)."""
    with contextlib.suppress(OSError, AttributeError):
        os.nice(19)
        # SCHED_IDLE: runs only when a core would otherwise idle, and a caller's thread that
        # wakes up preempts it at once (nice 19 alone still costs callers a time slice).
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]
    while True:
        items = inq.get()
        if items is None:
            return
        t0 = time.perf_counter()
        try:
            outs = sess.run(names, {input_name: np.stack([sample for sample, _, _ in items])})
        except Exception:
            outq.put([None] * len(items))
            continue
        ms = (time.perf_counter() - t0) * 1000
        records: list[tuple[int, int, float, float, float] | None] = []
        for row, (_, production, prod_ms) in enumerate(items):
            got = {n: o[row] for n, o in zip(names, outs, strict=True)}
            diff = 0.0
            for name, ref in production.items():
                if name in got and got[name].shape == ref.shape and ref.size:
                    diff = max(diff, float(np.max(np.abs(got[name] - ref))))
            key = scores_output or next(iter(production))
            p = c = -1
            if key in got and production[key].size > 1:
                p, c = int(np.argmax(production[key])), int(np.argmax(got[key]))
            records.append((p, c, diff, ms, prod_ms))
        outq.put(records)
