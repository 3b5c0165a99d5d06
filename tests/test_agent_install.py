"""The A/B install engine: the CLI contract, every refusal, per-state kills and rollback."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner

from agent.device import DeviceRoot
from agent.engine import Agent
from agent.errors import BusyError, InstallInProgressError, NothingToRollBackToError
from agent.state import Outcome
from shared.trust import UpdateRepository
from tests.agent_world import (
    SKU,
    World,
    build_world,
    device_view,
    install_killed_at,
    sign_raw_target,
)
from tests.helpers import BASIC_FILES, Member, manifest_bytes, raw_tar


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory, sample_payload: Path) -> World:
    return build_world(tmp_path_factory.mktemp("world"), sample_payload)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidegate", "agent", *args], capture_output=True, text=True, timeout=300
    )


# ---- the CLI contract ------------------------------------------------------------------------


def test_cli_install_by_name_picks_newest_installable(world: World, tmp_path: Path) -> None:
    root = tmp_path / "dev"
    trusted = world.repo / "metadata" / "1.root.json"
    p = cli(
        "provision",
        "--root",
        str(root),
        "--device-id",
        "bench-7",
        "--sku",
        SKU,
        "--trusted-root",
        str(trusted),
    )
    assert p.returncode == 0, p.stderr
    # Newest for edge-cpu that this agent may install is 6.0.0 (8.0.0 needs agent 99; 7.0.0 is
    # another SKU); 6.0.0's memory ceiling is too small, so its trial fails and it rolls back.
    p = cli("install", "--root", str(root), "--repo", str(world.repo), "--target", "classifier", "-q")
    assert p.returncode == 1
    assert p.stderr.startswith("rolled back: self-test failed: peak memory")
    assert "no model active" in p.stderr
    st = json.loads(cli("status", "--root", str(root), "--json").stdout)
    assert st["active_slot"] is None and st["slots"]["a"]["status"] == "bad"


def test_cli_install_by_path_status_rollback_recover(world: World, tmp_path: Path) -> None:
    root = tmp_path / "dev"
    trusted = world.repo / "metadata" / "1.root.json"
    assert (
        cli(
            "provision",
            "--root",
            str(root),
            "--device-id",
            "bench-7",
            "--sku",
            SKU,
            "--trusted-root",
            str(trusted),
        ).returncode
        == 0
    )
    for key in ("v1", "v2"):
        p = cli("install", "--root", str(root), "--repo", str(world.repo), "--target", world.targets[key])
        assert p.returncode == 0, p.stderr
        assert "committed" in p.stdout
    st = json.loads(cli("status", "--root", str(root), "--json").stdout)
    assert st["active_version"] == "2.0.0" and st["state"] == "idle"
    assert st["slots"]["a"]["bundle"]["version"] == "1.0.0"
    assert st["last_result"]["figures"]["self_test"]["p95_ms"] > 0
    p = cli("rollback", "--root", str(root))
    assert p.returncode == 0, p.stderr
    assert json.loads(cli("status", "--root", str(root), "--json").stdout)["active_version"] == "1.0.0"
    assert cli("recover", "--root", str(root)).stdout.strip() == "nothing to recover"
    # A bundle at hand (USB), still verified against the repository metadata.
    p = cli("install", "--root", str(root), "--repo", str(world.repo), "--bundle", str(world.bundles["v2"]))
    assert p.returncode == 0, p.stderr
    assert json.loads(cli("status", "--root", str(root), "--json").stdout)["active_version"] == "2.0.0"


def test_cli_errors_are_one_line(world: World, tmp_path: Path) -> None:
    for args, needle in [
        (["status", "--root", str(tmp_path / "nothing")], "not a provisioned device root"),
        (
            [
                "provision",
                "--root",
                str(tmp_path / "d"),
                "--device-id",
                "x",
                "--sku",
                "s",
                "--trusted-root",
                str(tmp_path / "no.json"),
            ],
            "cannot read trusted root",
        ),
        (["rollback", "--root", str(world.device)], "no committed version"),
    ]:
        p = cli(*args)
        assert p.returncode != 0
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr, p.stderr


# ---- installs, self-test, rollback --------------------------------------------------------------


def test_install_upgrade_then_manual_rollback(world: World, tmp_path: Path) -> None:
    device, repo = world.copy(tmp_path)
    r = Agent(device).install(repository=str(repo), target=world.targets["v2"])
    assert r.ok and r.version == "2.0.0"
    assert {"download_s", "verify_s", "write_s", "flip_to_commit_s", "self_test"} <= set(r.figures)
    view = device_view(device)
    assert view["version"] == "2.0.0" and view["other"] == "good"
    assert not list((device / "downloads").iterdir())
    again = Agent(device).install(repository=str(repo), target=world.targets["v2"])
    assert again.ok and "already installed" in again.reason
    Agent(device).rollback()
    assert device_view(device)["version"] == "1.0.0"
    Agent(device).rollback()
    assert device_view(device)["version"] == "2.0.0"


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("v3-bad", "differs from the golden output"),
        ("v4-garbage", "model failed to load"),
        ("v5-slow", "p95 latency"),
        ("v6-fat", "peak memory"),
    ],
)
def test_self_test_failures_roll_back_by_themselves(
    world: World, tmp_path: Path, key: str, reason: str
) -> None:
    device, repo = world.copy(tmp_path)
    r = Agent(device).install(repository=str(repo), target=world.targets[key])
    assert r.outcome is Outcome.ROLLED_BACK
    assert reason in r.reason and "back on classifier 1.0.0" in r.reason
    view = device_view(device)
    assert view["version"] == "1.0.0" and view["other"] == "bad"
    assert view["status"]["last_result"]["outcome"] == "rolled_back"


def _assert_refused(world: World, device: Path, repo: Path, target: str, needle: str) -> None:
    before = device_view(device)
    r = Agent(device).install(repository=str(repo), target=target)
    assert r.outcome is Outcome.FAILED, r
    assert needle in r.reason, r.reason
    after = device_view(device)
    assert (after["version"], after["slot"]) == (before["version"], before["slot"])


@pytest.mark.parametrize(
    ("key", "needle"),
    [
        ("other-sku", "this device is edge-cpu"),
        ("new-agent", "needs agent 99.0.0"),
        ("old", "not newer than the installed 1.0.0"),
    ],
)
def test_refusals_from_signed_metadata(world: World, tmp_path: Path, key: str, needle: str) -> None:
    device, repo = world.copy(tmp_path)
    _assert_refused(world, device, repo, world.targets[key], needle)


def test_signed_rollback_is_allowed(world: World, tmp_path: Path) -> None:
    device, repo = world.copy(tmp_path)
    r = Agent(device).install(repository=str(repo), target=world.targets["old-allowed"])
    assert r.ok
    assert device_view(device)["version"] == "0.8.0"


def test_refuses_tampered_bytes(world: World, tmp_path: Path) -> None:
    device, repo = world.copy(tmp_path, repo=True)
    stored = next((repo / "targets").rglob(f"*{Path(world.targets['v2']).name}"))
    data = bytearray(stored.read_bytes())
    data[len(data) // 3] ^= 0x10
    stored.write_bytes(bytes(data))
    _assert_refused(world, device, repo, world.targets["v2"], "HashMismatchError")


def test_refuses_truncated_download(world: World, tmp_path: Path) -> None:
    device, repo = world.copy(tmp_path, repo=True)
    stored = next((repo / "targets").rglob(f"*{Path(world.targets['v2']).name}"))
    stored.write_bytes(stored.read_bytes()[:50_000])
    _assert_refused(world, device, repo, world.targets["v2"], "connection ended at byte 50000")
    # the partial download is kept for a resume once the mirror is repaired
    assert len(list((device / "downloads").glob("*.part"))) == 1


def test_refuses_wrong_key(world: World, tmp_path: Path) -> None:
    device, repo_dir = world.copy(tmp_path, repo=True)
    from tests.test_trust import forge

    repo = UpdateRepository(repo_dir)
    forge(repo, "timestamp", lambda s: None, [CryptoSigner.generate_ed25519()])
    _assert_refused(world, device, repo_dir, world.targets["v2"], "signature")


def test_refuses_expired_metadata(world: World, tmp_path: Path) -> None:
    device, repo_dir = world.copy(tmp_path, repo=True)
    UpdateRepository(repo_dir).refresh(now=datetime.now(UTC) - timedelta(days=5))
    _assert_refused(world, device, repo_dir, world.targets["v2"], "expired")


def test_refuses_rolled_back_metadata(world: World, tmp_path: Path) -> None:
    device, repo_dir = world.copy(tmp_path, repo=True)
    old = (repo_dir / "metadata" / "timestamp.json").read_bytes()
    UpdateRepository(repo_dir).refresh()
    Agent(device).install(repository=str(repo_dir), target=world.targets["v1"])  # sees the new timestamp
    (repo_dir / "metadata" / "timestamp.json").write_bytes(old)
    _assert_refused(world, device, repo_dir, world.targets["v2"], "rollback")


def test_refuses_mixed_and_matched_metadata(world: World, tmp_path: Path) -> None:
    """A new publish (release v N+1, which the device has not seen) served with the content of
    release v N under v N+1's name: the version inside does not match what snapshot pins."""
    device, repo_dir = world.copy(tmp_path, repo=True)
    repo = UpdateRepository(repo_dir)
    v2 = next((repo_dir / "targets").rglob(f"*{Path(world.targets['v2']).name}"))
    custom = {"name": "classifier", "version": "2.0.1", "skus": [SKU], "min_agent_version": "0.1.0"}
    sign_raw_target(repo, "classifier/2.0.1/edge-cpu.bundle", v2, custom)
    meta = repo_dir / "metadata"
    tv = json.loads((meta / "snapshot.json").read_bytes())["signed"]["meta"]["release.json"]["version"]
    (meta / f"{tv}.release.json").write_bytes((meta / f"{tv - 1}.release.json").read_bytes())
    _assert_refused(world, device, repo_dir, world.targets["v2"], "release")


