"""Shadow: a share of live traffic mirrored to a candidate, off the caller's path.

The caller's request is answered by production; `offer` only appends a copy to a bounded
buffer (dropped and counted when full), so the caller pays a list append and nothing else.
The candidate runs in its own process at the lowest CPU priority, with its own ONNX Runtime
session, and that process also keeps the KPIs (argmax agreement, per-class precision and
recall of the candidate against production's labels, max |Δ|, latency delta) and judges the
budget (diff rate, error rate, candidate p95, once enough samples are in). The gateway's
process receives a small summary a few times a second: no per-sample bookkeeping there, so
the mirror holds the gateway's interpreter lock for microseconds, not for the sorting and
merging a thread would otherwise do while a caller's request waits for the lock.
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
    # A sample whose argmax disagrees with production's, or whose outputs differ by more
    # than this, is sent back whole (input, both answers) to be kept as a failure capture.
    capture_abs_diff: float | None = None


@dataclass
class ShadowStats:
    """The comparisons, kept by the mirror's process."""

    compared: int = 0
    errors: int = 0
    disagreements: int = 0
    max_abs_diff: float = 0.0
    captures: list[dict[str, Any]] = field(default_factory=list)  # large diffs since the last summary
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


Item = tuple[np.ndarray[Any, Any], dict[str, np.ndarray[Any, Any]], float]  # sample, production, ms
Packed = tuple[np.ndarray[Any, Any], dict[str, np.ndarray[Any, Any]], list[float]] | list[Item]


def _pack(items: list[Item]) -> Packed:
    """A batch as a few stacked arrays: pickling (in the queue's feeder thread, which holds
    the gateway's interpreter lock while it works) costs a few copies instead of two small
    arrays per sample. Outputs whose shapes vary from sample to sample go as they are."""
    try:
        samples = np.stack([sample for sample, _, _ in items])
        production = {n: np.stack([p[n] for _, p, _ in items]) for n in items[0][1]}
    except (ValueError, KeyError):
        return items
    return samples, production, [ms for _, _, ms in items]


@dataclass
class ShadowReport:
    """What the gateway knows of a shadow: its own counters and the process's last summary."""

    offered: int = 0
    dropped: int = 0  # the queue was full: never delays the caller
    captured: int = 0  # large diffs received from the mirror
    summary: dict[str, Any] = field(default_factory=lambda: ShadowStats().kpis())

    @property
    def compared(self) -> int:
        return int(self.summary["compared"])

    def kpis(self) -> dict[str, Any]:
        return {**self.summary, "offered": self.offered, "dropped": self.dropped, "captured": self.captured}


