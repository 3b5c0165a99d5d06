"""Agent install throughput and memory: 256 MiB and 1 GiB bundles from a local repository.

Install time (download + verify + write + verify slot + fsync, self-test
excluded) is quoted as a ratio to one `sha256sum` pass over the same bundle
in the same run; the agent's peak RSS for both sizes shows whether memory is
flat in bundle size; flip-to-commit is the self-test and commit of a small
model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import best_of, print_table, write_result
from builder.samples import make_sample_payload
from shared.bundle import pack_directory
from shared.trust import UpdateRepository


def _bundle(work: Path, size_mb: int) -> Path:
    payload = make_sample_payload(work / f"payload-{size_mb}")
    with (payload / "weights.bin").open("wb") as fh:
        block = os.urandom(1 << 20)
        for i in range(size_mb):
            fh.write(block[i % 7 :] + block[: i % 7])  # distinct blocks, cheap to make
    out = work / f"bench-{size_mb}.bundle"
    pack_directory(
        payload,
        out,
        name="bench",
        version=f"{size_mb}.0.0",
        skus=["bench"],
        latency_budget_ms=100.0,
        memory_ceiling_mb=2048.0,
    )
    shutil.rmtree(payload)
    return out


def _agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidegate", "agent", *args], capture_output=True, text=True, check=True
    )


def run(sizes_mb: list[int]) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-install-", dir=os.environ.get("TMPDIR")) as tmp:
        work = Path(tmp)
        repo = UpdateRepository.init(work / "repo")
        for size in sizes_mb:
            bundle = _bundle(work, size)
            published = repo.add_bundle(bundle)
            sha = best_of(
                lambda b=bundle: subprocess.run(
                    ["sha256sum", str(b)],
                    check=True,  # type: ignore[misc]
                    capture_output=True,
                ),
                repeat=2,
            )
            device = work / f"device-{size}"
            _agent(
                "provision",
                "--root",
                str(device),
                "--device-id",
                f"bench-{size}",
                "--sku",
                "bench",
                "--trusted-root",
                str(repo.metadata_dir / "1.root.json"),
                "--reserve-mb",
                "0",
            )
            t0 = time.perf_counter()
            _agent(
                "install", "--root", str(device), "--repo", str(repo.dir), "--target", published.path, "-q"
            )
            wall = time.perf_counter() - t0
            st = json.loads(_agent("status", "--root", str(device), "--json").stdout)
            fig = st["last_result"]["figures"]
            install = fig["download_s"] + fig["verify_s"] + fig["write_s"]
            mb = bundle.stat().st_size / (1 << 20)
            rows.append(
                {
                    "bundle MiB": round(mb),
                    "sha256sum s": sha,
                    "install s (no self-test)": install,
                    "x sha256sum": install / sha,
                    "download s": fig["download_s"],
                    "verify s": fig["verify_s"],
                    "write+verify slot s": fig["write_s"],
                    "flip->commit s": fig["flip_to_commit_s"],
                    "agent peak RSS MiB": fig["agent_peak_rss_mb"],
                    "wall s": wall,
                }
            )
            shutil.rmtree(device)
            bundle.unlink()
    rss = [r["agent peak RSS MiB"] for r in rows]
    notes = f"sizes {sizes_mb} MiB; RSS spread {100 * (max(rss) - min(rss)) / min(rss):.1f}% (goal <= 10%)"
    write_result("agent_install", rows, notes=notes)
    print_table("agent install from a local repository (goal: <= 3x one sha256sum pass)", rows)
    print(f"  {notes}")
    return rows