@pytest.mark.parametrize(
    ("members", "needle"),
    [
        (
            [*[Member(p, d) for p, d in sorted(BASIC_FILES.items())], Member("../../etc/x", b"x")],
            "UnsafePathError",
        ),
        ([Member("model.onnx", type=b"2", linkname="/etc/shadow")], "LinkMemberError"),
    ],
)
def test_refuses_tar_tricks_even_when_signed(
    world: World, tmp_path: Path, members: list[Member], needle: str
) -> None:
    """A compromised build signed by the real targets key is still refused by the reader."""
    device, repo_dir = world.copy(tmp_path, repo=True)
    evil = raw_tar(
        tmp_path / "evil.bundle",
        [Member("bundle.json", manifest_bytes(BASIC_FILES, version="9.0.0", skus=[SKU])), *members],
    )
    custom = {"name": "classifier", "version": "9.0.0", "skus": [SKU], "min_agent_version": "0.1.0"}
    sign_raw_target(UpdateRepository(repo_dir), "classifier/9.0.0/evil.bundle", evil, custom)
    _assert_refused(world, device, repo_dir, "classifier/9.0.0/evil.bundle", needle)
    assert not (tmp_path / "etc").exists()


def test_refuses_when_disk_is_full(world: World, tmp_path: Path) -> None:
    device, repo = world.copy(tmp_path)
    cfg = json.loads((device / "device.json").read_text())
    cfg["reserve_mb"] = 1e12
    (device / "device.json").write_text(json.dumps(cfg))
    _assert_refused(world, device, repo, world.targets["v2"], "NotEnoughDiskError")


