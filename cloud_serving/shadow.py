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
import logging
import math
import multiprocessing
import os
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cloud_serving.diffs import COMMON, METRICS, Metric, Row, SlicedDiff, Task, TaskSpec, metric, slices_of
from cloud_serving.errors import InvalidReleaseError
from cloud_serving.shadow_worker import RemoteLink, WorkerAddress
from shared.gates import Comparator, Condition, ConditionResult, Gate, Sample, Verdict, evaluate_gate
from shared.logs import RateLimitedLog

_handled = RateLimitedLog(logging.getLogger("tidegate.serving.shadow"))


class BudgetError(InvalidReleaseError):
    """A shadow budget that cannot be judged as written (unknown metric, class or slice form)."""


@dataclass(frozen=True)
class Budget:
    """One bound on one diff KPI, optionally for one class and one request-metadata slice:
    ``Budget("recall_delta", 0.015, cls="pedestrian", slice="time=night")`` reads
    ``abs(Δ recall pedestrian, slice time=night) <= 1.5 %``. Fewer than `min_samples` behind
    the value (answers of that class in that slice), or none at all, is pending, never pass."""

    metric: str
    bound: float
    cls: str | None = None
    slice: str | None = None
    min_samples: int = 100

    def key(self, m: Metric) -> str:
        where = ", ".join(x for x in (self.cls, self.slice and f"slice {self.slice}") if x)
        name = f"{self.metric}[{where}]" if where else self.metric
        return f"abs({name})" if m.better == "zero" else name

    def check(self, task: Task, classes: tuple[str, ...] | None) -> Metric:
        """The budget's metric, or a `BudgetError` naming what is wrong; `classes` are the
        model's class names (None: not known, so any class is accepted and judged at run time)."""
        m = metric(task, self.metric)
        if m is None:
            known = ", ".join([*METRICS[task], *COMMON])
            raise BudgetError(f"budget metric {self.metric!r} is not a {task} KPI; known: {known}")
        if not (math.isfinite(self.bound) and self.bound >= 0) and m.better != "higher":
            raise BudgetError(f"budget {self.metric}: bound must be a finite number >= 0")
        if self.cls is not None and not m.per_class:
            raise BudgetError(f"budget {self.metric} is not per class; drop class {self.cls!r}")
        if self.cls is not None and classes is not None and self.cls not in classes:
            raise BudgetError(f"budget {self.metric}: no class {self.cls!r}; classes: {', '.join(classes)}")
        if self.slice is not None and not re.fullmatch(r"[^=\s]{1,64}=[^=]{1,64}", self.slice):
            raise BudgetError(f"budget {self.metric}: slice {self.slice!r} is not key=value")
        if self.slice is not None and self.metric in COMMON:
            raise BudgetError(f"budget {self.metric} is measured over all traffic; drop slice {self.slice!r}")
        if self.min_samples < 1:
            raise BudgetError(f"budget {self.metric}: min_samples must be at least 1")
        return m


@dataclass(frozen=True)
class ShadowBudget:
    max_diff_rate: float | None = 0.05  # share of samples whose argmax disagrees with production
    max_error_rate: float = 0.01
    max_p95_ms: float | None = None
    min_samples: int = 100
    # A sample whose argmax disagrees with production's, or whose outputs differ by more
    # than this, is sent back whole (input, both answers) to be kept as a failure capture.
    capture_abs_diff: float | None = None
    budgets: tuple[Budget, ...] = ()  # per class and slice, besides the overall bounds above

    def all(self, task: Task) -> list[Budget]:
        """Every bound the verdict judges: the overall ones (diff rate for classifiers) and
        the named budgets."""
        out = [Budget("error_rate", self.max_error_rate, min_samples=self.min_samples)]
        if self.max_diff_rate is not None and task is Task.CLASSIFICATION:
            out.append(Budget("diff_rate", self.max_diff_rate, min_samples=self.min_samples))
        if self.max_p95_ms is not None:
            out.append(Budget("p95_ms", self.max_p95_ms, min_samples=self.min_samples))
        return out + list(self.budgets)


