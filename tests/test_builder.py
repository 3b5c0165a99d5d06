"""`tidegate build`: small real ONNX models in (a classifier and a two-output detector),
per-SKU bundles out, checked the way devices, registries and scanners will check them."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builder.build import BuildRequest, build
from builder.catalogue import DEFAULT_CATALOGUE, Catalogue, Sku, load_catalogue
from builder.errors import (
    CalibrationError,
    CatalogueError,
    GpuRequiredError,
    ModelError,
    OutputDirError,
    ToleranceError,
    VersionError,
)
from builder.runtimes import Agreement, check_tolerance, compare, tensorrt_available, trt_plan
from builder.samples import make_classifier, make_detector
from builder.sbom import validate_sbom
from shared.bundle import read_bundle, verify_bundle
from shared.trust import UpdateRepository

CPU_SKUS = ["edge-cpu-x86", "edge-cpu-arm64-int8"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(model, calibration) for the classifier and the detector."""
    d = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(42)
    out = {}
    for name, make, inp, feat in (
        ("classifier", make_classifier, "input", 16),
        ("detector", make_detector, "image_features", 32),
    ):
        model = make(d / f"{name}.onnx")
        cal = d / f"{name}-cal.npz"
        np.savez(cal, **{inp: rng.standard_normal((64, feat)).astype(np.float32)})
        out[name] = (model, cal)
    return out


def request(model: Path, out: Path, **kw: Any) -> BuildRequest:
    base: dict[str, Any] = {"model": model, "name": "cls", "version": "1.0.0", "skus": CPU_SKUS, "out": out}
    base.update(kw)
    return BuildRequest(**base)