def test_unknown_target_and_bundle_not_in_repo(world: World, tmp_path: Path) -> None:
    device, repo = world.copy(tmp_path)
    _assert_refused(world, device, repo, "nope", "no target or bundle named 'nope'")
    stray = tmp_path / "stray.bundle"
    stray.write_bytes(world.bundles["v2"].read_bytes() + b"\0")
    r = Agent(device).install(repository=str(repo), bundle=stray)
    assert r.outcome is Outcome.FAILED and "not a target signed in the repository" in r.reason


def test_lock_and_in_progress_guard(world: World, tmp_path: Path) -> None:
    device, repo = world.copy(tmp_path)
    dev = DeviceRoot(device)
    with dev.locked(), pytest.raises(BusyError):
        Agent(device).install(repository=str(repo), target=world.targets["v2"])
    assert install_killed_at(device, repo, world.targets["v2"], "after:writing") is not None
    with pytest.raises(InstallInProgressError, match="recover"):
        Agent(device).install(repository=str(repo), target=world.targets["v2"])
    Agent(device).recover()
    with pytest.raises(NothingToRollBackToError):
        Agent(device).rollback()  # slot b was left invalid by the interrupted write


# ---- Killed_in_<State> -------------------------------------------------------------------------

GOOD_POINTS = [
    "after:downloading",
    "after:verifying",
    "after:writing",
    "after:flipped",
    "after:pointer",
    "after:self_testing",
    "after:selftest-run",
    "after:committed",
]
BAD_POINTS = [
    "after:flipped",
    "after:pointer",
    "after:self_testing",
    "after:selftest-run",
    "after:rolling_back",
    "after:pointer-back",
    "after:rolled_back",
]


