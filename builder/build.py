"""`tidegate build`: one trained model in, one verified bundle per SKU out.

Order matters for "nothing lost, nothing half-made": every input is checked before any
SKU is built (model, calibration, SKUs, version, output directory, repository); each SKU
is built in its own hidden directory and renamed into place only when complete, so a
refused SKU leaves nothing behind; publishing happens last, and only when every SKU built
(unless a partial publish is asked for).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from builder.catalogue import Catalogue, Sku
from builder.errors import (
    BuildError,
    CalibrationError,
    ModelError,
    OutputDirError,
    SkuBuildError,
    VersionError,
)
from builder.model import ModelInfo, inspect_model, load_calibration, write_npz
from builder.packaging import Artifact, greengrass_recipe, triton_config, update_manifest, write_oci_archive
from builder.runtimes import (
    build_engine,
    check_determinism,
    check_tolerance,
    compare,
    optimise,
    quantise_int8,
    run_model,
    trt_plan,
)
from builder.sbom import make_sbom
from shared.bundle import BundleManifest, collect_payload, manifest_for, write_bundle
from shared.bundle.pack import FIXED_CREATED
from shared.semver import InvalidVersionError, SemVer
from shared.trust import UpdateRepository
from shared.trust.repository import default_target_path
from shared.version import TIDEGATE_VERSION

SELFTEST_SAMPLES = 8
GENERATED_SAMPLES = 32
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"

Progress = Callable[[str, str], None]  # (SKU or "build", step)


@dataclass(frozen=True)
class BuildRequest:
    model: Path
    name: str
    version: str
    skus: list[str]
    out: Path
    calibration: Path | None = None
    repo: Path | None = None
    lineage: dict[str, str] = field(default_factory=dict)
    inference_params: dict[str, Any] = field(default_factory=dict)
    scores_output: str | None = None  # the class-score output for top-1 agreement; default: the first
    artifact_uri_base: str = "s3://tidegate-artifacts"
    repository_url: str = "https://updates.example.com/repo"
    cache_dir: Path = Path.home() / ".cache" / "tidegate" / "tensorrt"
    allow_partial_publish: bool = False


@dataclass
class SkuResult:
    sku: str
    status: str  # "built" or "refused"
    reason: str | None = None
    directory: str | None = None
    bundle: str | None = None
    bundle_sha256: str | None = None
    bundle_size: int | None = None
    agreement: dict[str, Any] | None = None
    build_s: float = 0.0
    published_as: str | None = None


@dataclass
class BuildResult:
    name: str
    version: str
    model_sha256: str
    skus: list[SkuResult]
    published: list[str]

    @property
    def complete(self) -> bool:
        return all(r.status == "built" for r in self.skus)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "complete": self.complete}


def created_time() -> str:
    """Reproducible builds' convention: SOURCE_DATE_EPOCH if set, else a fixed time."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        return FIXED_CREATED
    try:
        return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except ValueError as exc:
        raise BuildError(f"SOURCE_DATE_EPOCH={epoch!r} is not a whole number of seconds") from exc


# ---- checks before anything is built -------------------------------------------------------


def _check_request(
    req: BuildRequest, catalogue: Catalogue
) -> tuple[ModelInfo, list[Sku], dict[str, np.ndarray]]:
    import re

    if not re.match(NAME_PATTERN, req.name):
        raise BuildError(f"name {req.name!r}: 1-64 of [a-z0-9._-], starting with a letter or digit")
    try:
        SemVer.parse(req.version)
    except InvalidVersionError as exc:
        raise VersionError(f"--version: {exc}") from exc
    if not req.skus:
        raise BuildError("name at least one --sku")
    if len(set(req.skus)) != len(req.skus):
        raise BuildError("a SKU is named twice")
    skus = [catalogue.get(s) for s in req.skus]
    if req.out.exists() and (not req.out.is_dir() or any(req.out.iterdir())):
        raise OutputDirError(f"{req.out}: the output directory exists and is not empty")
    info = inspect_model(req.model)
    if req.scores_output is not None and req.scores_output not in {o.name for o in info.outputs}:
        raise ModelError(f"--scores-output {req.scores_output!r} is not an output of the model")
    if req.calibration is not None:
        feeds = load_calibration(req.calibration, info)
    else:
        if needs := [s.name for s in skus if s.precision == "int8"]:
            raise CalibrationError(f"SKU {', '.join(needs)} is int8: pass --calibration DATA.npz")
        feeds = _generated_inputs(info)
    if req.repo is not None:
        _check_newer(UpdateRepository(req.repo), req.name, req.version)
    return info, skus, feeds


