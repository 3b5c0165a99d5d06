"""A world for agent tests: a repository with good, bad and hostile bundles, and a
device root with version 1.0.0 committed. Built once per session; tests copy it."""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tuf.api.metadata import Metadata, MetaFile, TargetFile

from agent.device import DeviceConfig, DeviceRoot
from agent.engine import Agent
from agent.faults import ENV
from agent.state import SlotStatus
from shared.bundle import BundleManifest, verify_tree
from shared.trust import UpdateRepository
from shared.trust.repository import CUSTOM_KEY
from tests.helpers import build_bundle, self_test

SKU = "edge-cpu"


@dataclass
class World:
    repo: Path
    device: Path
    bundles: dict[str, Path]
    targets: dict[str, str]

    def copy(self, dest: Path, *, repo: bool = False) -> tuple[Path, Path]:
        """A private copy of the device (and, when asked, of the repository)."""
        device = dest / "device"
        shutil.copytree(self.device, device, symlinks=True)
        repo_dir = self.repo
        if repo:
            repo_dir = dest / "repo"
            shutil.copytree(self.repo, repo_dir, symlinks=True)
        return device, repo_dir


def _variant(base: Path, dest: Path, *, bad_golden: bool = False, garbage_model: bool = False) -> Path:
    shutil.copytree(base, dest)
    if bad_golden:
        out = dest / "selftest" / "outputs.npz"
        with np.load(out) as f:
            arrays = {k: f[k] + 0.5 for k in f.files}
        with out.open("wb") as fh:
            np.savez(fh, **arrays)
    if garbage_model:
        (dest / "model.onnx").write_bytes(b"this is not an onnx model" * 10)
    return dest


def sign_raw_target(repo: UpdateRepository, path: str, file: Path, custom: dict[str, Any]) -> None:
    """Publish `file` without the repository's bundle checks: what a stolen release key allows."""
    digest = TargetFile.from_file(path, str(file), ["sha256"])
    digest.unrecognized_fields["custom"] = {CUSTOM_KEY: custom}
    dirname, _, base = path.rpartition("/")
    dest = repo.targets_dir / dirname / f"{digest.hashes['sha256']}.{base}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(file, dest)
    md: Metadata[Any] = Metadata.from_bytes((repo.metadata_dir / "release.json").read_bytes())
    md.signed.targets[path] = digest
    md.signed.version += 1
    md.signatures.clear()
    for s in repo.signers("release"):
        md.sign(s, append=True)
    data = md.to_bytes()
    (repo.metadata_dir / f"{md.signed.version}.release.json").write_bytes(data)
    (repo.metadata_dir / "release.json").write_bytes(data)
    snap: Metadata[Any] = Metadata.from_bytes((repo.metadata_dir / "snapshot.json").read_bytes())
    snap.signed.meta["release.json"] = MetaFile(md.signed.version)
    snap.signed.version += 1
    snap.signatures.clear()
    for s in repo.signers("snapshot"):
        snap.sign(s, append=True)
    (repo.metadata_dir / f"{snap.signed.version}.snapshot.json").write_bytes(snap.to_bytes())
    (repo.metadata_dir / "snapshot.json").write_bytes(snap.to_bytes())
    ts: Metadata[Any] = Metadata.from_bytes((repo.metadata_dir / "timestamp.json").read_bytes())
    ts.signed.snapshot_meta = MetaFile(snap.signed.version)
    ts.signed.version += 1
    ts.signatures.clear()
    for s in repo.signers("timestamp"):
        ts.sign(s, append=True)
    (repo.metadata_dir / "timestamp.json").write_bytes(ts.to_bytes())