@pytest.mark.parametrize("point", GOOD_POINTS)
def test_killed_in_state_without_rollback(world: World, tmp_path: Path, point: str) -> None:
    device, repo = world.copy(tmp_path)
    assert install_killed_at(device, repo, world.targets["v2"], point) is not None
    Agent(device).recover()
    view = device_view(device)
    flipped = point not in ("after:downloading", "after:verifying", "after:writing")
    assert view["version"] == ("2.0.0" if flipped else "1.0.0")
    if not flipped:  # the job retries: the next install completes
        assert Agent(device).install(repository=str(repo), target=world.targets["v2"]).ok
        assert device_view(device)["version"] == "2.0.0"


@pytest.mark.parametrize("point", BAD_POINTS)
def test_killed_in_state_with_rollback(world: World, tmp_path: Path, point: str) -> None:
    device, repo = world.copy(tmp_path)
    assert install_killed_at(device, repo, world.targets["v3-bad"], point) is not None
    Agent(device).recover()
    view = device_view(device)
    assert view["version"] == "1.0.0"
    assert view["other"] == "bad"


def test_trial_that_keeps_crashing_rolls_back(world: World, tmp_path: Path) -> None:
    """A self-test that kills the agent every time ends in rollback, not a boot loop."""
    device, repo = world.copy(tmp_path)
    assert install_killed_at(device, repo, world.targets["v2"], "after:self_testing") is not None
    import os

    os.environ["TIDEGATE_FAULT_KILL_AT"] = "after:self_testing"
    try:
        for _ in range(3):  # each recover re-enters the trial and is killed again
            pid = os.fork()
            if pid == 0:
                try:
                    Agent(device).recover()
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
    finally:
        del os.environ["TIDEGATE_FAULT_KILL_AT"]
    r = Agent(device).recover()
    assert r is not None and r.outcome is Outcome.ROLLED_BACK
    assert "trial interrupted 4 times" in r.reason
    assert device_view(device)["version"] == "1.0.0"


def test_slot_damaged_between_boots_is_never_committed(world: World, tmp_path: Path) -> None:
    device, repo = world.copy(tmp_path)
    assert install_killed_at(device, repo, world.targets["v2"], "after:pointer") is not None
    victim = next((device / "slots" / "b" / "weights").glob("*.bin"))
    victim.write_bytes(b"\0" * victim.stat().st_size)  # same size, different bytes
    r = Agent(device).recover()
    assert r is not None and r.outcome is Outcome.ROLLED_BACK
    assert "damaged after the flip" in r.reason
    assert "sha256" in r.reason
    assert device_view(device)["version"] == "1.0.0"


