"""Test helpers: build real bundles and hand-crafted hostile tar files."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.bundle import BundleManifest, pack, write_bundle


def manifest_for(sources: dict[str, Path], **overrides: object) -> BundleManifest:
    """The test suite's default bundle: classifier 1.0.0 for edge-cpu; `overrides` replace fields."""
    settings: dict[str, Any] = {"name": "classifier", "version": "1.0.0", "skus": ["edge-cpu"]}
    for key in ("name", "version", "skus"):
        if key in overrides:
            settings[key] = overrides.pop(key)
    return pack.manifest_for(sources, created="2026-01-01T00:00:00Z", **settings, **overrides)


def payload_sources(payload: Path) -> dict[str, Path]:
    return {p.relative_to(payload).as_posix(): p for p in sorted(payload.rglob("*")) if p.is_file()}


def self_test(
    *, latency_budget_ms: float = 200.0, memory_ceiling_mb: float = 1024.0, runs: int = 5
) -> dict[str, Any]:
    """A bundle's `self_test` over a sample payload's golden data, with these budgets."""
    return {
        "inputs": "selftest/inputs.npz",
        "outputs": "selftest/outputs.npz",
        "latency_budget_ms": latency_budget_ms,
        "memory_ceiling_mb": memory_ceiling_mb,
        "runs": runs,
    }


def build_bundle(payload: Path, out: Path, *, compression: str = "none", **overrides: object) -> Path:
    sources = payload_sources(payload)
    write_bundle(out, manifest_for(sources, **overrides), sources, compression=compression)  # type: ignore[arg-type]
    return out


@dataclass
class Member:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    size: int | None = None  # header size when it must lie about the body


def raw_tar(out: Path, members: Iterable[Member]) -> Path:
    """Write a tar with exactly these members, however hostile."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.type
            info.linkname = m.linkname
            info.size = len(m.data) if m.type == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(m.data) if m.type == tarfile.REGTYPE else None)
    return out


def manifest_bytes(files: dict[str, bytes], **overrides: object) -> bytes:
    """A valid bundle.json for in-memory payload `files` (paths referenced must exist)."""
    import hashlib

    raw: dict[str, object] = {
        "format_version": 1,
        "name": "classifier",
        "version": "1.0.0",
        "skus": ["edge-cpu"],
        "runtime": "onnxruntime",
        "entry_model": "model.onnx",
        "inference_config": "inference_config.json",
        "self_test": {
            "inputs": "selftest/inputs.npz",
            "outputs": "selftest/outputs.npz",
            "latency_budget_ms": 50.0,
            "memory_ceiling_mb": 512.0,
        },
        "files": [
            {"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
            for p, d in sorted(files.items())
        ],
        "provenance": {"builder_version": "0.1.0", "created": "2026-01-01T00:00:00Z"},
    }
    raw.update(overrides)
    return json.dumps(raw).encode()


BASIC_FILES = {
    "model.onnx": b"model-bytes" * 10,
    "inference_config.json": b"{}",
    "selftest/inputs.npz": b"in",
    "selftest/outputs.npz": b"out",
}


class ServedApp:
    """An ASGI app on a real socket (uvicorn in a thread), for tests that need real HTTP."""

    def __init__(self, app: object, port: int) -> None:
        import uvicorn

        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> ServedApp:
        self.thread.start()
        while not self.server.started:
            threading.Event().wait(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


# ---- the cloud gateway's test models -----------------------------------------------------------

KEY, ADMIN = "tgk_caller", "tgk_admin"


def caller(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def write_serving_models(d: Path) -> Path:
    """Two classifiers, a NaN-emitting one and a serving.toml over them (keys KEY, ADMIN)."""
    from builder.samples import make_classifier, make_nan_classifier
    from cloud_serving.app import _hash

    make_classifier(d / "v1.onnx", seed=0)
    make_classifier(d / "v2.onnx", seed=1)
    make_nan_classifier(d / "bad.onnx")
    (d / "serving.toml").write_text(
        f"""
[gateway]
api_keys_sha256 = ["{_hash(KEY)}"]
admin_keys_sha256 = ["{_hash(ADMIN)}"]
max_body_bytes = 4096
failure_dir = "failures"

[models.classifier]
production = "1.0.0"
versions."1.0.0".path = "v1.onnx"
versions."1.1.0".path = "v2.onnx"
versions."9.9.9-bad".path = "bad.onnx"

[models.guarded]
production = "bad"
versions.bad.path = "bad.onnx"
fallback = {{ outputs = {{ probabilities = [0.25, 0.25, 0.25, 0.25] }} }}

[models.unguarded]
production = "bad"
versions.bad.path = "bad.onnx"
"""
    )
    return d


def bench_report(bundle: Path, sku: str, key: Any, **overrides: Any) -> dict[str, Any]:
    """A complete, passing bench report for `bundle` on `sku`, signed with `key` (what
    `tidegate hil run` writes): `overrides` replace top-level members before signing."""
    import hashlib

    from shared.benchreport import REQUIRED_SUITES, sign

    report: dict[str, Any] = {
        "bundle": {
            "name": "classifier",
            "version": "1.0.0",
            "sha256": hashlib.sha256(bundle.read_bytes()).hexdigest(),
        },
        "sku": sku,
        "target": "local",
        "suite": "full",
        "started_at": "2026-12-01T00:00:00+00:00",
        "started": True,
        "complete": True,
        "preflight": {
            "verdict": "passed",
            "checks": [{"name": "architecture", "passed": True, "detail": "amd64"}],
        },
        "rig": {"machine": "x86_64", "thermal_source": "thermal zones"},
        "results": [
            {
                "name": n,
                "status": "passed",
                "reason": "ok",
                "figures": {"simulated": False} if n == "thermal" else {},
            }
            for n in REQUIRED_SUITES
        ],
        "summary": {"passed": True},
    }
    report.update(overrides)
    return sign(report, key) if key is not None else report
