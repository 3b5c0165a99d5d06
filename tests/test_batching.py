"""The shared dynamic batcher's scheduling and guardrails (the agent's and the gateway's)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from shared.batching import DynamicBatcher, InferencePool, NonFiniteOutputError, OnnxModelRunner


def _sqrt_model(path: Path) -> Path:
    """y = sqrt(x): NaN exactly for the rows with a negative input, a real ONNX graph."""
    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["x"], ["y"])],
        "sqrt",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


class _Held:
    """A runner that holds its inference thread until released: a long batch in progress."""

    def __init__(self) -> None:
        self.input_name, self.output_names = "x", ["y"]
        self.started = threading.Event()
        self.release = threading.Event()

    def run_batch(self, batch: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
        self.started.set()
        self.release.wait(30)
        return [batch]


def test_only_the_rows_with_non_finite_outputs_fail(tmp_path: Path) -> None:
    runner = OnnxModelRunner(_sqrt_model(tmp_path / "sqrt.onnx"))

    async def go() -> list[Any]:
        b = DynamicBatcher(runner, max_batch=8, max_delay_ms=50, concurrency=1, finite_outputs=True)
        futures = [b.submit(np.full(4, v, np.float32)) for v in (4.0, -1.0, 9.0, -4.0)]
        b.start()  # all four in one batch
        try:
            return await asyncio.gather(*futures, return_exceptions=True)
        finally:
            await b.stop()

    good, bad, good2, bad2 = asyncio.run(go())
    np.testing.assert_allclose(good["y"], [2.0] * 4)
    np.testing.assert_allclose(good2["y"], [3.0] * 4)
    for err in (bad, bad2):
        assert isinstance(err, NonFiniteOutputError) and "output 'y' is not finite" in str(err)


def test_without_the_guardrail_non_finite_outputs_are_answered(tmp_path: Path) -> None:
    runner = OnnxModelRunner(_sqrt_model(tmp_path / "sqrt.onnx"))

    async def go() -> dict[str, Any]:
        b = DynamicBatcher(runner, max_batch=8, concurrency=1)
        b.start()
        try:
            return await b.infer(np.full(4, -1.0, np.float32))
        finally:
            await b.stop()

    assert np.isnan(asyncio.run(go())["y"]).all()


@pytest.mark.parametrize("busy_threads", [1, 2])
def test_a_batch_waits_for_company_only_while_every_thread_is_busy(tmp_path: Path, busy_threads: int) -> None:
    """With a thread free a lone request goes at once; with all busy it goes the moment one
    frees up, not after the (here very long) maximum delay."""
    runner = OnnxModelRunner(_sqrt_model(tmp_path / "sqrt.onnx"))

    async def go() -> tuple[float, float]:
        pool = InferencePool(2)
        held = [_Held() for _ in range(busy_threads)]
        blockers = [DynamicBatcher(h, max_batch=1, concurrency=1, pool=pool) for h in held]
        b = DynamicBatcher(runner, max_batch=32, max_delay_ms=20_000, concurrency=1, pool=pool)
        for x in (*blockers, b):
            x.start()
        pending = [x.submit(np.zeros(4, np.float32)) for x in blockers]
        for h in held:
            await asyncio.to_thread(h.started.wait, 10)
        t0 = time.perf_counter()
        answer = asyncio.ensure_future(b.infer(np.ones(4, np.float32)))
        await asyncio.sleep(0.3)
        early = answer.done()
        held[0].release.set()  # one thread frees up
        await asyncio.wait_for(answer, 10)
        elapsed = time.perf_counter() - t0
        for h in held:
            h.release.set()
        await asyncio.gather(*pending)
        for x in (*blockers, b):
            await x.stop()
        pool.shutdown()
        return float(early), elapsed

    early, elapsed = asyncio.run(go())
    if busy_threads == 1:
        assert early  # a free thread: no waiting for a fuller batch
    else:
        assert not early  # every thread busy: it waited for company ...
        assert elapsed < 10  # ... until a thread freed up, far short of the 20 s maximum delay
