"""Small, real ONNX models that demos and tests make themselves (no downloads).

The classifier is a dense layer and a softmax with fixed, seeded weights, so
two runs produce the same bytes and the same golden outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _save(graph: onnx.GraphProto, path: Path, *, producer: str = "tidegate") -> Path:
    """Wrap, check and write a sample graph (opset 17, IR 8: what every runtime here reads)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=producer)
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def make_classifier(
    path: Path,
    *,
    features: int = 16,
    classes: int = 4,
    seed: int = 0,
    jitter: float = 0.0,
    dark_penalty: tuple[int, float] | None = None,
    extra_work: int = 0,
) -> Path:
    """Write a ``[N, features] -> [N, classes]`` softmax classifier to `path`.

    `jitter` perturbs the seed's weights (a retrained model that mostly agrees with its
    predecessor); `dark_penalty` = (class, amount) lowers that class's logit when feature 0
    (the scene's brightness) is below -0.5: a candidate that is fine overall but loses recall
    on one class at night, the defect a per-class, per-slice shadow budget exists for.
    `extra_work` adds a hidden layer of that width whose result is multiplied by zero: the
    same answers, computed more slowly (a candidate that is only slower)."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((features, classes)).astype(np.float32)
    bias = rng.standard_normal(classes).astype(np.float32)
    if jitter:
        noise = np.random.default_rng(seed + 10_000)
        weight += (jitter * noise.standard_normal(weight.shape)).astype(np.float32)
        bias += (jitter * noise.standard_normal(bias.shape)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["logits_raw"]),
        helper.make_node("Add", ["logits_raw", "B"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")]
    scores_from = "logits"
    if extra_work:
        wx = rng.standard_normal((features, extra_work)).astype(np.float32)
        wy = rng.standard_normal((extra_work, classes)).astype(np.float32)
        nodes += [
            helper.make_node("MatMul", ["input", "Wx"], ["busy_h"]),
            helper.make_node("Relu", ["busy_h"], ["busy_r"]),
            helper.make_node("MatMul", ["busy_r", "Wy"], ["busy_o"]),
            helper.make_node("Mul", ["busy_o", "zero"], ["busy_z"]),
            helper.make_node("Add", [scores_from, "busy_z"], ["logits_busy"]),
        ]
        inits += [
            numpy_helper.from_array(wx, "Wx"),
            numpy_helper.from_array(wy, "Wy"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ]
        scores_from = "logits_busy"
    if dark_penalty is not None:
        cls, amount = dark_penalty
        shift = np.zeros((1, classes), dtype=np.float32)
        shift[0, cls] = -amount
        nodes += [
            helper.make_node("Slice", ["input", "s0", "s1", "s_axis"], ["brightness"]),
            helper.make_node("Less", ["brightness", "dark_below"], ["dark"]),
            helper.make_node("Cast", ["dark"], ["dark_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["dark_f", "shift"], ["penalty"]),
            helper.make_node("Add", [scores_from, "penalty"], ["logits_dark"]),
        ]
        inits += [
            numpy_helper.from_array(np.array([0], dtype=np.int64), "s0"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "s1"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "s_axis"),
            numpy_helper.from_array(np.array(-0.5, dtype=np.float32), "dark_below"),
            numpy_helper.from_array(shift, "shift"),
        ]
        scores_from = "logits_dark"
    nodes.append(helper.make_node("Softmax", [scores_from], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        initializer=inits,
    )
    return _save(graph, path, producer="tidegate-samples")


def make_mlp(
    path: Path, *, features: int = 256, hidden: int = 512, layers: int = 3, classes: int = 10, seed: int = 0
) -> Path:
    """A ``[N, features] -> [N, classes]`` multi-layer perceptron: enough compute per sample
    that batching and threading show up in benchmarks the way a real model's would."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, width = "input", features
    for i in range(layers):
        w = (rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes += [
            helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"]),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
        ]
        prev, width = f"r{i}", hidden
    wo = (rng.standard_normal((width, classes)) / np.sqrt(width)).astype(np.float32)
    inits.append(numpy_helper.from_array(wo, "Wo"))
    nodes += [
        helper.make_node("MatMul", [prev, "Wo"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        initializer=inits,
    )
    return _save(graph, path)


def make_nan_classifier(path: Path, *, features: int = 16, classes: int = 4, seed: int = 3) -> Path:
    """The classifier's contract with every output NaN (the square root of -(|z| + 1)): a
    broken export that loads and runs, for demos and tests of guardrails and rollback."""
    w = np.random.default_rng(seed).standard_normal((features, classes)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["z"]),
            helper.make_node("Abs", ["z"], ["a"]),
            helper.make_node("Add", ["a", "one"], ["b"]),
            helper.make_node("Neg", ["b"], ["c"]),
            helper.make_node("Sqrt", ["c"], ["probabilities"]),
        ],
        "broken",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        initializer=[
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        ],
    )
    return _save(graph, path)


def make_detector(
    path: Path, *, features: int = 32, hidden: int = 64, classes: int = 3, seed: int = 0
) -> Path:
    """A detector-shaped model with two outputs: ``boxes`` ``[N, 4]`` (sigmoid, normalised
    coordinates) and ``scores`` ``[N, classes]`` (softmax), over one shared hidden layer."""
    rng = np.random.default_rng(seed)

    def weight(name: str, rows: int, cols: int) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32), name
        )

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["image_features", "W1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "Wb"], ["box_logits"]),
            helper.make_node("Sigmoid", ["box_logits"], ["boxes"]),
            helper.make_node("MatMul", ["r", "Ws"], ["score_logits"]),
            helper.make_node("Softmax", ["score_logits"], ["scores"], axis=1),
        ],
        "detector",
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["batch", features])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", classes]),
        ],
        initializer=[weight("W1", features, hidden), weight("Wb", hidden, 4), weight("Ws", hidden, classes)],
    )
    return _save(graph, path)


