"""The post-flip self-test, run in a child process.

A child keeps a model that crashes, hangs or eats memory from taking the
agent down with it, and gives an honest peak-memory figure (the child's own
``ru_maxrss``). The child loads the entry model with ONNX Runtime (or
TensorRT when the bundle says so and it is present), checks the golden
outputs within tolerance, then times `runs` inferences for p50/p95.

Run as ``python -m agent.selftest SLOT_DIR``; prints one JSON object.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.bundle import MANIFEST_NAME, BundleManifest, Runtime


@dataclass(frozen=True)
class SelfTestResult:
    passed: bool
    reason: str
    max_abs_error: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    peak_rss_mb: float | None = None
    runs: int = 0
    duration_s: float = 0.0

    def figures(self) -> dict[str, Any]:
        return asdict(self)


def run_selftest(slot_dir: Path, *, timeout_s: float = 300.0) -> SelfTestResult:
    """Run the self-test of the bundle in `slot_dir` in a child process."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "agent.selftest", str(slot_dir)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return SelfTestResult(False, f"self-test did not finish within {timeout_s:g}s")
    elapsed = time.monotonic() - t0
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return SelfTestResult(
            False, f"self-test process exited {proc.returncode}: {tail}", duration_s=elapsed
        )
    try:
        data = json.loads(lines[-1])
    except json.JSONDecodeError:
        return SelfTestResult(False, f"self-test printed no result: {lines[-1][:200]}", duration_s=elapsed)
    data["duration_s"] = elapsed
    return SelfTestResult(**data)


# ---- the child ---------------------------------------------------------------------------------


class _OnnxRunner:
    def __init__(self, model: Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self._sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self._sess.get_outputs()]

    def run(self, feeds: dict[str, Any]) -> list[Any]:
        return list(self._sess.run(self.output_names, feeds))


class _TensorRTRunner:
    """TensorRT 10 runtime path: deserialise the engine, bind by tensor name, execute_async_v3."""

    def __init__(self, engine_path: Path) -> None:
        import pycuda.autoinit  # noqa: F401  (creates the CUDA context)
        import pycuda.driver as cuda
        import tensorrt as trt

        self._cuda = cuda
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        self._engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise RuntimeError(f"{engine_path.name}: TensorRT could not deserialise the engine")
        self._ctx = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self.output_names = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._trt = trt

    def run(self, feeds: dict[str, Any]) -> list[Any]:
        import numpy as np

        cuda, trt = self._cuda, self._trt
        buffers = []
        for name, array in feeds.items():
            self._ctx.set_input_shape(name, array.shape)
            dev = cuda.mem_alloc(array.nbytes)
            cuda.memcpy_htod_async(dev, np.ascontiguousarray(array), self._stream)
            self._ctx.set_tensor_address(name, int(dev))
            buffers.append(dev)
        outs = []
        for name in self.output_names:
            shape = tuple(self._ctx.get_tensor_shape(name))
            host = np.empty(shape, dtype=trt.nptype(self._engine.get_tensor_dtype(name)))
            dev = cuda.mem_alloc(host.nbytes)
            self._ctx.set_tensor_address(name, int(dev))
            outs.append((host, dev))
            buffers.append(dev)
        self._ctx.execute_async_v3(self._stream.handle)
        for host, dev in outs:
            cuda.memcpy_dtoh_async(host, dev, self._stream)
        self._stream.synchronize()
        return [h for h, _ in outs]


def _peak_rss_mb() -> float:
    """This process's own peak RSS. /proc/self/status VmHWM belongs to the current address
    space; `ru_maxrss` does not: Linux carries the parent's high-water mark across fork/vfork
    and exec, so a child of a large agent (or test runner) would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _percentile(sorted_ms: list[float], q: float) -> float:
    import math

    return sorted_ms[max(0, math.ceil(q * len(sorted_ms)) - 1)]


def selftest_in_process(slot_dir: Path) -> SelfTestResult:
    import numpy as np

    manifest = BundleManifest.from_json_bytes((slot_dir / MANIFEST_NAME).read_bytes())
    spec = manifest.self_test
    model = slot_dir / manifest.entry_model
    try:
        if manifest.runtime is Runtime.TENSORRT:
            try:
                runner: _OnnxRunner | _TensorRTRunner = _TensorRTRunner(model)
            except ImportError as exc:
                return SelfTestResult(False, f"runtime tensorrt is not available on this device ({exc})")
        else:
            runner = _OnnxRunner(model)
    except Exception as exc:  # the runtime's own load errors, whatever their type
        return SelfTestResult(False, f"model failed to load: {str(exc).splitlines()[0][:300]}")
    with np.load(slot_dir / spec.inputs) as f:
        feeds = {k: f[k] for k in f.files}
    with np.load(slot_dir / spec.outputs) as f:
        golden = {k: f[k] for k in f.files}
    try:
        got = dict(zip(runner.output_names, runner.run(feeds), strict=True))
    except Exception as exc:
        return SelfTestResult(
            False, f"inference failed on the golden inputs: {str(exc).splitlines()[0][:300]}"
        )
    worst = 0.0
    for name, want in golden.items():
        if name not in got:
            return SelfTestResult(False, f"model has no output {name!r} that the golden data expects")
        have = got[name]
        if have.shape != want.shape:
            return SelfTestResult(False, f"output {name!r}: shape {have.shape}, golden {want.shape}")
        err = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
        worst = max(worst, err)
        if not np.allclose(have, want, atol=spec.tolerance.atol, rtol=spec.tolerance.rtol):
            return SelfTestResult(
                False,
                f"output {name!r} differs from the golden output (max abs error {err:.3g}, "
                f"atol {spec.tolerance.atol:g}, rtol {spec.tolerance.rtol:g})",
                max_abs_error=worst,
            )
    times = []
    for _ in range(spec.runs):
        t0 = time.perf_counter()
        runner.run(feeds)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    p50, p95 = _percentile(times, 0.5), _percentile(times, 0.95)
    peak = _peak_rss_mb()

    def result(passed: bool, reason: str) -> SelfTestResult:
        return SelfTestResult(passed, reason, worst, p50, p95, peak, spec.runs)

    if p95 > spec.latency_budget_ms:
        return result(False, f"p95 latency {p95:.3g} ms is above the budget of {spec.latency_budget_ms:g} ms")
    if peak > spec.memory_ceiling_mb:
        return result(
            False, f"peak memory {peak:.0f} MB is above the ceiling of {spec.memory_ceiling_mb:g} MB"
        )
    return result(True, "golden outputs match; latency and memory within budget")


if __name__ == "__main__":
    result = selftest_in_process(Path(sys.argv[1]))
    print(json.dumps(asdict(result)))
