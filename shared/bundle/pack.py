"""Pack a payload directory into a bundle: the one place that turns "these files, this
name, version and SKU" into a validated manifest and a deterministic bundle file.

The `tidegate bundle pack` command, the demo, the benchmarks and the tests all
pack through here; the builder adds engines, golden data and SBOMs around it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.bundle.errors import BundleError
from shared.bundle.manifest import BundleManifest
from shared.bundle.writer import Compression, describe_files, write_bundle
from shared.version import TIDEGATE_VERSION

FIXED_CREATED = "1970-01-01T00:00:00Z"


def collect_payload(directory: Path) -> dict[str, Path]:
    """Every regular file under `directory` by its relative POSIX path (links refused)."""
    if not directory.is_dir():
        raise BundleError(f"{directory}: not a directory")
    out: dict[str, Path] = {}
    for p in sorted(directory.rglob("*")):
        if p.is_symlink():
            raise BundleError(f"{p}: links cannot go into a bundle")
        if p.is_file():
            out[p.relative_to(directory).as_posix()] = p
    if not out:
        raise BundleError(f"{directory}: no files to pack")
    return out


def manifest_for(
    sources: Mapping[str, Path],
    *,
    name: str,
    version: str,
    skus: list[str],
    runtime: str = "onnxruntime",
    entry_model: str = "model.onnx",
    inference_config: str = "inference_config.json",
    selftest_inputs: str = "selftest/inputs.npz",
    selftest_outputs: str = "selftest/outputs.npz",
    latency_budget_ms: float = 50.0,
    memory_ceiling_mb: float = 512.0,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    runs: int = 20,
    min_agent_version: str = "0.1.0",
    created: str = FIXED_CREATED,
    lineage: dict[str, str] | None = None,
    **overrides: Any,
) -> BundleManifest:
    """A validated manifest for `sources`; `overrides` replace whole top-level fields.

    `created` defaults to a fixed time so that the same inputs give the same bytes.
    """
    raw: dict[str, Any] = {
        "name": name,
        "version": version,
        "skus": skus,
        "runtime": runtime,
        "entry_model": entry_model,
        "inference_config": inference_config,
        "self_test": {
            "inputs": selftest_inputs,
            "outputs": selftest_outputs,
            "tolerance": {"atol": atol, "rtol": rtol},
            "latency_budget_ms": latency_budget_ms,
            "memory_ceiling_mb": memory_ceiling_mb,
            "runs": runs,
        },
        "files": [f.model_dump() for f in describe_files(sources)],
        "min_agent_version": min_agent_version,
        "provenance": {"builder_version": TIDEGATE_VERSION, "created": created, "lineage": lineage or {}},
    }
    raw.update(overrides)
    return BundleManifest.from_obj(raw, source="bundle settings")


def pack_directory(
    directory: Path, out: Path, *, compression: Compression = "none", **settings: Any
) -> BundleManifest:
    """Pack every file under `directory` into the bundle `out` (see `manifest_for` for settings)."""
    sources = collect_payload(directory)
    manifest = manifest_for(sources, **settings)
    write_bundle(out, manifest, sources, compression=compression)
    return manifest