def make_multibox_detector(
    path: Path,
    *,
    features: int = 32,
    hidden: int = 64,
    boxes: int = 8,
    classes: int = 3,
    seed: int = 0,
    drift: float = 0.0,
    jitter: float = 0.0,
) -> Path:
    """A small detector: ``image_features [N, features]`` → ``boxes [N, boxes, 4]`` (cx, cy,
    w, h in normalised coordinates, w and h at most 0.3) and ``scores [N, boxes, classes]``
    (softmax per box: a box is present when its top score reaches the threshold). `drift`
    moves every box's centre by that much (boxes that drift), `jitter` perturbs the weights."""
    rng = np.random.default_rng(seed)

    def weight(name: str, rows: int, cols: int) -> onnx.TensorProto:
        w = rng.standard_normal((rows, cols)) / np.sqrt(rows)
        if jitter:
            w = w + jitter * np.random.default_rng(seed + 20_000 + rows * cols).standard_normal(w.shape)
        return numpy_helper.from_array((w * (3.0 if name == "Ws" else 1.0)).astype(np.float32), name)

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["image_features", "W1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "Wb"], ["box_flat"]),
            helper.make_node("Reshape", ["box_flat", "box_shape"], ["box_logits"]),
            helper.make_node("Sigmoid", ["box_logits"], ["box_unit"]),
            helper.make_node("Mul", ["box_unit", "box_scale"], ["box_scaled"]),
            helper.make_node("Add", ["box_scaled", "box_offset"], ["boxes"]),
            helper.make_node("MatMul", ["r", "Ws"], ["score_flat"]),
            helper.make_node("Reshape", ["score_flat", "score_shape"], ["score_logits"]),
            helper.make_node("Softmax", ["score_logits"], ["scores"], axis=2),
        ],
        "multibox_detector",
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["batch", features])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", boxes, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", boxes, classes]),
        ],
        initializer=[
            weight("W1", features, hidden),
            weight("Wb", hidden, boxes * 4),
            weight("Ws", hidden, boxes * classes),
            numpy_helper.from_array(np.array([-1, boxes, 4], dtype=np.int64), "box_shape"),
            numpy_helper.from_array(np.array([-1, boxes, classes], dtype=np.int64), "score_shape"),
            numpy_helper.from_array(np.array([1.0, 1.0, 0.3, 0.3], dtype=np.float32), "box_scale"),
            numpy_helper.from_array(np.array([drift, drift, 0.0, 0.0], dtype=np.float32), "box_offset"),
        ],
    )
    return _save(graph, path)