@dataclass(frozen=True)
class ShadowVerdict:
    """What a shadow concluded about its candidate: pass, fail or pending, a reason each."""

    version: str
    verdict: str  # "pass" | "fail" | "pending"
    conditions: tuple[dict[str, Any], ...]
    at: str
    compared: int
    final: bool = False  # the shadow has ended; a running shadow's verdict may still move
    agreement: tuple[float, int] | None = None  # overall argmax agreement (classifiers), answers
    rows: tuple[dict[str, Any], ...] = ()  # the KPI rows judged (the model card's table)

    @property
    def reason(self) -> str:
        bad = [c["reason"] for c in self.conditions if c["verdict"] == self.verdict] or [
            c["reason"] for c in self.conditions
        ]
        return "; ".join(bad)

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "verdict": self.verdict,
            "reason": self.reason,
            "conditions": list(self.conditions),
            "at": self.at,
            "compared": self.compared,
            "final": self.final,
            "rows": list(self.rows),
            "agreement": list(self.agreement) if self.agreement is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShadowVerdict:
        """What `as_dict` wrote (the replicas share verdicts in the release state)."""
        agreement = d.get("agreement")
        return cls(
            str(d["version"]),
            str(d["verdict"]),
            tuple(d["conditions"]),
            str(d["at"]),
            int(d["compared"]),
            final=bool(d.get("final", False)),
            agreement=(float(agreement[0]), int(agreement[1])) if agreement else None,
            rows=tuple(d.get("rows", ())),
        )


def budget_to_dict(b: ShadowBudget) -> dict[str, Any]:
    return {
        **{k: v for k, v in asdict(b).items() if k != "budgets"},
        "budgets": [asdict(x) for x in b.budgets],
    }


def budget_from_dict(d: dict[str, Any]) -> ShadowBudget:
    return ShadowBudget(
        **{k: v for k, v in d.items() if k != "budgets"},
        budgets=tuple(Budget(**x) for x in d.get("budgets", ())),
    )


_VERDICT = {Verdict.PASS: "pass", Verdict.FAIL: "fail", Verdict.WAIT: "pending"}


def judge(
    version: str, kpis: dict[str, Any], budgets: list[Budget], task: Task, now: datetime
) -> ShadowVerdict:
    """The budgets over the shadow's KPI rows, through the one gate engine: a budget whose row
    is missing or too thin waits, so a shadow passes only on evidence."""
    all_rows = tuple(kpis.get("rows", ()))
    rows = {(r["metric"], r["class"], r["slice"]): r for r in all_rows}
    agree = rows.get(("agreement", None, None))
    conditions, snapshot = [], {}
    for b in budgets:
        m = metric(task, b.metric)
        assert m is not None  # checked when the shadow started
        key = b.key(m)
        row = rows.get((b.metric, b.cls, b.slice))
        if row is not None and row["value"] is not None:
            value = abs(row["value"]) if m.better == "zero" else row["value"]
            snapshot[key] = [Sample(now, float(value), int(row["samples"]))]
        comparator = Comparator.GE if m.better == "higher" else Comparator.LE
        conditions.append(Condition(key, comparator, b.bound, min_samples=b.min_samples))
    result = evaluate_gate(Gate(tuple(conditions), name="shadow"), snapshot, now)
    return ShadowVerdict(
        version,
        _VERDICT[result.verdict],
        tuple(
            {
                "condition": r.condition.describe() if isinstance(r, ConditionResult) else r.reason,
                "verdict": _VERDICT[r.verdict],
                "observed": r.observed if isinstance(r, ConditionResult) else None,
                "samples": r.samples,
                "reason": r.reason,
            }
            for r in result.results
        ),
        now.isoformat(),
        int(kpis.get("compared", 0)),
        agreement=(agree["value"], agree["samples"]) if agree and agree["value"] is not None else None,
        rows=all_rows,
    )


