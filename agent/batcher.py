"""The agent's local inference: the shared dynamic batcher over the active slot's model."""

from __future__ import annotations

from pathlib import Path

from shared.batching import DynamicBatcher, NoModelError, OnnxModelRunner, OverloadedError, Runner
from shared.bundle import MANIFEST_NAME, BundleManifest

__all__ = ["DynamicBatcher", "NoModelError", "OnnxRunner", "OverloadedError", "Runner"]


class OnnxRunner(OnnxModelRunner):
    """The active slot's entry model in ONNX Runtime (first input batched)."""

    def __init__(self, slot_dir: Path, *, threads: int = 1) -> None:
        manifest = BundleManifest.from_json_bytes((slot_dir / MANIFEST_NAME).read_bytes())
        super().__init__(slot_dir / manifest.entry_model, threads=threads, version=manifest.version)