def make_trajectory_model(
    path: Path,
    *,
    features: int = 16,
    points: int = 12,
    seed: int = 0,
    scale: float = 1.0,
    jitter: float = 0.0,
) -> Path:
    """A small trajectory predictor: ``history [N, features]`` → ``trajectory [N, points, 2]``,
    future positions as offsets from the current one (the cumulative sum of predicted
    steps). `scale` stretches every point (1.4: a final displacement 40 % off)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((features, points * 2)) / np.sqrt(features)
    if jitter:
        w = w + jitter * np.random.default_rng(seed + 30_000).standard_normal(w.shape)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["history", "W"], ["steps_flat"]),
            helper.make_node("Reshape", ["steps_flat", "step_shape"], ["steps"]),
            helper.make_node("CumSum", ["steps", "axis"], ["path"]),
            helper.make_node("Mul", ["path", "scale"], ["trajectory"]),
        ],
        "trajectory",
        [helper.make_tensor_value_info("history", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("trajectory", TensorProto.FLOAT, ["batch", points, 2])],
        initializer=[
            numpy_helper.from_array(w.astype(np.float32), "W"),
            numpy_helper.from_array(np.array([-1, points, 2], dtype=np.int64), "step_shape"),
            numpy_helper.from_array(np.array(1, dtype=np.int64), "axis"),
            numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"),
        ],
    )
    return _save(graph, path)


def make_hanging_classifier(path: Path, *, features: int = 16, classes: int = 4, seed: int = 0) -> Path:
    """The classifier's contract behind a loop of 2**62 iterations: a model that loads and
    never answers (a hung export), for tests of suite timeouts and interruption."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((features, classes)).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
        ],
        "spin",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, []),
        ],
        initializer=[numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["trips", "keep_going", "zero"], ["spun"], body=body),
            helper.make_node("Mul", ["spun", "zero"], ["nothing"]),
            helper.make_node("MatMul", ["input", "W"], ["logits"]),
            helper.make_node("Add", ["logits", "nothing"], ["logits_after"]),
            helper.make_node("Softmax", ["logits_after"], ["probabilities"], axis=1),
        ],
        "hanging_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        initializer=[
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(np.array(2**62, dtype=np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "keep_going"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ],
    )
    return _save(graph, path)


def make_memory_hungry_classifier(
    path: Path, *, mb: int, features: int = 16, classes: int = 4, seed: int = 0
) -> Path:
    """The classifier's contract, but each run first fills a tensor of `mb` MiB that depends
    on its input (so no optimiser folds it away): a model over a rig's memory, for tests of
    memory limits. Its outputs are the plain classifier's (the tensor adds a zero)."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((features, classes)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["input"], ["total"], keepdims=0),
            helper.make_node("Mul", ["total", "zero"], ["nought"]),
            helper.make_node("Expand", ["nought", "hunger"], ["big"]),
            helper.make_node("ReduceSum", ["big"], ["big_total"], keepdims=0),
            helper.make_node("Mul", ["big_total", "zero"], ["nothing"]),
            helper.make_node("MatMul", ["input", "W"], ["logits"]),
            helper.make_node("Add", ["logits", "nothing"], ["logits_after"]),
            helper.make_node("Softmax", ["logits_after"], ["probabilities"], axis=1),
        ],
        "memory_hungry_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        initializer=[
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(np.array([mb * 1024 * 1024 // 4], dtype=np.int64), "hunger"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ],
    )
    return _save(graph, path)


def write_selftest(model: Path, out_dir: Path, *, batch: int = 8, seed: int = 1) -> tuple[Path, Path]:
    """Golden inputs and the model's own outputs on them, as ``inputs.npz`` and ``outputs.npz``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in sess.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in inp.shape]
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    names = [o.name for o in sess.get_outputs()]
    outputs = dict(zip(names, sess.run(names, feeds), strict=True))
    out_dir.mkdir(parents=True, exist_ok=True)
    ins, outs = out_dir / "inputs.npz", out_dir / "outputs.npz"
    savez: Any = np.savez  # numpy's stub reads **arrays as its keyword flags
    with ins.open("wb") as fh:
        savez(fh, **feeds)
    with outs.open("wb") as fh:
        savez(fh, **outputs)
    return ins, outs


def write_inference_config(model: Path, path: Path) -> Path:
    """``inference_config.json``: the model's input/output contract as the agent and HIL read it."""
    m = onnx.load(str(model))

    def describe(values: list[onnx.ValueInfoProto]) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for v in values:
            tt = v.type.tensor_type
            dims: list[object] = [d.dim_param or d.dim_value for d in tt.shape.dim]
            out.append(
                {
                    "name": v.name,
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
                    "shape": dims,
                }
            )
        return out

    config = {"inputs": describe(list(m.graph.input)), "outputs": describe(list(m.graph.output))}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def make_sample_payload(directory: Path, *, seed: int = 0, mlp: bool = False) -> Path:
    """A complete bundle payload directory: model, inference config and golden self-test data."""
    model = (make_mlp if mlp else make_classifier)(directory / "model.onnx", seed=seed)
    write_inference_config(model, directory / "inference_config.json")
    write_selftest(model, directory / "selftest")
    return directory