@dataclass
class ShadowStats:
    """The comparisons, kept by the mirror's process."""

    spec: TaskSpec = field(default_factory=TaskSpec)
    compared: int = 0
    errors: int = 0
    diff: SlicedDiff = field(init=False)
    captures: list[dict[str, Any]] = field(default_factory=list)  # large diffs since the last summary
    latency_delta_ms: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    candidate_ms: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    def __post_init__(self) -> None:
        self.diff = SlicedDiff(self.spec)

    def state(self) -> dict[str, Any]:
        """The comparisons as JSON, for combining with other replicas' (`combined`): the
        diff's sums and the last `STATE_LATENCIES` latencies."""
        return {
            "compared": self.compared,
            "errors": self.errors,
            "diff": self.diff.state(),
            "candidate_ms": list(self.candidate_ms)[-STATE_LATENCIES:],
            "latency_delta_ms": list(self.latency_delta_ms)[-STATE_LATENCIES:],
        }

    @classmethod
    def combined(cls, spec: TaskSpec, states: list[dict[str, Any]]) -> ShadowStats:
        """Several mirrors' comparisons as one: the counts and sums add up exactly; the
        latency quantiles are over the pooled recent latencies of each."""
        out = cls(spec)
        for state in states:
            out.compared += int(state["compared"])
            out.errors += int(state["errors"])
            out.diff.absorb(state["diff"])
            out.candidate_ms.extend(state["candidate_ms"])
            out.latency_delta_ms.extend(state["latency_delta_ms"])
        return out

    def kpis(self) -> dict[str, Any]:
        rows = [r.as_dict() for r in self.diff.rows()]
        seen = self.compared + self.errors
        p95 = _quantile(self.candidate_ms, 0.95)
        if seen:
            rows.append(Row("error_rate", None, None, self.errors / seen, seen).as_dict())
        if p95 is not None:
            rows.append(Row("p95_ms", None, None, p95, len(self.candidate_ms)).as_dict())
        overall = {r["metric"]: r["value"] for r in rows if r["class"] is None and r["slice"] is None}
        per_class: dict[str, dict[str, float | None]] = {}
        for r in rows:
            if r["class"] is not None and r["slice"] is None:
                per_class.setdefault(r["class"], {})[r["metric"]] = r["value"]
        return {
            "task": str(self.spec.task),
            "compared": self.compared,
            "errors": self.errors,
            "diff_rate": overall.get("diff_rate"),
            "argmax_agreement": overall.get("agreement"),
            "error_rate": overall.get("error_rate"),
            "max_abs_diff": overall.get("max_abs_diff", 0.0),
            "latency_delta_ms_p50": _quantile(self.latency_delta_ms, 0.5),
            "candidate_ms_p95": p95,
            "per_class": per_class,
            "slices": sorted(self.diff.slices),
            "slices_dropped": self.diff.slices_dropped,
            "rows": rows,
        }