def build_world(base: Path, payload: Path) -> World:
    big = base / "payload-big"
    shutil.copytree(payload, big)
    rng = np.random.default_rng(7)
    for i in range(120):  # many small files, so byte-offset kills land all through the write
        (big / "weights" / f"part-{i:03d}.bin").parent.mkdir(exist_ok=True)
        (big / "weights" / f"part-{i:03d}.bin").write_bytes(rng.bytes(16 * 1024))
    bad = _variant(payload, base / "payload-bad", bad_golden=True)
    garbage = _variant(payload, base / "payload-garbage", garbage_model=True)
    b = base / "bundles"
    b.mkdir()
    mk = build_bundle
    common: dict[str, Any] = {
        "skus": [SKU],
        "self_test": self_test(),
    }
    bundles = {
        # Published oldest first: a repository refuses a version below the newest unless it is
        # an allowed downgrade, so the un-allowed old one goes in before the rest.
        "old": mk(payload, b / "old.bundle", version="0.9.0", **common),
        "old-allowed": mk(payload, b / "old-ok.bundle", version="0.8.0", **common),
        "v1": mk(payload, b / "v1.bundle", version="1.0.0", **common),
        "v2": mk(big, b / "v2.bundle", version="2.0.0", **common),
        "v3-bad": mk(bad, b / "v3.bundle", version="3.0.0", **common),
        "v4-garbage": mk(garbage, b / "v4.bundle", version="4.0.0", **common),
        "v5-slow": mk(
            payload,
            b / "v5.bundle",
            version="5.0.0",
            skus=[SKU],
            self_test={**common["self_test"], "latency_budget_ms": 1e-6},
        ),
        "v6-fat": mk(
            payload,
            b / "v6.bundle",
            version="6.0.0",
            skus=[SKU],
            self_test={**common["self_test"], "memory_ceiling_mb": 1.0},
        ),
        "other-sku": mk(
            payload, b / "o.bundle", version="7.0.0", skus=["other-sku"], self_test=common["self_test"]
        ),
        "new-agent": mk(payload, b / "n.bundle", version="8.0.0", min_agent_version="99.0.0", **common),
    }
    repo = UpdateRepository.init(base / "repo")
    targets = {}
    for key, path in bundles.items():
        targets[key] = repo.add_bundle(path, allow_rollback=(key == "old-allowed")).path
    device = base / "device"
    DeviceRoot.provision(
        device,
        DeviceConfig(device_id="dev-1", sku=SKU, download_base_delay_s=0.001, download_attempts=2),
        (repo.metadata_dir / "1.root.json").read_bytes(),
    )
    report = Agent(device).install(repository=str(repo.dir), target=targets["v1"])
    assert report.ok, report
    return World(repo.dir, device, bundles, targets)


def device_view(device: Path) -> dict[str, Any]:
    """The active slot's verified state: raises if the device is not consistent."""
    agent = Agent(device)
    st = agent.status()
    assert st["state"] == "idle", st
    active = st["active_slot"]
    assert active is not None
    slot = st["slots"][active]
    assert slot["status"] == SlotStatus.GOOD.value, st
    slot_dir = device / "slots" / active
    manifest = BundleManifest.from_json_bytes((slot_dir / "bundle.json").read_bytes())
    verify_tree(slot_dir, manifest)
    assert manifest.version == slot["bundle"]["version"]
    assert os.readlink(device / "current") == f"slots/{active}"
    other = "b" if active == "a" else "a"
    o = st["slots"][other]
    if o["status"] == SlotStatus.GOOD.value:
        om = BundleManifest.from_json_bytes((device / "slots" / other / "bundle.json").read_bytes())
        verify_tree(device / "slots" / other, om)
    else:
        assert o["status"] in ("empty", "invalid", "bad"), o
    return {"version": manifest.version, "slot": active, "other": o["status"], "status": st}


def install_killed_at(device: Path, repo: Path, target: str, point: str) -> int | None:
    """Run an install in a forked child that SIGKILLs itself at `point`.
    Returns the signal that ended the child (None if it exited)."""
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.environ[ENV] = point
            Agent(device).install(repository=str(repo), target=target)
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return signal.SIGKILL
    assert os.WEXITSTATUS(status) == 0, "install child failed"
    return None
