"""Bundle reader throughput: verify (hash every member) and extract, as ratios to
one `sha256sum` pass over the same file in the same run."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.common import best_of, print_table, write_result
from shared.bundle import pack_directory, read_bundle, verify_bundle


def _make_bundle(workdir: Path, size_mb: int) -> Path:
    payload = workdir / "payload"
    (payload / "selftest").mkdir(parents=True)
    with (payload / "model.onnx").open("wb") as fh:
        for _ in range(size_mb):
            fh.write(os.urandom(1 << 20))
    (payload / "inference_config.json").write_text("{}")
    (payload / "selftest" / "inputs.npz").write_bytes(b"i")
    (payload / "selftest" / "outputs.npz").write_bytes(b"o")
    out = workdir / "bench.bundle"
    pack_directory(payload, out, name="bench", version="1.0.0", skus=["bench"])
    shutil.rmtree(payload)
    return out


def run(size_mb: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-") as tmp:
        work = Path(tmp)
        bundle = _make_bundle(work, size_mb)
        sha = best_of(lambda: subprocess.run(["sha256sum", str(bundle)], check=True, capture_output=True))
        verify = best_of(lambda: verify_bundle(bundle))

        def extract() -> None:
            dest = work / "slot"
            if dest.exists():
                shutil.rmtree(dest)
            dest.mkdir()
            read_bundle(bundle, dest, fsync=True)

        ext = best_of(extract)
        mb = bundle.stat().st_size / (1 << 20)
        rows = [
            {"case": "sha256sum (baseline)", "MiB": mb, "seconds": sha, "MiB/s": mb / sha, "x baseline": 1.0},
            {
                "case": "verify_bundle",
                "MiB": mb,
                "seconds": verify,
                "MiB/s": mb / verify,
                "x baseline": verify / sha,
            },
            {
                "case": "read_bundle+extract+fsync",
                "MiB": mb,
                "seconds": ext,
                "MiB/s": mb / ext,
                "x baseline": ext / sha,
            },
        ]
    write_result("bundle_read", rows, notes=f"{size_mb} MiB random payload, best of 3")
    print_table(f"bundle reader, {size_mb} MiB (ratio to one sha256sum pass; lower is better)", rows)
    return rows