SUMMARY_EVERY_S = 0.1
# Samples go to the process in batches of up to 32 or every 20 ms: a batch of 32 reads the
# candidate's weights from memory once where 32 batches of one would read them 32 times,
# and memory bandwidth is what a mirror on the next core takes from the callers' model.
FLUSH_EVERY_S = 0.02
CAPTURES_PER_SUMMARY = 4  # large diffs sent back per summary: a bad candidate cannot flood us


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
        self.stats = ShadowReport()
        self.stopped_reason: str | None = None
        # Large diffs from the mirror, waiting to be written as failure captures (bounded).
        self.captures: deque[dict[str, Any]] = deque(maxlen=64)
        self.noted = False  # the gateway has logged the stop
        self._rng = random.Random(rng_seed)
        self._buffer: list[Item] = []
        self._sent = 0  # samples handed to the process
        self._done = 0  # samples the process has finished (from its last summary)
        self.ready = threading.Event()  # the process has loaded the candidate
        ctx = multiprocessing.get_context("spawn")
        self._in: Any = ctx.Queue()
        self._out: Any = ctx.Queue()
        self._proc = ctx.Process(
            target=_mirror_process,
            args=(str(model_path), scores_output, budget, self._in, self._out),
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
        # Lowest priority from the first instruction: the child's own call comes only after
        # the interpreter has started and imported numpy, a second of CPU at normal priority.
        if self._proc.pid is not None:
            _idle_priority(self._proc.pid)
        self._reader.start()
        self._flusher = asyncio.create_task(self._flush_loop())

    async def stop(self, reason: str = "stopped by an operator") -> None:
        """Stop mirroring; the process finishes what it was sent and sends its last summary."""
        if self.stopped_reason is None:
            self.stopped_reason = reason
        if self._flusher is not None:
            self._flusher.cancel()
        with contextlib.suppress(Exception):
            self._in.put(None)
        await asyncio.to_thread(self._proc.join, 10)
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
        if self._sent - self._done + len(self._buffer) >= self.queue_max:
            self.stats.dropped += 1
            return
        self._buffer.append((sample, production, production_ms))
        if len(self._buffer) >= 32:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        items, self._buffer = self._buffer, []
        try:
            self._in.put_nowait(_pack(items))
        except Exception:  # a dead or full pipe: drop, never block the caller
            self.stats.dropped += len(items)
            return
        self._sent += len(items)

    async def _flush_loop(self) -> None:
        while self.active:
            await asyncio.sleep(FLUSH_EVERY_S)
            self._flush()

    def _read(self) -> None:
        """Summaries in: replace the last one; a stop the process decided on is taken over."""
        while True:
            try:
                message = self._out.get()
            except (EOFError, OSError):
                return
            if message is None:
                return
            done, summary, stop, captures = message
            self.ready.set()
            self._done, self.stats.summary = done, summary
            self.captures.extend(captures)
            self.stats.captured += len(captures)
            if stop is not None and self.stopped_reason is None:
                self.stopped_reason = stop


def _unpack(packed: Packed) -> list[Item]:
    if isinstance(packed, list):
        return packed
    samples, production, ms = packed
    return [(samples[i], {n: v[i] for n, v in production.items()}, ms[i]) for i in range(len(ms))]


def _merge(stats: ShadowStats, rec: tuple[int, int, float, float, float] | None) -> None:
    if rec is None:
        stats.errors += 1
        return
    p, c, diff, ms, prod_ms = rec
    stats.compared += 1
    stats.candidate_ms.append(ms)
    stats.latency_delta_ms.append(ms - prod_ms)
    stats.max_abs_diff = max(stats.max_abs_diff, diff)
    if p >= 0:
        stats.confusion[(p, c)] = stats.confusion.get((p, c), 0) + 1
        if p != c:
            stats.disagreements += 1


def over_budget(kpis: dict[str, Any], budget: ShadowBudget) -> str | None:
    """Why the shadow must stop, or None (also None until `min_samples` are in)."""
    if kpis["compared"] + kpis["errors"] < budget.min_samples:
        return None
    if kpis["error_rate"] is not None and kpis["error_rate"] > budget.max_error_rate:
        return f"error rate {kpis['error_rate']:.3f} above the budget {budget.max_error_rate}"
    if kpis["diff_rate"] is not None and kpis["diff_rate"] > budget.max_diff_rate:
        return f"diff rate {kpis['diff_rate']:.3f} above the budget {budget.max_diff_rate}"
    if budget.max_p95_ms is not None and (kpis["candidate_ms_p95"] or 0) > budget.max_p95_ms:
        return f"candidate p95 {kpis['candidate_ms_p95']:.1f} ms above the budget {budget.max_p95_ms} ms"
    return None


def _idle_priority(pid: int) -> None:
    """SCHED_IDLE: run only when a core would otherwise idle, and yield at once to a caller's
    thread that wakes up (nice 19 alone still costs callers a time slice). Linux only."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        os.setpriority(os.PRIO_PROCESS, pid or 0, 19)
        os.sched_setscheduler(pid or 0, os.SCHED_IDLE, os.sched_param(0))


def _mirror_process(
    model_path: str, scores_output: str | None, budget: ShadowBudget, inq: Any, outq: Any
) -> None:
    """The candidate, in its own process at the lowest priority: run each batch, compare
    with production's answers, keep the KPIs, and send a summary (samples done, KPIs, a stop
    reason) at most every `SUMMARY_EVERY_S` and once more at the end."""
    _idle_priority(0)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]
    stats, done, last = ShadowStats(), 0, 0.0
    stop: str | None = None
    outq.put((done, stats.kpis(), stop, []))  # loaded: the gateway now knows the mirror is ready
    while True:
        packed = inq.get()
        if packed is None:
            kpis = stats.kpis()
            outq.put((done, kpis, stop or over_budget(kpis, budget), stats.captures))
            return
        items = _unpack(packed)
        if stop is None:
            _compare(sess, input_name, names, scores_output, items, stats, budget.capture_abs_diff)
        done += len(items)
        now = time.monotonic()
        if now - last >= SUMMARY_EVERY_S or inq.empty():
            last = now
            kpis = stats.kpis()
            stop = stop or over_budget(kpis, budget)
            outq.put((done, kpis, stop, stats.captures))
            stats.captures = []


def _compare(
    sess: Any,
    input_name: str,
    names: list[str],
    scores_output: str | None,
    items: list[Item],
    stats: ShadowStats,
    capture_abs_diff: float | None = None,
) -> None:
    t0 = time.perf_counter()
    try:
        outs = sess.run(names, {input_name: np.stack([sample for sample, _, _ in items])})
    except Exception:
        for _ in items:
            _merge(stats, None)
        return
    ms = (time.perf_counter() - t0) * 1000
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
        _merge(stats, (p, c, diff, ms, prod_ms))
        large = p != c or (capture_abs_diff is not None and diff > capture_abs_diff)
        if large and len(stats.captures) < CAPTURES_PER_SUMMARY:
            stats.captures.append(
                {
                    "input": items[row][0].tolist(),
                    "production": {n: v.tolist() for n, v in production.items()},
                    "candidate": {n: v.tolist() for n, v in got.items()},
                    "max_abs_diff": diff,
                    "argmax": {"production": p, "candidate": c},
                }
            )