def test_preconditions_checked_again_before_the_flip(world: World, tmp_path: Path) -> None:
    """A vehicle that starts driving during the write: the flip is not made, the install is
    deferred (not failed), the download is kept, and the retry completes."""
    device, repo = world.copy(tmp_path)
    r = Agent(device, before_flip=lambda: "parked: vehicle not parked").install(
        repository=str(repo), target=world.targets["v2"]
    )
    assert r.outcome is Outcome.FAILED and r.deferred and not r.refused
    assert "not flipping: parked: vehicle not parked" in r.reason
    view = device_view(device)
    assert view["version"] == "1.0.0" and view["other"] == "invalid"
    assert len(list((device / "downloads").glob("*.bundle"))) == 1  # kept for the retry
    assert (
        Agent(device, before_flip=lambda: None).install(repository=str(repo), target=world.targets["v2"]).ok
    )
    assert device_view(device)["version"] == "2.0.0"


def test_a_bundle_that_failed_its_trial_is_not_tried_again(world: World, tmp_path: Path) -> None:
    device, repo = world.copy(tmp_path)
    assert (
        Agent(device).install(repository=str(repo), target=world.targets["v3-bad"]).outcome
        is Outcome.ROLLED_BACK
    )
    r = Agent(device).install(repository=str(repo), target=world.targets["v3-bad"])
    assert r.outcome is Outcome.FAILED and "already failed its trial" in r.reason
    assert "self_test" not in r.figures  # refused before any work


def _damage_active(device: Path) -> Path:
    model = (device / "current").resolve() / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    return model


def test_a_slot_damaged_at_rest_is_found_marked_and_reinstalled(world: World, tmp_path: Path) -> None:
    """A byte changed in the committed active model: `verify` finds it (recover and the old
    status never did), marks the slot invalid, and installing the same target again writes it
    afresh instead of answering "already installed"."""
    device, repo = world.copy(tmp_path)
    assert (
        Agent(device).install(repository=str(repo), target=world.targets["v2"]).outcome is Outcome.COMMITTED
    )
    assert Agent(device).verify()["ok"]
    _damage_active(device)
    assert Agent(device).recover() is None  # nothing interrupted: recover cannot see it
    found = Agent(device).verify(repair=False)
    assert not found["ok"] and "model.onnx" in found["reason"] and found["reinstall"] == world.targets["v2"]
    st = Agent(device).status()
    assert st["slots"][st["active_slot"]]["status"] == "invalid"  # status no longer says "good"
    again = Agent(device).install(repository=str(repo), target=world.targets["v2"])
    assert again.outcome is Outcome.COMMITTED and "already installed" not in again.reason
    after = Agent(device).verify()
    assert after["ok"] and after["version"] == "2.0.0" and after["active_slot"] != found["active_slot"]


def test_a_damaged_slot_is_repaired_from_the_other_good_slot(world: World, tmp_path: Path) -> None:
    from tidegate.cli import main

    device, repo = world.copy(tmp_path)
    assert (
        Agent(device).install(repository=str(repo), target=world.targets["v2"]).outcome is Outcome.COMMITTED
    )
    _damage_active(device)
    assert main(["agent", "verify", "--root", str(device), "--no-repair"]) == 1
    assert main(["agent", "verify", "--root", str(device)]) == 0  # repaired: the other slot took over
    view = device_view(device)
    assert view["version"] == "1.0.0" and Agent(device).verify()["ok"]


def test_provision_refuses_a_sku_outside_the_catalogues_naming_rule(tmp_path: Path, world: World) -> None:
    proc = cli(
        "provision",
        "--root",
        str(tmp_path / "d"),
        "--device-id",
        "v-1",
        "--sku",
        "Edge CPU",
        "--trusted-root",
        str(world.repo / "metadata" / "1.root.json"),
    )
    assert proc.returncode != 0 and "invalid device settings" in proc.stderr and "pattern" in proc.stderr
    assert not (tmp_path / "d").exists()  # nothing half-provisioned
