"""The model going in: checked, described and digested; the calibration data checked
against it; arrays written as byte-reproducible ``.npz`` files."""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from builder.errors import CalibrationError, ModelError

MIN_OPSET = 13  # the oldest opset the quantiser and TensorRT's ONNX parser both take


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy's name: float32, int64, ...
    shape: tuple[int | str, ...]  # a str is a declared dynamic dimension


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    sha256: str
    size: int
    opset: int
    ir_version: int
    producer: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def _specs(values: list[onnx.ValueInfoProto], what: str) -> tuple[TensorSpec, ...]:
    out = []
    for v in values:
        tt = v.type.tensor_type
        if not v.type.HasField("tensor_type"):
            raise ModelError(f"{what} {v.name!r} is not a tensor")
        dims: list[int | str] = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(d.dim_param)
            else:
                raise ModelError(
                    f"{what} {v.name!r} dimension {i} has neither a size nor a name: declare it "
                    "static or dynamic (a named dim_param) so engines and golden data can be built"
                )
        out.append(TensorSpec(v.name, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name, tuple(dims)))
    return tuple(out)


def inspect_model(path: Path) -> ModelInfo:
    """Load and check `path` (onnx.checker, full check with shape inference)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: no such model file") from exc
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError, onnx its own types
        raise ModelError(f"{path}: not an ONNX model ({exc})") from exc
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: the ONNX checker refuses it: {first}") from exc
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ModelError(
            f"{path}: opset {opset} is outside what the builder supports ({MIN_OPSET}..{newest})"
        )
    initialisers = {i.name for i in model.graph.initializer}
    inputs = _specs([i for i in model.graph.input if i.name not in initialisers], "input")
    if not inputs:
        raise ModelError(f"{path}: the model has no inputs")
    return ModelInfo(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        opset=opset,
        ir_version=model.ir_version,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        inputs=inputs,
        outputs=_specs(list(model.graph.output), "output"),
    )


def load_calibration(path: Path, info: ModelInfo) -> dict[str, np.ndarray]:
    """Arrays named like the model's inputs, matching their dtype, rank and static dims, and
    all with the same number of samples (the first axis)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError as exc:
        raise CalibrationError(f"{path}: no such calibration file") from exc
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise CalibrationError(f"{path}: not a numpy .npz archive ({exc})") from exc
    wanted = {i.name for i in info.inputs}
    if set(arrays) != wanted:
        raise CalibrationError(f"{path}: holds {sorted(arrays)}, the model's inputs are {sorted(wanted)}")
    samples: set[int] = set()
    for spec in info.inputs:
        a = arrays[spec.name]
        if a.dtype.name != spec.dtype:
            raise CalibrationError(f"{path}: {spec.name!r} is {a.dtype.name}, the model takes {spec.dtype}")
        if a.ndim != len(spec.shape):
            raise CalibrationError(
                f"{path}: {spec.name!r} has shape {list(a.shape)}, the model takes rank {len(spec.shape)} "
                f"{list(spec.shape)}"
            )
        for axis, (got, want) in enumerate(zip(a.shape, spec.shape, strict=True)):
            if isinstance(want, int) and got != want:
                raise CalibrationError(
                    f"{path}: {spec.name!r} has shape {list(a.shape)}, the model takes {list(spec.shape)} "
                    f"(axis {axis})"
                )
        if a.shape[0] < 1:
            raise CalibrationError(f"{path}: {spec.name!r} has no samples")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise CalibrationError(f"{path}: {spec.name!r} holds NaN or infinite values")
        samples.add(int(a.shape[0]))
    if len(samples) != 1:
        raise CalibrationError(f"{path}: the inputs have different sample counts {sorted(samples)}")
    return arrays


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """`np.savez`, but reproducible: sorted members with a fixed timestamp, so the same arrays
    give the same bytes (numpy stamps the current time into each zip entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())
    return path
