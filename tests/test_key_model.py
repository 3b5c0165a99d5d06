"""The key model (issue 17): root and targets offline, online roles scoped by delegation, a
threshold of two for production paths, offline signing by export/sign/import, delegated-key
rotation without root, and what an attacker holding the server's keys can and cannot do.

The attacker holds every key the fleet server holds (repo.json's signers: the delegated
roles' online keys, snapshot, timestamp) and writes metadata straight into the served
directory. Devices run the real agent against the repository directory.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, MetaFile, TargetFile
from tuf.api.serialization.json import JSONSerializer

from agent.device import DeviceConfig, DeviceRoot
from agent.engine import Agent, Outcome
from shared.trust import (
    RepositoryConfigError,
    TargetNotFoundError,
    TrustClient,
    UpdateRepository,
)
from shared.trust.keys import Keyring, SignerError, public_key_from_pem
from shared.trust.repository import CUSTOM_KEY, Delegation, StagedChangeError, sign_envelope
from tests.helpers import build_bundle

SKU = "edge-cpu"
VISION = Delegation("vision", ("classifier/*/*",))
#: production safety models: a build key (online) and an approver's key (held elsewhere)
SAFETY = "safety/*/*"


def _tidegate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidegate", "repo", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def setup(tmp_path: Path, sample_payload: Path) -> dict[str, Any]:
    offline = tmp_path / "offline"
    repo = UpdateRepository.init(tmp_path / "repo", offline_dir=offline, delegations=(VISION,))
    approver = tmp_path / "approver" / "key.pem"
    assert _tidegate("keygen", str(approver)).returncode == 0
    waiting = repo.delegate(
        "safety",
        [SAFETY],
        threshold=2,
        new_keys=1,
        public_keys=[public_key_from_pem(approver.with_suffix(".pub"))],
    )
    assert [p.role for p in waiting] == ["safety"]  # its empty v1 needs the approver too
    v1 = repo.add_bundle(build_bundle(sample_payload, tmp_path / "v1.bundle", skus=[SKU]))
    assert v1.role == "vision" and not v1.pending
    device = tmp_path / "device"
    DeviceRoot.provision(
        device,
        DeviceConfig(device_id="dev-1", sku=SKU, download_base_delay_s=0.001, download_attempts=1),
        (repo.metadata_dir / "1.root.json").read_bytes(),
    )
    assert Agent(device).install(repository=str(repo.dir), target=v1.path).ok
    server = UpdateRepository(repo.dir)  # what the fleet server holds: no offline key
    return {"repo": repo, "server": server, "offline": offline, "approver": approver, "device": device}


def _active(device: Path) -> tuple[str | None, str]:
    st = Agent(device).status()
    return st["active_slot"], st["slots"][st["active_slot"]]["bundle"]["version"]


def _refused(device: Path, repo: Path, target: str, needle: str) -> str:
    before = _active(device)
    r = Agent(device).install(repository=str(repo), target=target)
    assert r.outcome is Outcome.FAILED, r
    assert needle in r.reason, r.reason
    assert _active(device) == before
    return r.reason


def _write(repo: UpdateRepository, role: str, md: Metadata[Any], signers: list[Signer]) -> None:
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    data = md.to_bytes(JSONSerializer())
    if role != "timestamp":
        (repo.metadata_dir / f"{md.signed.version}.{role}.json").write_bytes(data)
    (repo.metadata_dir / f"{role}.json").write_bytes(data)


def _attack(
    server: UpdateRepository, role: str, mutate: Callable[[Any], None], signers: list[Signer] | None = None
) -> None:
    """Rewrite `role`, then snapshot and timestamp, with the server's own keys: all the
    online keys an attacker who took the fleet server holds."""
    md: Metadata[Any] = Metadata.from_bytes((server.metadata_dir / f"{role}.json").read_bytes())
    mutate(md.signed)
    md.signed.version += 1
    _write(server, role, md, signers if signers is not None else server.signers(role))
    snap: Metadata[Any] = Metadata.from_bytes((server.metadata_dir / "snapshot.json").read_bytes())
    snap.signed.meta[f"{role}.json"] = MetaFile(md.signed.version)
    snap.signed.version += 1
    _write(server, "snapshot", snap, server.signers("snapshot"))
    ts: Metadata[Any] = Metadata.from_bytes((server.metadata_dir / "timestamp.json").read_bytes())
    ts.signed.snapshot_meta = MetaFile(snap.signed.version)
    ts.signed.version += 1
    _write(server, "timestamp", ts, server.signers("timestamp"))


def _plant(server: UpdateRepository, path: str, bundle: Path) -> Callable[[Any], None]:
    """A target file in place under `path`, and the mutation that lists it in a role."""
    tf = TargetFile.from_file(path, str(bundle), ["sha256"])
    tf.unrecognized_fields["custom"] = {
        CUSTOM_KEY: {"name": path.split("/", maxsplit=1)[0], "version": path.split("/")[1], "skus": [SKU]}
    }
    dirname, _, base = path.rpartition("/")
    dest = server.targets_dir / dirname / f"{tf.hashes['sha256']}.{base}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(bundle.read_bytes())
    return lambda signed: signed.targets.__setitem__(path, tf)


# ---- what the server holds ---------------------------------------------------------------------


def test_the_server_holds_no_root_or_targets_key_and_cannot_change_them(setup: dict[str, Any]) -> None:
    server: UpdateRepository = setup["server"]
    held = {k.parent.name for k in server.dir.rglob("*.pem")}
    assert held == {"snapshot", "timestamp", "vision", "safety"}
    for role in ("root", "targets"):
        with pytest.raises(RepositoryConfigError, match=f"role '{role}': 0 private key"):
            server.signers(role)
    with pytest.raises(RepositoryConfigError, match="role 'root': 0 private key.*--offline-keys"):
        server.rotate("timestamp")


# ---- key compromise: with every online key -------------------------------------------------------


def test_a_stolen_online_key_cannot_publish_outside_its_delegation(
    setup: dict[str, Any], tmp_path: Path, sample_payload: Path
) -> None:
    server: UpdateRepository = setup["server"]
    evil = build_bundle(
        sample_payload, tmp_path / "evil.bundle", name="detector", version="9.0.0", skus=[SKU]
    )
    with pytest.raises(RepositoryConfigError, match="no delegated role covers target path 'detector/"):
        server.add_bundle(evil)
    # Forged straight into vision.json, which is trusted only for classifier/*/*.
    _attack(server, "vision", _plant(server, "detector/9.0.0/edge-cpu.bundle", evil))
    _refused(setup["device"], server.dir, "detector/9.0.0/edge-cpu.bundle", "no target or bundle named")
    c = TrustClient(
        repository=server.dir,
        trusted_root=(server.metadata_dir / "1.root.json").read_bytes(),
        cache_dir=tmp_path / "c",
    )
    assert "detector/9.0.0/edge-cpu.bundle" not in [t.path for t in c.targets()]


def test_one_of_two_production_keys_cannot_publish(
    setup: dict[str, Any], tmp_path: Path, sample_payload: Path
) -> None:
    server: UpdateRepository = setup["server"]
    safe = build_bundle(sample_payload, tmp_path / "s.bundle", name="safety", version="1.0.0", skus=[SKU])
    staged = server.add_bundle(safe)
    assert staged.role == "safety" and staged.pending[0].signatures == 1
    assert staged.pending[0].threshold == 2
    # Not visible to devices while it waits for the approver.
    _refused(setup["device"], server.dir, staged.path, "safety")
    # The attacker signs it into safety.json with the build key alone.
    evil = build_bundle(sample_payload, tmp_path / "e.bundle", name="safety", version="6.6.6", skus=[SKU])
    if not (server.metadata_dir / "safety.json").exists():
        md = Metadata.from_dict(json.loads(server.export("safety"))["metadata"])
        md.signed.version = 1
        _write(server, "safety", md, server._signers_for(*server._role_keys("safety")[:2]))
    _attack(
        server,
        "safety",
        _plant(server, "safety/6.6.6/edge-cpu.bundle", evil),
        server._signers_for(*server._role_keys("safety")[:2]),
    )
    reason = _refused(setup["device"], server.dir, "safety/6.6.6/edge-cpu.bundle", "signature")
    assert "safety" in reason


def test_only_the_timestamp_key_installs_nothing(
    setup: dict[str, Any], tmp_path: Path, sample_payload: Path
) -> None:
    server: UpdateRepository = setup["server"]
    two = server.add_bundle(build_bundle(sample_payload, tmp_path / "v2.bundle", version="2.0.0", skus=[SKU]))
    # The attacker has the timestamp key only: it can point at a snapshot it cannot sign.
    snap: Metadata[Any] = Metadata.from_bytes((server.metadata_dir / "snapshot.json").read_bytes())
    snap.signed.version += 1
    snap.signed.meta["vision.json"] = MetaFile(1)  # back to before 2.0.0, or anything else
    _write(server, "snapshot", snap, [CryptoSigner.generate_ed25519()])
    ts: Metadata[Any] = Metadata.from_bytes((server.metadata_dir / "timestamp.json").read_bytes())
    ts.signed.snapshot_meta = MetaFile(snap.signed.version)
    ts.signed.version += 1
    _write(server, "timestamp", ts, server.signers("timestamp"))
    _refused(setup["device"], server.dir, two.path, "snapshot")


# ---- offline signing and approval ---------------------------------------------------------------


def test_production_approval_by_export_sign_import(
    setup: dict[str, Any], tmp_path: Path, sample_payload: Path
) -> None:
    server: UpdateRepository = setup["server"]
    published_before = sorted(p.name for p in server.metadata_dir.iterdir())
    safe = build_bundle(sample_payload, tmp_path / "s.bundle", name="safety", version="1.0.0", skus=[SKU])
    staged = server.add_bundle(safe)
    assert "awaits key(s)" in staged.pending[0].describe()
    exported = tmp_path / "safety.json"
    exported.write_bytes(server.export("safety"))
    # A wrong key, a hand-edited file, a stale file: refused, nothing published.
    stranger = tmp_path / "stranger.pem"
    assert _tidegate("keygen", str(stranger)).returncode == 0
    wrong, _ = sign_envelope(exported.read_bytes(), f"file2:{stranger}")
    with pytest.raises(StagedChangeError, match="not one of the role's keys"):
        server.import_signatures(wrong)
    edited = json.loads(exported.read_bytes())
    edited["metadata"]["signed"]["expires"] = "2099-01-01T00:00:00Z"
    with pytest.raises(StagedChangeError, match="differs from what is staged"):
        server.import_signatures(json.dumps(edited).encode())
    assert sorted(p.name for p in server.metadata_dir.iterdir()) == published_before
    # The approver signs on their machine (a file path there); the server imports.
    proc = _tidegate("sign", str(exported), "--key", f"file2:{setup['approver']}")
    assert proc.returncode == 0, proc.stderr
    assert "safety v1" in proc.stdout and "1 target(s)" in proc.stdout
    proc = _tidegate("import", str(server.dir), str(exported))
    assert proc.returncode == 0, proc.stderr
    assert server.staged() == []
    r = Agent(setup["device"]).install(repository=str(server.dir), target=staged.path)
    assert r.ok, r
    with pytest.raises(StagedChangeError, match="nothing staged for role 'safety'"):
        server.import_signatures(exported.read_bytes())


def test_a_delegation_made_without_the_targets_key_waits_for_its_signature(
    setup: dict[str, Any], tmp_path: Path, sample_payload: Path
) -> None:
    server: UpdateRepository = setup["server"]
    root_version = server.root().version
    waiting = server.delegate("detector", ["detector/*/*"], new_keys=1)
    assert {p.role for p in waiting} >= {"targets", "detector"}
    d = build_bundle(sample_payload, tmp_path / "d.bundle", name="detector", version="1.0.0", skus=[SKU])
    assert server.add_bundle(d).pending  # waits with the delegation
    # Meanwhile the roles the pending change leaves alone still publish.
    assert not server.add_bundle(
        build_bundle(sample_payload, tmp_path / "v3.bundle", version="3.0.0", skus=[SKU])
    ).pending
    out = tmp_path / "targets.json"
    assert _tidegate("export", str(server.dir), "targets", "-o", str(out)).returncode == 0
    targets_key = next((setup["offline"] / "targets").glob("*.pem"))
    proc = _tidegate("sign", str(out), "--key", f"file2:{targets_key}")
    assert proc.returncode == 0, proc.stderr
    assert "detector: detector/*/* (1 of 1)" in proc.stdout
    proc = _tidegate("import", str(server.dir), str(out))
    assert proc.returncode == 0 and "published targets, detector" in proc.stdout, proc.stdout + proc.stderr
    assert server.root().version == root_version
    assert (
        Agent(setup["device"]).install(repository=str(server.dir), target="detector/1.0.0/edge-cpu.bundle").ok
    )


def test_rotating_a_delegated_key_leaves_root_alone_and_retires_the_old_key(
    setup: dict[str, Any], tmp_path: Path, sample_payload: Path
) -> None:
    repo: UpdateRepository = setup["repo"]
    server: UpdateRepository = setup["server"]
    old = server.signers("vision")
    root_version = repo.root().version
    repo.rotate("vision")
    assert repo.root().version == root_version
    two = server.add_bundle(build_bundle(sample_payload, tmp_path / "v2.bundle", version="2.0.0", skus=[SKU]))
    assert not two.pending
    assert Agent(setup["device"]).install(repository=str(server.dir), target=two.path).ok
    evil = build_bundle(sample_payload, tmp_path / "e.bundle", version="9.0.0", skus=[SKU])
    _attack(server, "vision", _plant(server, "classifier/9.0.0/edge-cpu.bundle", evil), old)
    _refused(setup["device"], server.dir, "classifier/9.0.0/edge-cpu.bundle", "signature")


# ---- recovery from stolen snapshot and timestamp keys ------------------------------------------


def test_rotation_unsticks_devices_that_accepted_an_attackers_versions(
    setup: dict[str, Any], tmp_path: Path, sample_payload: Path
) -> None:
    """docs/SECURITY.md's recovery: an attacker with the snapshot and timestamp keys served
    version 1000 of both; the device accepted them, so the genuine next versions look like a
    rollback. Rotating both keys (root, offline) makes the device drop what it trusted."""
    repo: UpdateRepository = setup["repo"]
    device: Path = setup["device"]
    mirror = tmp_path / "mirror"
    shutil.copytree(repo.dir, mirror)
    evil = UpdateRepository(mirror)  # the attacker's copy, holding the stolen keys
    snap: Metadata[Any] = Metadata.from_bytes((mirror / "metadata" / "snapshot.json").read_bytes())
    snap.signed.version = 1000
    _write(evil, "snapshot", snap, evil.signers("snapshot"))
    ts: Metadata[Any] = Metadata.from_bytes((mirror / "metadata" / "timestamp.json").read_bytes())
    ts.signed.version = 1000
    ts.signed.snapshot_meta = MetaFile(1000)
    _write(evil, "timestamp", ts, evil.signers("timestamp"))
    Agent(device).install(repository=str(mirror), target="classifier/1.0.0/edge-cpu.bundle")
    two = repo.add_bundle(build_bundle(sample_payload, tmp_path / "v2.bundle", version="2.0.0", skus=[SKU]))
    _refused(device, repo.dir, two.path, "must be >= 1000")
    repo.rotate("timestamp")
    repo.rotate("snapshot")
    r = Agent(device).install(repository=str(repo.dir), target=two.path)
    assert r.ok, r


# ---- bad input -------------------------------------------------------------------------------


def test_bad_keys_and_patterns_are_one_line_errors_and_write_nothing(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    repo: UpdateRepository = setup["repo"]
    before = {p.name: p.read_bytes() for p in repo.metadata_dir.iterdir()}
    config = (repo.dir / "repo.json").read_bytes()
    with pytest.raises(SignerError, match=r"signer file2:/nowhere/key.pem: cannot read"):
        repo.delegate("x", ["x/*/*"], key_uris=["file2:/nowhere/key.pem"])
    with pytest.raises(SignerError, match="unknown scheme"):
        repo.delegate("x", ["x/*/*"], key_uris=["vault:thing"])
    with pytest.raises(RepositoryConfigError, match=r"'classifier/\*' matches no target.*'classifier/\*/\*'"):
        repo.delegate("x", ["classifier/*"], new_keys=1)
    with pytest.raises(RepositoryConfigError, match="threshold 3 must be between 1 and its 1 key"):
        repo.delegate("x", ["x/*/*"], threshold=3, new_keys=1)
    with pytest.raises(RepositoryConfigError, match="role name 'Root'"):
        repo.delegate("Root", ["x/*/*"], new_keys=1)
    with pytest.raises(StagedChangeError, match="not an exported staged change"):
        repo.import_signatures(b"{}")
    assert {p.name: p.read_bytes() for p in repo.metadata_dir.iterdir()} == before
    assert (repo.dir / "repo.json").read_bytes() == config
    assert not (repo.keys_dir / "x").exists()


def test_a_pkcs11_uri_without_a_library_names_what_to_set(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYKCS11LIB", raising=False)
    with pytest.raises(SignerError, match=r"signer hsm:2\?label=nope: .*PYKCS11LIB"):
        setup["repo"].delegate("x", ["x/*/*"], key_uris=["hsm:2?label=nope"])


# ---- freshness and one writer ------------------------------------------------------------------


def test_refresh_is_due_in_the_last_half_of_the_timestamps_life(setup: dict[str, Any]) -> None:
    server: UpdateRepository = setup["server"]
    now = datetime.now(UTC)
    assert not server.refresh_due(now)
    assert server.refresh_due(now + timedelta(hours=13))
    server.refresh(now=now + timedelta(hours=13))
    assert not server.refresh_due(now + timedelta(hours=13))


def _publisher(repo_dir: str, bundles: list[str], refreshes: int) -> None:
    repo = UpdateRepository(Path(repo_dir))
    for i, b in enumerate(bundles):
        repo.add_bundle(Path(b))
        for _ in range(refreshes if i % 2 else 0):
            repo.refresh()


def test_two_processes_publishing_and_refreshing_lose_no_target(
    setup: dict[str, Any], tmp_path: Path, sample_payload: Path
) -> None:
    """Without the repository lock, each writer re-signs vision.json from what it read before
    the other wrote, and a target disappears (or snapshot names a version that was replaced)."""
    server: UpdateRepository = setup["server"]
    sets: list[list[str]] = [[], []]
    for i in range(16):
        b = build_bundle(sample_payload, tmp_path / f"b{i}.bundle", version=f"2.{i}.0", skus=[f"sku-{i}"])
        sets[i % 2].append(str(b))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_publisher, args=(str(server.dir), s, 2)) for s in sets]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    c = TrustClient(
        repository=server.dir,
        trusted_root=(server.metadata_dir / "1.root.json").read_bytes(),
        cache_dir=tmp_path / "cache",
    )
    paths = {t.path for t in c.targets()}
    assert {f"classifier/2.{i}.0/sku-{i}.bundle" for i in range(16)} <= paths
    assert Agent(setup["device"]).install(
        repository=str(server.dir), target="classifier/1.0.0/edge-cpu.bundle"
    )
    with pytest.raises(TargetNotFoundError):
        c.get_target("classifier/2.99.0/sku-0.bundle")


def test_keyring_reads_the_layout_init_writes(setup: dict[str, Any]) -> None:
    ring = Keyring.from_dir(setup["offline"])
    root = setup["repo"].root()
    assert set(root.roles["root"].keyids) | set(root.roles["targets"].keyids) == set(ring.uris)
    with pytest.raises(SignerError, match="no such key directory"):
        Keyring.from_dir(setup["offline"] / "missing")


def test_the_fleet_servers_keeper_re_signs_before_expiry_on_its_own(
    setup: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    from fleet_server.releases.keeper import RepositoryKeeper

    server: UpdateRepository = setup["server"]
    clock = [datetime.now(UTC)]
    keeper = RepositoryKeeper(server, lambda: clock[0])
    expires = server._load("timestamp").signed.expires
    assert not keeper.tick()
    clock[0] += timedelta(hours=13)
    with caplog.at_level("INFO", logger="tidegate.repository"):
        assert keeper.tick()
    assert server._load("timestamp").signed.expires > expires + timedelta(hours=12)
    assert "re-signed snapshot" in caplog.text
    for k in (server.keys_dir / "timestamp").glob("*.pem"):
        k.unlink()
    clock[0] += timedelta(hours=13)
    assert not keeper.tick()
    assert keeper.last_error is not None and "timestamp" in keeper.last_error


def test_a_catch_all_release_key_cannot_sign_a_path_a_later_delegation_took(
    tmp_path: Path, sample_payload: Path
) -> None:
    """The default release role covers */*/*; a later safety delegation (2 of 2) goes ahead of
    it, so a target under safety/ forged into release.json is never consulted."""
    repo = UpdateRepository.init(tmp_path / "repo")
    approver = CryptoSigner.generate_ed25519()
    repo.delegate("safety", [SAFETY], threshold=2, new_keys=1, public_keys=[approver.public_key])
    assert [d.name for d in repo.delegations()] == ["safety", "release"]
    server = UpdateRepository(repo.dir)
    v1 = server.add_bundle(build_bundle(sample_payload, tmp_path / "v1.bundle", skus=[SKU]))
    assert v1.role == "release" and not v1.pending
    device = tmp_path / "device"
    DeviceRoot.provision(
        device, DeviceConfig(device_id="d", sku=SKU), (repo.metadata_dir / "1.root.json").read_bytes()
    )
    assert Agent(device).install(repository=str(repo.dir), target=v1.path).ok
    evil = build_bundle(sample_payload, tmp_path / "e.bundle", name="safety", version="6.6.6", skus=[SKU])
    _attack(server, "release", _plant(server, "safety/6.6.6/edge-cpu.bundle", evil))
    _refused(device, repo.dir, "safety/6.6.6/edge-cpu.bundle", "safety")