def tree(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


@pytest.mark.parametrize("kind", ["classifier", "detector"])
def test_fp32_and_int8_skus_build_and_pass_the_agents_self_test(
    kind: str, models: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    from agent.selftest import run_selftest

    model, cal = models[kind]
    params = {"postprocessing": {"type": "softmax"}, "thresholds": {"score": 0.5}}
    result = build(
        request(
            model,
            tmp_path / "out",
            name=kind,
            calibration=cal,
            scores_output="scores" if kind == "detector" else None,
            inference_params=params,
            lineage={"training_run": "run-7"},
        ),
        load_catalogue(),
    )
    assert result.complete and [r.sku for r in result.skus] == CPU_SKUS
    fp32, int8 = result.skus
    assert fp32.agreement is not None and fp32.agreement["max_abs_error"] < 1e-5
    assert int8.agreement is not None and 0 < int8.agreement["max_abs_error"] <= 0.05
    assert int8.agreement["top1_agreement"] >= 0.95
    for r in result.skus:
        d = tmp_path / "out" / r.sku
        assert tree(d) == sorted(
            [
                r.bundle or "",
                f"{kind}-1.0.0-{r.sku}.oci.tar",
                "greengrass-recipe.json",
                "sbom.cdx.json",
                "update-manifest.json",
            ]
        )
        bundle = d / (r.bundle or "")
        manifest = verify_bundle(bundle)
        assert manifest.skus == (r.sku,) or list(manifest.skus) == [r.sku]
        assert manifest.provenance.lineage["training_run"] == "run-7"
        slot = tmp_path / f"slot-{r.sku}"
        read_bundle(bundle, slot)
        (slot / "bundle.json").write_bytes(manifest.to_json_bytes())
        selftest = run_selftest(slot)
        assert selftest.passed, selftest.reason
        config = json.loads((slot / "inference_config.json").read_text())
        assert config["thresholds"] == {"score": 0.5} and config["precision"] in ("fp32", "int8")
        assert [o["name"] for o in config["outputs"]] == (
            ["boxes", "scores"] if kind == "detector" else ["probabilities"]
        )
        triton = (slot / "triton" / kind / "config.pbtxt").read_text()
        assert 'platform: "onnxruntime_onnx"' in triton and "max_batch_size: 32" in triton
        validate_sbom((slot / "sbom.cdx.json").read_text())
        prov = json.loads((slot / "provenance.json").read_text())
        assert prov["source_model"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    # the int8 model really is quantised: QDQ nodes around int8 weights
    slot = tmp_path / f"slot-{int8.sku}"
    ops = {n.op_type for n in onnx.load(str(slot / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_bundles_are_byte_identical_across_builds(
    models: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    model, cal = models["classifier"]
    a = build(request(model, tmp_path / "a", calibration=cal), load_catalogue())
    b = build(request(model, tmp_path / "b", calibration=cal), load_catalogue())
    for ra, rb in zip(a.skus, b.skus, strict=True):
        assert ra.bundle_sha256 == rb.bundle_sha256
        for name in (
            "greengrass-recipe.json",
            "update-manifest.json",
            "sbom.cdx.json",
            f"cls-1.0.0-{ra.sku}.oci.tar",
        ):
            assert (tmp_path / "a" / ra.sku / name).read_bytes() == (
                tmp_path / "b" / rb.sku / name
            ).read_bytes()


def _oci_member(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_the_oci_archive_is_a_valid_image_layout(
    models: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    model, _ = models["classifier"]
    build(request(model, tmp_path / "out", skus=["edge-cpu-x86"]), load_catalogue())
    d = tmp_path / "out" / "edge-cpu-x86"
    archive, bundle = d / "cls-1.0.0-edge-cpu-x86.oci.tar", d / "cls-1.0.0-edge-cpu-x86.bundle"
    files = _oci_member(archive)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}

    def blob(digest: str) -> bytes:
        data = files[f"blobs/sha256/{digest.removeprefix('sha256:')}"]
        assert f"sha256:{hashlib.sha256(data).hexdigest()}" == digest  # content-addressed
        return data

    index = json.loads(files["index.json"])
    desc = index["manifests"][0]
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == "1.0.0-edge-cpu-x86"
    manifest = json.loads(blob(desc["digest"]))
    config = json.loads(blob(manifest["config"]["digest"]))
    layer = blob(manifest["layers"][0]["digest"])
    assert config["rootfs"]["diff_ids"] == [manifest["layers"][0]["digest"]]  # uncompressed layer
    with tarfile.open(fileobj=io.BytesIO(layer)) as tf:
        inside = tf.extractfile("tidegate/bundles/cls-1.0.0-edge-cpu-x86.bundle").read()  # type: ignore[union-attr]
    assert inside == bundle.read_bytes()
    assert manifest["annotations"]["dev.tidegate.bundle.sha256"] == hashlib.sha256(inside).hexdigest()
    if shutil.which("skopeo"):  # Debian's skopeo, when present, reads it as any registry tool would
        out = subprocess.run(
            ["skopeo", "inspect", f"oci-archive:{archive}"], capture_output=True, text=True, check=True
        ).stdout
        got = json.loads(out)
        assert got["Architecture"] == "amd64" and got["Labels"]["dev.tidegate.bundle.sku"] == "edge-cpu-x86"
        assert got["Layers"] == [manifest["layers"][0]["digest"]]
    recipe = json.loads((d / "greengrass-recipe.json").read_text())
    artifact = recipe["Manifests"][0]["Artifacts"][0]
    assert recipe["RecipeFormatVersion"] == "2020-01-25" and recipe["ComponentVersion"] == "1.0.0"
    assert artifact["Algorithm"] == "SHA-256" and artifact["URI"].endswith(
        "/cls/1.0.0/cls-1.0.0-edge-cpu-x86.bundle"
    )
    update = json.loads((d / "update-manifest.json").read_text())
    assert update["artifacts"][0] == {
        "kind": "bundle",
        "uri": "tuf:cls/1.0.0/edge-cpu-x86.bundle",
        "sha256": hashlib.sha256(bundle.read_bytes()).hexdigest(),
        "size": bundle.stat().st_size,
    }


def test_tensorrt_skus_are_refused_without_a_gpu_while_the_others_build(
    models: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    if tensorrt_available() is None:
        pytest.skip("this machine can build TensorRT engines; the refusal path is for machines that cannot")
    model, cal = models["classifier"]
    result = build(
        request(model, tmp_path / "out", skus=["edge-cpu-x86", "jetson-orin-fp16"], calibration=cal),
        load_catalogue(),
    )
    assert not result.complete
    built, refused = result.skus
    assert built.status == "built" and refused.status == "refused"
    assert refused.reason is not None and "needs a GPU with TensorRT 10.x" in refused.reason
    assert tree(tmp_path / "out") == sorted(
        [
            "build.json",
            "edge-cpu-x86",
            *[f"edge-cpu-x86/{p}" for p in tree(tmp_path / "out" / "edge-cpu-x86")],
        ]
    )


def test_the_tensorrt_plan_follows_the_sku() -> None:
    cat = load_catalogue()
    jetson = trt_plan(cat.get("jetson-orin-fp16"), Path("/cache"))
    assert jetson.precision_flags == ("FP16",) and jetson.hardware_compatibility is None
    assert jetson.timing_cache == Path("/cache/jetson-orin-fp16.timing-cache") and not jetson.strongly_typed
    cloud = trt_plan(cat.get("cloud-gpu-ampere"), Path("/cache"))
    assert cloud.hardware_compatibility == "AMPERE_PLUS"
    trt11 = cat.get("cloud-gpu-ampere").model_copy(update={"tensorrt_major": 11})
    plan = trt_plan(trt11, Path("/c"))
    assert plan.strongly_typed and plan.precision_flags == ()  # TensorRT 11: no precision flags


def test_tensorrt_engine_build_where_tensorrt_imports(
    models: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    pytest.importorskip("tensorrt")
    from builder.runtimes import build_engine

    plan = trt_plan(load_catalogue().get("cloud-gpu-ampere"), tmp_path / "cache")
    try:
        engine = build_engine(models["classifier"][0], tmp_path / "model.engine", plan)
    except GpuRequiredError as exc:  # tensorrt imports but there is no CUDA device
        assert "needs a GPU with TensorRT" in str(exc)
        return
    assert engine.stat().st_size > 0 and plan.timing_cache.is_file()


def test_publishing_into_the_repository_and_the_version_rule(
    models: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    repo = UpdateRepository.init(tmp_path / "repo")
    model, cal = models["classifier"]
    result = build(request(model, tmp_path / "v1", calibration=cal, repo=repo.dir), load_catalogue())
    assert result.published == ["cls/1.0.0/edge-cpu-x86.bundle", "cls/1.0.0/edge-cpu-arm64-int8.bundle"]
    assert {t.path for t in repo.published()} == set(result.published)
    for version in ("1.0.0", "0.9.0"):
        with pytest.raises(VersionError, match="not above 1.0.0"):
            build(
                request(model, tmp_path / f"v-{version}", version=version, calibration=cal, repo=repo.dir),
                load_catalogue(),
            )
        assert not (tmp_path / f"v-{version}").exists()  # refused before anything was made
    # a refused SKU: nothing is published unless asked
    if tensorrt_available() is not None:
        partial = build(
            request(
                model,
                tmp_path / "v2",
                version="1.1.0",
                skus=["edge-cpu-x86", "jetson-orin-fp16"],
                repo=repo.dir,
            ),
            load_catalogue(),
        )
        assert partial.published == [] and len(repo.published()) == 2


def _bad_model(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "missing"], ["y"])],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path.write_bytes(m.SerializeToString())
    return path


def test_bad_input_is_refused_with_a_clear_reason_and_nothing_made(
    models: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    model, cal = models["classifier"]
    cat = load_catalogue()
    cases: list[tuple[BuildRequest, type[Exception], str]] = [
        (request(_bad_model(tmp_path / "bad.onnx"), tmp_path / "o1"), ModelError, "ONNX checker refuses"),
        (request(tmp_path / "junk.onnx", tmp_path / "o2"), ModelError, "no such model"),
        (request(model, tmp_path / "o3", version="1.0"), VersionError, "not a semantic version"),
        (request(model, tmp_path / "o4", skus=["nope"]), CatalogueError, "unknown SKU 'nope'"),
        (request(model, tmp_path / "o5"), CalibrationError, "is int8: pass --calibration"),
        (
            request(model, tmp_path / "o6", calibration=models["detector"][1]),
            CalibrationError,
            "model's inputs are",
        ),
    ]
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, input=np.zeros((8, 15), np.float32))
    cases.append((request(model, tmp_path / "o7", calibration=wrong), CalibrationError, "axis 1"))
    (tmp_path / "o8").mkdir()
    (tmp_path / "o8" / "keep.txt").write_text("mine")
    cases.append((request(model, tmp_path / "o8", calibration=cal), OutputDirError, "not empty"))
    for req, error, message in cases:
        with pytest.raises(error, match=message):
            build(req, cat)
        if req.out.name != "o8":
            assert not req.out.exists(), req.out
    assert tree(tmp_path / "o8") == ["keep.txt"]


def test_a_sku_that_misses_its_tolerance_leaves_nothing_behind(
    models: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    model, cal = models["classifier"]
    cat = load_catalogue()
    strict = cat.get("edge-cpu-arm64-int8").model_copy(
        update={"name": "strict-int8", "tolerance": cat.get("edge-cpu-x86").tolerance}
    )
    catalogue = Catalogue(skus={**cat.skus, "strict-int8": strict})
    result = build(
        request(model, tmp_path / "out", skus=["edge-cpu-x86", "strict-int8"], calibration=cal), catalogue
    )
    assert [r.status for r in result.skus] == ["built", "refused"]
    assert "differs from the fp32 model by up to" in (result.skus[1].reason or "")
    assert not (tmp_path / "out" / "strict-int8").exists()
    assert not any(p.name.startswith(".building") for p in (tmp_path / "out").iterdir())


def test_agreement_and_tolerance_are_measured_not_assumed() -> None:
    ref = {"scores": np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], np.float32)}
    got = {"scores": np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], np.float32)}
    a = compare(ref, got, scores_output="scores")
    assert a == Agreement(
        max_abs_error=pytest.approx(0.2, abs=1e-6), top1_agreement=pytest.approx(2 / 3), samples=3
    )  # type: ignore[arg-type]
    sku = load_catalogue().get("edge-cpu-arm64-int8")
    with pytest.raises(ToleranceError, match="differs from the fp32 model"):
        check_tolerance(sku, a)
    loose = sku.model_copy(update={"tolerance": sku.tolerance.model_copy(update={"max_abs_error": 0.5})})
    with pytest.raises(ToleranceError, match="top-1 agreement"):
        check_tolerance(loose, a)


def test_the_catalogue_is_checked(tmp_path: Path) -> None:
    assert set(load_catalogue(DEFAULT_CATALOGUE).skus) >= {"edge-cpu-x86", "jetson-orin-fp16"}
    bad = tmp_path / "skus.toml"
    limits = "memory_ceiling_mb = 1\nlatency_budget_ms = 1\ntolerance = { max_abs_error = 1 }\n"
    bad.write_text('[sku.x]\nruntime = "tensorrt"\n' + limits)
    with pytest.raises(CatalogueError, match="SKU 'x'.*tensorrt_major"):
        load_catalogue(bad)
    bad.write_text('[sku.x]\nruntime = "onnxruntime"\nprecision = "fp8"\n' + limits)
    with pytest.raises(CatalogueError, match="precision"):
        load_catalogue(bad)
    with pytest.raises(CatalogueError, match="no such SKU catalogue"):
        load_catalogue(tmp_path / "none.toml")
    assert isinstance(load_catalogue().get("edge-cpu-x86"), Sku)


def test_the_cli_exit_codes_and_json_summary(models: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    model, cal = models["classifier"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tidegate", "build", *args], capture_output=True, text=True, timeout=300
        )

    common = [str(model), "--name", "cls", "--version", "1.0.0", "--calibration", str(cal)]
    ok = run(
        *common,
        "--sku",
        "edge-cpu-x86",
        "--sku",
        "edge-cpu-arm64-int8",
        "--out",
        str(tmp_path / "a"),
        "--json",
    )
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["complete"] and [s["status"] for s in summary["skus"]] == ["built", "built"]
    bad = run(*common, "--sku", "edge-cpu-x86", "--out", str(tmp_path / "a"))
    assert bad.returncode == 2 and "not empty" in bad.stderr
    if tensorrt_available() is not None:
        partial = run(
            *common, "--sku", "edge-cpu-x86", "--sku", "jetson-orin-fp16", "--out", str(tmp_path / "b")
        )
        assert partial.returncode == 3 and "needs a GPU with TensorRT 10.x" in partial.stdout


def test_the_oci_archive_is_streamed_not_held_in_memory(tmp_path: Path) -> None:
    """A bundle is hundreds of megabytes on a build host that builds several SKUs at once: the
    archive is written from disk in chunks, so Python's peak allocation stays a few buffers
    whatever the bundle's size (reading it whole would show up as 3-4 times its size)."""
    import os
    import tracemalloc

    from builder.catalogue import Sku
    from builder.packaging import write_oci_archive

    bundle = tmp_path / "big.bundle"
    with bundle.open("wb") as fh:
        for _ in range(48):
            fh.write(os.urandom(1 << 20))
    sku = Sku(
        name="edge-cpu",
        runtime="onnxruntime",
        memory_ceiling_mb=64,
        latency_budget_ms=5,
        tolerance={"max_abs_error": 0.01},
    )
    tracemalloc.start()
    try:
        out = write_oci_archive(
            tmp_path / "big.oci.tar",
            bundle,
            name="big",
            version="1.0.0",
            sku=sku,
            created="2026-12-02T00:00:00Z",
            description="streamed",
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB while archiving a 48 MiB bundle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bundle", "big.oci.tar"]  # no scratch left
    with tarfile.open(out) as tf:
        names = tf.getnames()
        layer_name = next(
            n for n in names if n.startswith("blobs/sha256/") and tf.getmember(n).size > 1 << 20
        )
        digest = hashlib.sha256()
        with tf.extractfile(layer_name) as layer:  # type: ignore[union-attr]
            while chunk := layer.read(1 << 20):
                digest.update(chunk)
    assert layer_name.endswith(digest.hexdigest())  # the streamed layer is content-addressed


def test_the_sample_model_builds_as_the_cli_says(tmp_path: Path) -> None:
    """`tidegate sample-model` gives a new user something to build before they have a model;
    the command it prints works."""
    import shlex
    import subprocess
    import sys

    def tidegate(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "tidegate", *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)

    made = tidegate("sample-model")
    assert made.returncode == 0 and (tmp_path / "model.onnx").exists()
    suggested = shlex.split(made.stdout.splitlines()[-1])
    assert suggested[:2] == ["tidegate", "build"]
    built = tidegate(*suggested[1:])
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "out" / "edge-cpu-x86" / "classifier-1.0.0-edge-cpu-x86.bundle").exists()
    again = tidegate("sample-model")
    assert again.returncode != 0 and "model.onnx exists" in again.stderr
