"""Dynamic batching in front of an in-process model: the agent's local inference and the
cloud gateway's in-process backends both use it.

Callers `await infer(sample)`; workers gather up to `max_batch` samples or
wait at most `max_delay_ms` after the first, run one batched inference in a
thread (ONNX Runtime releases the GIL), and hand each caller its row. The
queue is bounded: when it is full `infer` raises `OverloadedError` at once
(backpressure) instead of queueing without limit. `reload` swaps the model
between batches, so a committed flip drops no request. The thermal governor
lowers `max_batch` and `concurrency` and adds pacing through `set_limits`. A batch that
reaches one of `preferred_sizes` goes at once instead of waiting out the delay (Triton's
preferred batch sizes).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shared.errors import TidegateError


class OverloadedError(TidegateError):
    """The batcher's queue is full; try again later."""


class NoModelError(TidegateError):
    """No model is loaded."""


class Runner(Protocol):
    input_name: str
    output_names: list[str]

    def run_batch(self, batch: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]: ...


class OnnxModelRunner:
    """An ONNX model file in ONNX Runtime on the CPU (first input batched)."""

    def __init__(self, model: Path, *, threads: int = 1, version: str = "") -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.version = version
        self._sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        self.input_name = self._sess.get_inputs()[0].name
        self.input_shape: list[int | str | None] = list(self._sess.get_inputs()[0].shape)
        self.output_names = [o.name for o in self._sess.get_outputs()]

    def run_batch(self, batch: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
        return list(self._sess.run(self.output_names, {self.input_name: batch}))


class NonFiniteOutputError(TidegateError):
    """The model answered NaN or infinity for this sample: it has failed, not answered."""


class InferencePool:
    """Threads that run batches, and how many batches are in them now (event-loop owned).

    A batcher waits for a fuller batch only while every thread is busy, and stops waiting
    the moment one frees up (`waiting`: the events of batchers waiting now), so no thread
    idles while requests queue and no batch waits longer than the model takes to be free.
    `nice` > 0 lowers the threads' scheduling priority (Linux sets it per thread), so work
    that must never slow callers down yields the CPU to them."""

    def __init__(self, threads: int, *, nice: int = 0) -> None:
        def lower_priority() -> None:
            if nice:
                with contextlib.suppress(OSError, AttributeError):
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)

        self.executor = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="inference", initializer=lower_priority
        )
        self.threads = threads
        self.running = 0
        self.waiting: set[asyncio.Event] = set()

    @property
    def full(self) -> bool:
        return self.running >= self.threads

    def release(self) -> None:
        """A batch finished: its thread is free, so batchers waiting to fill a batch go now."""
        self.running -= 1
        for event in self.waiting:
            event.set()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class BatcherStats:
    count: int = 0
    errors: int = 0
    batches: int = 0
    rejected: int = 0