def _generated_inputs(info: ModelInfo) -> dict[str, np.ndarray]:
    """Seeded inputs for the checks when no calibration data is given (fp32 SKUs only)."""
    rng = np.random.default_rng(0)
    out = {}
    for spec in info.inputs:
        if any(isinstance(d, str) for d in spec.shape[1:]):
            raise CalibrationError(
                f"input {spec.name!r} has dynamic dimensions {list(spec.shape)}: pass --calibration "
                "with real samples"
            )
        shape = [GENERATED_SAMPLES if isinstance(d, str) else d for d in spec.shape]
        if spec.dtype.startswith("float"):
            out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            out[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
    return out


def _check_newer(repo: UpdateRepository, name: str, version: str) -> None:
    new = SemVer.parse(version)
    for target in repo.published():
        if target.custom.get("name") != name:
            continue
        try:
            old = SemVer.parse(str(target.custom.get("version")))
        except InvalidVersionError:
            continue
        if not new > old:
            raise VersionError(f"{name} {version} is not above {old}, already published as {target.path}")


# ---- one SKU ------------------------------------------------------------------------------------


def _slice(feeds: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in feeds.items()}


def _inference_config(info: ModelInfo, sku: Sku, params: Mapping[str, Any], artifact: str) -> dict[str, Any]:
    def tensors(specs: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in specs]

    return {
        "inputs": tensors(info.inputs),
        "outputs": tensors(info.outputs),
        "model": artifact,
        "runtime": sku.runtime,
        "precision": sku.precision,
        "execution_providers": sku.execution_providers,
        "preprocessing": params.get("preprocessing", {}),
        "postprocessing": params.get("postprocessing", {}),
        "thresholds": params.get("thresholds", {}),
    }


def _build_sku(
    req: BuildRequest,
    info: ModelInfo,
    sku: Sku,
    feeds: dict[str, np.ndarray],
    work: Path,
    created: str,
    say: Progress,
) -> SkuResult:
    t0 = time.perf_counter()
    payload = work / "payload"
    payload.mkdir(parents=True)
    if sku.runtime == "tensorrt":
        say(sku.name, "building a TensorRT engine")
        plan = trt_plan(sku, req.cache_dir)
        artifact = build_engine(req.model, payload / "model.engine", plan)
    elif sku.precision == "int8":
        say(sku.name, "quantising to int8 from the calibration data")
        artifact = quantise_int8(req.model, payload / "model.onnx", feeds)
    else:
        say(sku.name, "optimising the graph")
        artifact = optimise(req.model, payload / "model.onnx")
    say(sku.name, "comparing with the fp32 model")
    reference = run_model(req.model, feeds)
    built = run_model(artifact, feeds)
    scores = req.scores_output or info.outputs[0].name
    agreement = compare(reference, built, scores_output=scores)
    check_tolerance(sku, agreement)
    say(sku.name, "checking determinism")
    golden_in = _slice(feeds, SELFTEST_SAMPLES)
    check_determinism(artifact, golden_in)
    write_npz(payload / "selftest" / "inputs.npz", golden_in)
    write_npz(payload / "selftest" / "outputs.npz", run_model(artifact, golden_in))
    (payload / "inference_config.json").write_text(
        json.dumps(
            _inference_config(info, sku, req.inference_params, artifact.name), indent=2, sort_keys=True
        )
        + "\n"
    )
    triton = payload / "triton" / req.name
    triton.mkdir(parents=True)
    (triton / "config.pbtxt").write_text(triton_config(info, name=req.name, sku=sku))
    artifact_sha = Artifact.of(artifact).sha256
    say(sku.name, "writing the SBOM and provenance")
    (payload / "sbom.cdx.json").write_text(
        make_sbom(
            name=req.name,
            version=req.version,
            sku=sku,
            artifact=artifact.name,
            artifact_sha256=artifact_sha,
            source_sha256=info.sha256,
            created=datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC),
        )
    )
    provenance = {
        "builder": {"name": "tidegate", "version": TIDEGATE_VERSION},
        "created": created,
        "source_model": {
            "file": req.model.name,
            "sha256": info.sha256,
            "size": info.size,
            "opset": info.opset,
            "producer": info.producer,
        },
        "calibration": {"file": req.calibration.name, "sha256": Artifact.of(req.calibration).sha256}
        if req.calibration
        else None,
        "sku": sku.model_dump(mode="json"),
        "artifact": {"file": artifact.name, "sha256": artifact_sha},
        "agreement_with_fp32": agreement.as_dict(),
        "lineage": req.lineage,
    }
    (payload / "provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    say(sku.name, "packing the bundle")
    sources = collect_payload(payload)
    manifest: BundleManifest = manifest_for(
        sources,
        name=req.name,
        version=req.version,
        skus=[sku.name],
        runtime=sku.runtime,
        entry_model=artifact.name,
        latency_budget_ms=sku.latency_budget_ms,
        memory_ceiling_mb=sku.memory_ceiling_mb,
        atol=max(sku.tolerance.max_abs_error, 1e-6),
        rtol=1e-3,
        min_agent_version=sku.min_agent_version,
        created=created,
        lineage={**req.lineage, "source_model_sha256": info.sha256},
    )
    stem = f"{req.name}-{req.version}-{sku.name}"
    bundle_path = work / f"{stem}.bundle"
    write_bundle(bundle_path, manifest, sources, compression="zstd")
    bundle = Artifact.of(bundle_path)
    say(sku.name, "writing the OCI archive, Greengrass recipe and update manifest")
    description = f"{req.name} {req.version} ({sku.runtime}, {sku.precision}) for {sku.name}"
    oci = Artifact.of(
        write_oci_archive(
            work / f"{stem}.oci.tar",
            bundle_path,
            name=req.name,
            version=req.version,
            sku=sku,
            created=created,
            description=description,
        )
    )
    recipe = greengrass_recipe(
        name=req.name,
        version=req.version,
        sku=sku,
        bundle=bundle,
        artifact_uri_base=req.artifact_uri_base,
        repository_url=req.repository_url,
        description=description,
    )
    (work / "greengrass-recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    manifest_doc = update_manifest(
        name=req.name,
        version=req.version,
        sku=sku,
        bundle=bundle,
        oci=oci,
        target_path=default_target_path(manifest),
        artifact_uri_base=req.artifact_uri_base,
    )
    (work / "update-manifest.json").write_text(json.dumps(manifest_doc, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(payload / "sbom.cdx.json", work / "sbom.cdx.json")
    shutil.rmtree(payload)
    return SkuResult(
        sku=sku.name,
        status="built",
        bundle=bundle_path.name,
        bundle_sha256=bundle.sha256,
        bundle_size=bundle.size,
        agreement=agreement.as_dict(),
        build_s=time.perf_counter() - t0,
    )


# ---- the whole build ----------------------------------------------------------------------------


def build(req: BuildRequest, catalogue: Catalogue, *, progress: Progress | None = None) -> BuildResult:
    say: Progress = progress or (lambda sku, step: None)
    info, skus, feeds = _check_request(req, catalogue)
    created = created_time()
    req.out.mkdir(parents=True, exist_ok=True)
    results: list[SkuResult] = []
    for sku in skus:
        work = req.out / f".building-{sku.name}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        t0 = time.perf_counter()
        try:
            result = _build_sku(req, info, sku, feeds, work, created, say)
        except SkuBuildError as exc:
            shutil.rmtree(work, ignore_errors=True)
            say(sku.name, f"refused: {exc}")
            results.append(
                SkuResult(sku=sku.name, status="refused", reason=str(exc), build_s=time.perf_counter() - t0)
            )
            continue
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        final = req.out / sku.name
        work.rename(final)
        result.directory = str(final)
        say(sku.name, f"built {result.bundle} in {result.build_s:.1f} s")
        results.append(result)
    out = BuildResult(req.name, req.version, info.sha256, results, [])
    if req.repo is not None and (out.complete or req.allow_partial_publish):
        repo = UpdateRepository(req.repo)
        for r in results:
            if r.status == "built" and r.directory and r.bundle:
                target = repo.add_bundle(Path(r.directory) / r.bundle).path
                r.published_as = target
                out.published.append(target)
                say(r.sku, f"published as {target}")
    elif req.repo is not None:
        say("build", "nothing published: not every SKU built (--allow-partial-publish publishes the rest)")
    (req.out / "build.json").write_text(
        json.dumps({**out.as_dict(), "built_at": datetime.now(UTC).isoformat(timespec="seconds")}, indent=2)
        + "\n"
    )
    return out