def _quantile(values: deque[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# sample, production's outputs, production's ms, the request's slices
Item = tuple[np.ndarray[Any, Any], dict[str, np.ndarray[Any, Any]], float, list[str]]
Packed = (
    tuple[np.ndarray[Any, Any], dict[str, np.ndarray[Any, Any]], list[float], list[list[str]]] | list[Item]
)


def _pack(items: list[Item]) -> Packed:
    """A batch as a few stacked arrays: pickling (in the queue's feeder thread, which holds
    the gateway's interpreter lock while it works) costs a few copies instead of two small
    arrays per sample. Outputs whose shapes vary from sample to sample go as they are."""
    try:
        samples = np.stack([item[0] for item in items])
        production = {n: np.stack([item[1][n] for item in items]) for n in items[0][1]}
    except (ValueError, KeyError):
        return items
    return samples, production, [item[2] for item in items], [item[3] for item in items]


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
STATE_LATENCIES = 512  # latencies a mirror's state carries to be pooled with other replicas'
# Samples go to the process in batches of up to 32 or every 20 ms: a batch of 32 reads the
# candidate's weights from memory once where 32 batches of one would read them 32 times,
# and memory bandwidth is what a mirror on the next core takes from the callers' model.
FLUSH_EVERY_S = 0.02
CAPTURES_PER_SUMMARY = 4  # large diffs sent back per summary: a bad candidate cannot flood us


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ShadowMirror:
    def __init__(
        self,
        version: str,
        model_path: Path,
        *,
        share: float,
        budget: ShadowBudget = ShadowBudget(),
        spec: TaskSpec | None = None,
        queue_max: int = 4096,
        rng_seed: int | None = None,
        clock: Callable[[], datetime] = _utcnow,
        worker: WorkerAddress | None = None,
        shadow_id: str | None = None,
        decides: bool = True,
    ) -> None:
        """`worker`: run the candidate on that shadow worker (`cloud_serving.shadow_worker`)
        instead of in a child process. Among gateway replicas every replica runs a mirror of
        the one shadow (`shadow_id`, shared); each is told the others' comparisons
        (`set_peers`) and its summary and verdict are on all of them, and it does not stop
        itself on a failing verdict (`decides=False`): the leading replica ends the shadow."""
        self.version, self.model_path = version, model_path
        self.id = shadow_id or uuid.uuid4().hex[:12]
        self.mirror_id = uuid.uuid4().hex[:8]  # this replica's mirror of it (a restart: a new one)
        self.decides = decides
        self.state: dict[str, Any] | None = None  # this mirror's own comparisons, latest
        self.peers: dict[str, dict[str, Any]] = {}  # the other replicas' mirrors', latest
        self._judging = threading.Lock()
        spec = spec or TaskSpec()
        self.share, self.budget, self.spec = share, budget, spec
        self.budgets = budget.all(spec.task)
        for b in self.budgets:
            b.check(spec.task, spec.class_names or None)
        self.queue_max = queue_max
        self.clock = clock
        self.stats = ShadowReport()
        self._own: dict[str, Any] = self.stats.summary  # this mirror's own last summary
        self.verdict = judge(version, self.stats.summary, self.budgets, spec.task, clock())
        self.stopped_reason: str | None = None
        # Large diffs from the mirror, waiting to be written as failure captures (bounded).
        self.captures: deque[dict[str, Any]] = deque(maxlen=64)
        self.noted = False  # the gateway has logged the stop
        self._rng = random.Random(rng_seed)
        self._buffer: list[Item] = []
        self._sent = 0  # samples handed to the process
        self._done = 0  # samples the process has finished (from its last summary)
        self.ready = threading.Event()  # the process has loaded the candidate
        self.link: RemoteLink | None = None
        self._in: Any
        self._out: Any
        self._proc: Any
        if worker is not None:
            link = self.link = RemoteLink(worker, (model_path.read_bytes(), spec, budget.capture_abs_diff))
            self._in, self._out, self._proc = link, link.received, link
        else:
            ctx = multiprocessing.get_context("spawn")
            self._in, self._out = ctx.Queue(), ctx.Queue()
            self._proc = ctx.Process(
                target=_mirror_process,
                args=(str(model_path), spec, budget.capture_abs_diff, self._in, self._out),
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

    async def stop(self, reason: str = "stopped by an operator") -> ShadowVerdict:
        """Stop mirroring; the process finishes what it was sent and sends its last summary,
        and the verdict on it is final."""
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
        self.verdict = replace(self.verdict, final=True)
        return self.verdict

    def offer(
        self,
        sample: np.ndarray[Any, Any],
        production: dict[str, np.ndarray[Any, Any]],
        production_ms: float,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Called on the caller's path: never blocks, never raises."""
        if not self.active or self._rng.random() >= self.share:
            return
        self.stats.offered += 1
        if self._sent - self._done + len(self._buffer) >= self.queue_max:
            self.stats.dropped += 1
            return
        self._buffer.append((sample, production, production_ms, slices_of(metadata)))
        if len(self._buffer) >= 32:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        items, self._buffer = self._buffer, []
        try:
            self._in.put_nowait(_pack(items))
        except Exception as exc:  # a dead or full pipe: drop, never block the caller
            self.stats.dropped += len(items)
            _handled.exception("shadow", f"shadow dropped {len(items)} requests", exc)
            return
        self._sent += len(items)

    async def _flush_loop(self) -> None:
        while self.active:
            await asyncio.sleep(FLUSH_EVERY_S)
            self._flush()

    def _read(self) -> None:
        """Summaries in: replace the last one and judge it; a failing verdict stops the
        mirroring (the process idles until the shadow is ended)."""
        while True:
            try:
                message = self._out.get()
            except (EOFError, OSError):
                return
            if message is None:
                if self.link is not None and self.link.error and self.stopped_reason is None:
                    self.stopped_reason = self.link.error  # the worker could not be used
                return
            done, summary, captures, state = message
            self.ready.set()
            self._done = done
            self.captures.extend(captures)
            self.stats.captured += len(captures)
            with self._judging:
                self.state, self._own = state, summary
            self._rejudge()

    def set_peers(self, peers: dict[str, dict[str, Any]]) -> None:
        """The other replicas' mirrors of this shadow (mirror id → latest state): from now
        the summary and the verdict are on theirs and this one's comparisons together."""
        with self._judging:
            self.peers = {k: v for k, v in peers.items() if k != self.mirror_id}
        self._rejudge()

    def _rejudge(self) -> None:
        with self._judging:
            if self.peers:
                states = [*([self.state] if self.state is not None else []), *self.peers.values()]
                summary = ShadowStats.combined(self.spec, states).kpis()
                summary["mirrors"] = len(states)
            else:
                summary = self._own
            self.stats.summary = summary
            self.verdict = judge(self.version, summary, self.budgets, self.spec.task, self.clock())
            if self.decides and self.verdict.verdict == "fail" and self.stopped_reason is None:
                self.stopped_reason = self.verdict.reason


def _unpack(packed: Packed) -> list[Item]:
    if isinstance(packed, list):
        return packed
    samples, production, ms, slices = packed
    return [(samples[i], {n: v[i] for n, v in production.items()}, ms[i], slices[i]) for i in range(len(ms))]


def _idle_priority(pid: int) -> None:
    """SCHED_IDLE: run only when a core would otherwise idle, and yield at once to a caller's
    thread that wakes up (nice 19 alone still costs callers a time slice). Linux only."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        os.setpriority(os.PRIO_PROCESS, pid or 0, 19)
        os.sched_setscheduler(pid or 0, os.SCHED_IDLE, os.sched_param(0))


def _mirror_process(
    model_path: str | bytes, spec: TaskSpec, capture_abs_diff: float | None, inq: Any, outq: Any
) -> None:
    """The candidate, in its own process at the lowest priority: run each batch, compare
    with production's answers, keep the KPIs, and send a summary (samples done, KPIs, large
    diffs) at most every `SUMMARY_EVERY_S` and once more at the end."""
    _idle_priority(0)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]
    stats, done, last = ShadowStats(spec), 0, 0.0
    outq.put((done, stats.kpis(), [], stats.state()))  # loaded: the gateway knows it is ready
    while True:
        packed = inq.get()
        if packed is None:
            outq.put((done, stats.kpis(), stats.captures, stats.state()))
            return
        items = _unpack(packed)
        _compare(sess, input_name, names, items, stats, capture_abs_diff)
        done += len(items)
        now = time.monotonic()
        if now - last >= SUMMARY_EVERY_S or inq.empty():
            last = now
            outq.put((done, stats.kpis(), stats.captures, stats.state()))
            stats.captures = []


def _compare(
    sess: Any,
    input_name: str,
    names: list[str],
    items: list[Item],
    stats: ShadowStats,
    capture_abs_diff: float | None = None,
) -> None:
    """Run the candidate on a batch and compare it with production's answers: the task's KPIs
    for the whole batch at once, and a few large diffs sent back whole."""
    t0 = time.perf_counter()
    try:
        outs = sess.run(names, {input_name: np.stack([item[0] for item in items])})
    except Exception:
        stats.errors += len(items)
        return
    ms = (time.perf_counter() - t0) * 1000
    candidate = dict(zip(names, outs, strict=True))
    try:
        production = {n: np.stack([item[1][n] for item in items]) for n in items[0][1]}
    except (KeyError, ValueError):  # answers of different shapes: one frame at a time
        for row, item in enumerate(items):
            one = {n: v[row : row + 1] for n, v in candidate.items()}
            _compare_frames(
                stats, [item], {n: v[None] for n, v in item[1].items()}, one, ms, capture_abs_diff
            )
        return
    _compare_frames(stats, items, production, candidate, ms, capture_abs_diff)


def _compare_frames(
    stats: ShadowStats,
    items: list[Item],
    production: dict[str, np.ndarray[Any, Any]],
    candidate: dict[str, np.ndarray[Any, Any]],
    ms: float,
    capture_abs_diff: float | None,
) -> None:
    try:
        frames = stats.diff.add_batch(production, candidate, [item[3] for item in items])
    except (KeyError, ValueError, IndexError):  # outputs the task cannot read: failures
        stats.errors += len(items)
        return
    stats.compared += len(items)
    for item in items:
        stats.candidate_ms.append(ms)
        stats.latency_delta_ms.append(ms - item[2])
    diffs = frames.get("max_abs_diff")
    if diffs is None:
        from cloud_serving.diffs import abs_diff

        diffs = abs_diff(production, candidate)
    top_p, top_c = frames.get("production"), frames.get("candidate")
    large = np.zeros(len(items), dtype=bool)
    if top_p is not None and top_c is not None:
        large |= (top_p >= 0) & (top_p != top_c)
    if capture_abs_diff is not None:
        large |= diffs > capture_abs_diff
    for row in np.nonzero(large)[0][: max(0, CAPTURES_PER_SUMMARY - len(stats.captures))]:
        p = int(top_p[row]) if top_p is not None else -1
        c = int(top_c[row]) if top_c is not None else -1
        stats.captures.append(
            {
                "input": items[row][0].tolist(),
                "production": {n: v.tolist() for n, v in items[row][1].items()},
                "candidate": {n: v[row].tolist() for n, v in candidate.items()},
                "max_abs_diff": float(diffs[row]),
                "argmax": {"production": p, "candidate": c},
                "slices": items[row][3],
            }
        )
