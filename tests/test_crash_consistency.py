"""Power cuts that drop every write not yet durable (issue 17), through CrashFS (a FUSE file
system, tests/crashfs.py): the install engine, state.json, the outbox and the server's
repository writes run unmodified on the mount; every crash state their fsyncs allow is
written out, recovered as a boot would, and checked.

SIGKILL (test_agent_faults) leaves the page cache intact, so it cannot show a missing fsync;
these tests can, and one of them shows it by running the engine with an fsync taken out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from agent.device import DeviceConfig, DeviceRoot
from agent.engine import Agent
from agent.outbox import Outbox
from shared import fsutil
from shared.errors import TidegateError
from shared.trust import TrustClient, UpdateRepository
from tests.agent_world import device_view
from tests.crashfs import CrashFSClient
from tests.helpers import build_bundle, self_test

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def crashfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrashFSClient]:
    if shutil.which("fusermount3") is None or not Path("/dev/fuse").exists():
        pytest.skip("fuse3 and /dev/fuse are needed (.ci/run installs fuse3)")
    work = tmp_path_factory.mktemp("crashfs")
    with CrashFSClient(work / "mnt", work) as fs:
        yield fs


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, sample_payload: Path) -> dict[str, Any]:
    """A repository with 1.0.0 and 2.0.0 and a device that committed 1.0.0 (on real disk)."""
    base = tmp_path_factory.mktemp("crash-world")
    repo = UpdateRepository.init(base / "repo")
    st = self_test(latency_budget_ms=500.0, runs=2)
    v1 = repo.add_bundle(build_bundle(sample_payload, base / "v1.bundle", self_test=st)).path
    v2 = repo.add_bundle(build_bundle(sample_payload, base / "v2.bundle", version="2.0.0", self_test=st)).path
    device = base / "image" / "device"
    DeviceRoot.provision(
        device,
        DeviceConfig(device_id="dev-1", sku="edge-cpu", download_base_delay_s=0.001, download_attempts=1),
        (repo.metadata_dir / "1.root.json").read_bytes(),
    )
    assert Agent(device).install(repository=str(repo.dir), target=v1).ok
    return {"repo": repo, "v1": v1, "v2": v2, "image": device.parent, "base": base}


def _states(fs: CrashFSClient, into: Path) -> Iterator[Path]:
    count = fs.call("count")["states"]
    for i in range(count):
        dest = into / f"state-{i:03d}"
        fs.call("materialize", index=i, dest=str(dest))
        yield dest
        shutil.rmtree(dest)


def _install_on_crashfs(fs: CrashFSClient, world: dict[str, Any]) -> None:
    fs.call("load", src=str(world["image"]))
    fs.call("record", on=True)
    report = Agent(fs.mountpoint / "device").install(repository=str(world["repo"].dir), target=world["v2"])
    fs.call("record", on=False)
    assert report.ok, report


def _boot(device: Path) -> dict[str, Any] | str:
    """What a boot does (recover, then verify the active slot); the device's view, or why it
    is bricked: no committed slot that verifies."""
    try:
        agent = Agent(device)
        agent.recover()
        agent.verify(repair=True)
        return device_view(device)
    except (TidegateError, AssertionError, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def test_every_crash_state_of_an_install_boots_into_a_committed_verified_slot(
    crashfs: CrashFSClient, world: dict[str, Any], tmp_path: Path
) -> None:
    _install_on_crashfs(crashfs, world)
    versions: dict[str, int] = {}
    bricked: list[tuple[int, str]] = []
    updatable = 0
    for i, device_root in enumerate(_states(crashfs, tmp_path)):
        device = device_root / "device"
        view = _boot(device)
        if isinstance(view, str):
            bricked.append((i, view))
            continue
        versions[view["version"]] = versions.get(view["version"], 0) + 1
        if i % 6 == 0:
            # the device can still take the update from where the cut left it
            r = Agent(device).install(repository=str(world["repo"].dir), target=world["v2"])
            assert r.ok or "already installed" in r.reason, (i, r)
            updatable += 1
    explored = sum(versions.values()) + len(bricked)
    print(f"crash states explored: {explored}; bricked: {len(bricked)}; booted into {versions}")
    assert explored >= 20
    assert bricked == []
    assert set(versions) == {"1.0.0", "2.0.0"}  # cut before the commit is durable, and after
    assert updatable >= 2


def _unsynced_writer(
    path: str | os.PathLike[str], mode: int = 0o644
) -> contextlib.AbstractContextManager[IO[bytes]]:
    """`shared.fsutil.atomic_writer` with the file's fsync taken out (the rename and the
    directory fsync stay): the mistake this harness exists to catch."""

    @contextlib.contextmanager
    def writer() -> Iterator[IO[bytes]]:
        target = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.replace(tmp, target)
        fsutil.fsync_dir(target.parent)

    return writer()


def test_the_harness_fails_the_engine_when_an_fsync_is_removed(
    crashfs: CrashFSClient, world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fsutil, "atomic_writer", _unsynced_writer)
    _install_on_crashfs(crashfs, world)
    bricked = [view for d in _states(crashfs, tmp_path) if isinstance(view := _boot(d / "device"), str)]
    print(f"without the file fsync: {len(bricked)} bricked crash states, e.g. {bricked[:1]}")
    assert bricked
    assert any("state.json" in why for why in bricked)


def test_the_outbox_keeps_an_ordered_prefix_through_every_cut(crashfs: CrashFSClient, tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.mkdir()
    crashfs.call("load", src=str(image))
    crashfs.call("record", on=True)
    box = Outbox(crashfs.mountpoint / "outbox.db", max_messages=50)
    sent = [f"receipt-{i}".encode() for i in range(30)]
    for k, p in enumerate(sent, 1):
        box.put("tidegate/things/dev-1/receipts", p)
        if k % 5 == 0:  # a cut right after put() returned keeps the message
            now = tmp_path / f"now-{k}"
            crashfs.call("materialize", index=-1, dest=str(now))
            assert [q.payload for q in Outbox(now / "outbox.db").peek(100)] == sent[:k]
    crashfs.call("record", on=False)
    box.close()
    explored, lengths = 0, set()
    for state in _states(crashfs, tmp_path / "states"):
        explored += 1
        db = state / "outbox.db"
        if not db.exists():
            lengths.add(0)
            continue
        con = sqlite3.connect(db)
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        con.close()
        kept = [q.payload for q in Outbox(db).peek(100)]
        assert kept == sent[: len(kept)]
        lengths.add(len(kept))
    print(f"outbox crash states: {explored}; messages kept: {sorted(lengths)}")
    assert explored >= len(sent)
    assert lengths >= set(range(1, len(sent) + 1))


def test_every_crash_state_of_a_publish_leaves_a_repository_devices_verify(
    crashfs: CrashFSClient, world: dict[str, Any], tmp_path: Path, sample_payload: Path
) -> None:
    image = tmp_path / "image"
    shutil.copytree(world["repo"].dir, image / "repo")
    crashfs.call("load", src=str(image))
    crashfs.call("record", on=True)
    bundle = build_bundle(sample_payload, tmp_path / "v3.bundle", version="3.0.0")
    UpdateRepository(crashfs.mountpoint / "repo").add_bundle(bundle)
    UpdateRepository(crashfs.mountpoint / "repo").refresh()
    crashfs.call("record", on=False)
    root = (world["repo"].metadata_dir / "1.root.json").read_bytes()
    seen: dict[int, int] = {}
    for i, state in enumerate(_states(crashfs, tmp_path / "states")):
        client = TrustClient(repository=state / "repo", trusted_root=root, cache_dir=tmp_path / f"cache-{i}")
        paths = {t.path for t in client.targets()}
        assert {world["v1"], world["v2"]} <= paths, i
        if "classifier/3.0.0/edge-cpu.bundle" in paths:  # listed: its bytes are there too
            info = client.get_target("classifier/3.0.0/edge-cpu.bundle")
            client.download(info, tmp_path / f"got-{i}.bundle")
        seen[len(paths)] = seen.get(len(paths), 0) + 1
        shutil.rmtree(tmp_path / f"cache-{i}")
    print(f"repository crash states by targets listed: {seen}")
    assert set(seen) == {2, 3}
