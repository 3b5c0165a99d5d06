"""Turning the fp32 ONNX model into the artifact a SKU runs, and judging the result.

* ONNX Runtime SKUs: the graph optimised offline (saved to disk, so devices skip that
  work at load) and, for int8, statically quantised (QDQ) from the calibration data.
* TensorRT SKUs: a serialized engine through the TensorRT Python API, with the SKU's
  precision flags, its hardware-compatibility level and a timing cache kept per SKU
  (tactic replay makes rebuilds fast and repeatable). `trt_plan` is the pure part and is
  tested everywhere; `build_engine` needs `tensorrt` and a GPU and says so when either is
  missing.
* `compare` and `check_determinism` run the built artifact against the fp32 model.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from builder.catalogue import Sku
from builder.errors import GpuRequiredError, NondeterministicError, SkuBuildError, ToleranceError

CALIBRATION_BATCH = 8


# ---- ONNX Runtime ----------------------------------------------------------------------------


def _session(model: Path, *, threads: int = 1) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads  # one thread: bit-reproducible reductions
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def run_model(model: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name, from a fresh single-threaded CPU session."""
    sess = _session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds)), strict=True))


def optimise(model: Path, out: Path) -> Path:
    """Extended (hardware-independent) graph optimisations, saved to `out`: constant folding,
    node fusions, redundant node removal. `ORT_ENABLE_ALL` would bake in this CPU's layouts."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(out)
    so.log_severity_level = 3
    ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    if not out.is_file():
        raise SkuBuildError(f"ONNX Runtime did not write the optimised model to {out}")
    return out


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over the calibration arrays."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        n = next(iter(arrays.values())).shape[0]
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [
                {k: v[i : i + CALIBRATION_BATCH] for k, v in arrays.items()}
                for i in range(0, n, CALIBRATION_BATCH)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantise_int8(model: Path, out: Path, calibration: Mapping[str, np.ndarray]) -> Path:
    """Static int8 quantisation (QDQ, per-channel weights, MinMax calibration) from the
    calibration data, after the quantiser's own pre-processing (shape inference).

    Weights are unsigned (U8U8): x86 CPUs without VNNI compute u8s8 products with an
    instruction that saturates (ONNX Runtime's documented caveat), so a signed-weight artifact
    measured on an AVX2 build host differed from fp32 by 0.47 where a VNNI host saw 0.02.
    U8U8 keeps all 8 bits and gives the same figures on every host (0.03 here); 7-bit signed
    weights (`reduce_range`) also avoid the saturation but cost a bit of precision."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="tidegate-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
        reader = _Reader(calibration)
        CalibrationDataReader.register(_Reader)
        quantize_static(
            str(prepared),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QUInt8,
            calibration_cache_path=Path(tmp) / "calibration.cache",
        )
    return out


# ---- TensorRT --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrtPlan:
    """Everything the TensorRT build decides from the SKU, before touching TensorRT."""

    sku: str
    tensorrt_major: int
    precision_flags: tuple[str, ...]  # BuilderFlag names (TensorRT 10); empty on 11 (strong typing)
    hardware_compatibility: str | None  # HardwareCompatibilityLevel name, or None
    workspace_bytes: int
    timing_cache: Path
    strongly_typed: bool


def trt_plan(sku: Sku, cache_dir: Path) -> TrtPlan:
    major = sku.tensorrt_major or 10
    if major >= 11:
        flags: tuple[str, ...] = ()  # TensorRT 11: no precision flags; the network's types rule
    else:
        flags = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}[sku.precision]
    level = {"none": None, "ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}
    return TrtPlan(
        sku=sku.name,
        tensorrt_major=major,
        precision_flags=flags,
        hardware_compatibility=level[sku.hardware_compatibility],
        workspace_bytes=int(min(sku.memory_ceiling_mb, 4096) * 1024 * 1024),
        timing_cache=cache_dir / f"{sku.name}.timing-cache",
        strongly_typed=major >= 11,
    )


def tensorrt_available() -> str | None:
    """Why TensorRT cannot build here, or None when it can (the module and a CUDA device)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed (pip install 'tidegate[gpu]')"
    try:
        import tensorrt as trt

        if trt.Builder(trt.Logger(trt.Logger.ERROR)) is None:
            return "TensorRT found no CUDA device"
    except Exception as exc:  # no driver, no device: TensorRT raises from the constructor
        return f"TensorRT cannot start ({exc})"
    return None


def build_engine(model: Path, out: Path, plan: TrtPlan) -> Path:
    """Serialize a TensorRT engine for `plan` (TensorRT 10 or 11 Python API)."""
    why = tensorrt_available()
    if why is not None:
        raise GpuRequiredError(f"SKU {plan.sku} needs a GPU with TensorRT {plan.tensorrt_major}.x: {why}")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SkuBuildError(f"SKU {plan.sku}: TensorRT's ONNX parser refused the model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for name in plan.precision_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if plan.hardware_compatibility is not None:
        config.hardware_compatibility_level = getattr(
            trt.HardwareCompatibilityLevel, plan.hardware_compatibility
        )
    cached = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
    cache = config.create_timing_cache(cached)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SkuBuildError(f"SKU {plan.sku}: TensorRT could not build an engine (see its log above)")
    plan.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    plan.timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    out.write_bytes(bytes(serialized))
    return out


# ---- judging the artifact -------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    max_abs_error: float
    top1_agreement: float | None  # on the class-score output, when there is one
    samples: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "max_abs_error": self.max_abs_error,
            "top1_agreement": self.top1_agreement,
            "samples": self.samples,
        }


def compare(
    reference: Mapping[str, np.ndarray], built: Mapping[str, np.ndarray], *, scores_output: str | None
) -> Agreement:
    worst = 0.0
    for name, ref in reference.items():
        got = built[name]
        if got.shape != ref.shape:
            raise SkuBuildError(f"output {name!r} changed shape: {list(ref.shape)} -> {list(got.shape)}")
        if ref.size:
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))))
    top1 = None
    if scores_output is not None and reference[scores_output].ndim >= 2:
        ref, got = reference[scores_output], built[scores_output]
        top1 = float(np.mean(np.argmax(ref, axis=-1) == np.argmax(got, axis=-1)))
    samples = int(next(iter(reference.values())).shape[0]) if reference else 0
    return Agreement(worst, top1, samples)


def check_tolerance(sku: Sku, agreement: Agreement) -> None:
    tol = sku.tolerance
    if agreement.max_abs_error > tol.max_abs_error:
        raise ToleranceError(
            f"SKU {sku.name}: the {sku.precision} artifact differs from the fp32 model by up to "
            f"{agreement.max_abs_error:.3g} (tolerance {tol.max_abs_error:.3g})"
        )
    if agreement.top1_agreement is not None and agreement.top1_agreement < tol.min_top1_agreement:
        raise ToleranceError(
            f"SKU {sku.name}: top-1 agreement with the fp32 model is {agreement.top1_agreement:.3f} "
            f"(needs {tol.min_top1_agreement:.3f})"
        )


def check_determinism(model: Path, feeds: Mapping[str, np.ndarray]) -> None:
    """Two fresh sessions, same inputs: outputs must be bit-identical."""
    a, b = run_model(model, feeds), run_model(model, feeds)
    for name in a:
        if not np.array_equal(a[name], b[name]):
            raise NondeterministicError(f"two runs of the built artifact disagree on output {name!r}")