class DynamicBatcher:
    def __init__(
        self,
        runner: Runner | None,
        *,
        max_batch: int = 32,
        max_delay_ms: float = 5.0,
        max_queue: int = 1024,
        concurrency: int = 2,
        preferred_sizes: tuple[int, ...] = (),
        pool: InferencePool | None = None,
        finite_outputs: bool = False,
    ) -> None:
        """`pool`: inference threads shared with other batchers (a gateway serving several
        versions keeps them at the core count instead of oversubscribing), and with them the
        notion of "busy" that decides whether waiting for a fuller batch pays.
        `finite_outputs`: a sample whose floating-point outputs hold NaN or infinity fails with
        `NonFiniteOutputError`, checked for the whole batch in the inference thread."""
        self.finite_outputs = finite_outputs
        self.runner = runner
        self.preferred_sizes = frozenset(preferred_sizes)
        self.max_batch = max_batch
        self.max_delay_s = max_delay_ms / 1000
        self.concurrency = concurrency
        self.pacing_s = 0.0
        self._base_concurrency = concurrency
        self.max_queue = max_queue
        self._queue: deque[tuple[np.ndarray[Any, Any], asyncio.Future[dict[str, Any]]]] = deque()
        self._nonempty = asyncio.Event()
        self._enough = asyncio.Event()  # the batch being gathered can be filled now
        self._want = 0
        self._closed = False
        self._gathering = asyncio.Lock()  # one worker forms a batch while others run theirs
        self._own_pool = pool is None
        self._pool = pool or InferencePool(concurrency)
        self._workers: list[asyncio.Task[None]] = []
        self._latencies: deque[float] = deque(maxlen=2048)
        self.stats = BatcherStats()

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(i)) for i in range(self._base_concurrency)]

    async def stop(self) -> None:
        self._closed = True
        for w in self._workers:
            w.cancel()
        if self._workers:
            await asyncio.wait(self._workers, timeout=10)
        if self._own_pool:
            self._pool.shutdown()

    def set_limits(self, *, max_batch: int, concurrency: int, pacing_ms: float) -> None:
        self.max_batch = max(1, max_batch)
        self.concurrency = max(1, min(concurrency, self._base_concurrency))
        self.pacing_s = pacing_ms / 1000

    def reload(self, runner: Runner | None) -> None:
        """Use `runner` from the next batch on; batches already running finish on the old one.
        None serves nothing (requests are refused as with no model) until the next reload."""
        self.runner = runner

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def latency_ms(self, q: float) -> float | None:
        if not self._latencies:
            return None
        ordered = sorted(self._latencies)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000

    async def infer(self, sample: np.ndarray[Any, Any]) -> dict[str, Any]:
        """One sample (no batch axis) in, that sample's outputs out."""
        return await self.submit(sample)

    def submit(self, sample: np.ndarray[Any, Any]) -> asyncio.Future[dict[str, Any]]:
        """Queue one sample; the future gets its outputs. A caller may fail the future itself
        (a deadline): the batch still runs and its result for that row is dropped."""
        if self.runner is None:
            raise NoModelError("no committed model is active")
        if len(self._queue) >= self.max_queue:
            self.stats.rejected += 1
            raise OverloadedError(f"inference queue is full ({self.max_queue} waiting)")
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((sample, fut))
        self._nonempty.set()
        if self._want and len(self._queue) >= self._want:
            self._enough.set()
        return fut

    def _take(self, items: list[tuple[np.ndarray[Any, Any], asyncio.Future[dict[str, Any]]]]) -> None:
        while self._queue and len(items) < self.max_batch:
            items.append(self._queue.popleft())
        if not self._queue:
            self._nonempty.clear()

    async def _gather(self) -> list[tuple[np.ndarray[Any, Any], asyncio.Future[dict[str, Any]]]]:
        """Wait for a first request; then, while every inference thread is busy, until the
        batch is full, a thread frees up or `max_delay` has passed.

        A constant number of waits per batch, not per request: a request costs a deque append.
        """
        async with self._gathering:
            items: list[tuple[np.ndarray[Any, Any], asyncio.Future[dict[str, Any]]]] = []
            while not items:
                await self._nonempty.wait()
                self._take(items)
            # Waiting only pays while no thread could run the batch anyway: with a thread
            # free, go now; a preferred size goes at once too.
            if (
                len(items) < self.max_batch
                and self.max_delay_s > 0
                and self._pool.full
                and len(items) not in self.preferred_sizes
            ):
                self._want = self.max_batch - len(items)
                self._enough.clear()
                if len(self._queue) < self._want:
                    self._pool.waiting.add(self._enough)
                    try:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._enough.wait(), self.max_delay_s)
                    finally:
                        self._pool.waiting.discard(self._enough)
                self._want = 0
                self._take(items)
            return items

    def _run(self, runner: Runner, batch: np.ndarray[Any, Any]) -> tuple[list[Any], dict[int, str]]:
        """In the inference thread: the batch's outputs, and the rows that are not finite
        (row → output name) when `finite_outputs` is on."""
        outputs = runner.run_batch(batch)
        bad: dict[int, str] = {}
        if self.finite_outputs:
            for name, out in zip(runner.output_names, outputs, strict=True):
                if np.issubdtype(out.dtype, np.floating) and out.ndim and len(out) == len(batch):
                    ok = np.isfinite(out.reshape(len(out), -1)).all(axis=1)
                    for row in np.flatnonzero(~ok):
                        bad.setdefault(int(row), name)
        return outputs, bad

    async def _work(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:  # a flag as well as the cancel: 3.11's wait_for can swallow one
            if index >= self.concurrency:  # throttled: this worker sits out
                await asyncio.sleep(0.05)
                continue
            items = await self._gather()
            runner = self.runner
            t0 = time.perf_counter()
            try:
                if runner is None:
                    raise NoModelError("no committed model is active")
                batch = np.stack([s for s, _ in items])
                self._pool.running += 1
                try:
                    outputs, bad = await loop.run_in_executor(self._pool.executor, self._run, runner, batch)
                finally:
                    self._pool.release()
            except Exception as exc:
                self.stats.errors += len(items)
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            elapsed = time.perf_counter() - t0
            self.stats.batches += 1
            self.stats.count += len(items)
            for row, (_, fut) in enumerate(items):
                self._latencies.append(elapsed)
                if fut.done():
                    continue
                if row in bad:
                    self.stats.errors += 1
                    fut.set_exception(NonFiniteOutputError(f"output {bad[row]!r} is not finite"))
                else:
                    fut.set_result(
                        {name: out[row] for name, out in zip(runner.output_names, outputs, strict=True)}
                    )
            if self.pacing_s:
                await asyncio.sleep(self.pacing_s)
