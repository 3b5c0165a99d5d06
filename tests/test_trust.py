"""Update trust through python-tuf: publish, verify, rotate, and the attacks it must stop.

Every scenario runs against a real repository on disk, read by the client
either from the directory or through a real local HTTP server.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, MetaFile
from tuf.api.serialization.json import JSONSerializer

from shared.trust import (
    ExpiredMetadataError,
    HashMismatchError,
    RepositoryConfigError,
    RollbackAttackError,
    SignatureError,
    TargetNotFoundError,
    TooLargeError,
    TrustClient,
    TrustError,
    UpdateRepository,
)
from shared.trust.http import RepoHTTPServer, parse_range
from shared.trust.repository import default_offline_dir
from tests.helpers import build_bundle


@pytest.fixture
def repo(tmp_path: Path, sample_payload: Path) -> UpdateRepository:
    r = UpdateRepository.init(tmp_path / "repo", root_keys=3, root_threshold=2)
    r.add_bundle(build_bundle(sample_payload, tmp_path / "v1.bundle"))
    return r


@pytest.fixture(params=["dir", "http"])
def source(request: pytest.FixtureRequest, repo: UpdateRepository) -> Iterator[str]:
    if request.param == "dir":
        yield str(repo.dir)
    else:
        with RepoHTTPServer(repo.dir) as server:
            yield server.url


def trusted_root(repo: UpdateRepository) -> bytes:
    return (repo.metadata_dir / "1.root.json").read_bytes()


def client(repo: UpdateRepository, source: str, cache: Path) -> TrustClient:
    return TrustClient(repository=source, trusted_root=trusted_root(repo), cache_dir=cache)


def forge(
    repo: UpdateRepository,
    role: str,
    mutate: Callable[[Any], None],
    signers: list[Signer] | None = None,
    *,
    bump: bool = True,
) -> None:
    """Rewrite a role's metadata the way an attacker holding `signers` could."""
    md: Metadata[Any] = Metadata.from_bytes((repo.metadata_dir / f"{role}.json").read_bytes())
    mutate(md.signed)
    if bump:
        md.signed.version += 1
    md.signatures.clear()
    for s in signers if signers is not None else repo.signers(role):
        md.sign(s, append=True)
    data = md.to_bytes(JSONSerializer())
    if role != "timestamp":
        (repo.metadata_dir / f"{md.signed.version}.{role}.json").write_bytes(data)
    (repo.metadata_dir / f"{role}.json").write_bytes(data)


TARGET = "classifier/1.0.0/edge-cpu.bundle"


# ---- the happy paths ------------------------------------------------------------------------


def test_verify_and_fetch(repo: UpdateRepository, source: str, tmp_path: Path) -> None:
    c = client(repo, source, tmp_path / "cache")
    targets = c.targets()
    assert [t.path for t in targets] == [TARGET]
    assert targets[0].tidegate["version"] == "1.0.0"
    assert targets[0].tidegate["skus"] == ["edge-cpu"]
    got = c.download(c.get_target(TARGET), tmp_path / "got.bundle")
    assert got.read_bytes() == (tmp_path / "v1.bundle").read_bytes()


def test_private_keys_are_0600_and_root_and_targets_are_offline(repo: UpdateRepository) -> None:
    """The repository directory (what the fleet server holds) has the online keys only:
    snapshot, timestamp and the delegated release role; root and targets are elsewhere."""
    online = {k.parent.name for k in repo.keys_dir.rglob("*.pem")}
    assert online == {"snapshot", "timestamp", "release"}
    offline_dir = default_offline_dir(repo.dir)
    offline = sorted(k.parent.name for k in offline_dir.rglob("*.pem"))
    assert offline == ["root", "root", "root", "targets"]
    for k in [*repo.keys_dir.rglob("*.pem"), *offline_dir.rglob("*.pem")]:
        assert stat.S_IMODE(os.stat(k).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(repo.keys_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(offline_dir).st_mode) == 0o700
    signers = json.loads((repo.dir / "repo.json").read_text())["signers"].values()
    assert not [u for u in signers if "offline" in u]
    served = list(repo.metadata_dir.rglob("*")) + list(repo.targets_dir.rglob("*"))
    assert not [p for p in served if p.suffix == ".pem"]


def test_http_server_never_serves_keys(repo: UpdateRepository) -> None:
    import urllib.error
    import urllib.request

    key = next(repo.keys_dir.rglob("*.pem")).relative_to(repo.dir)
    with RepoHTTPServer(repo.dir) as server:
        for path in (f"/{key}", f"/metadata/../{key}", "/repo.json"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(server.url + path, timeout=5)
            assert err.value.code == 404


def test_http_server_answers_ranges(repo: UpdateRepository) -> None:
    import urllib.request

    target = next(repo.targets_dir.rglob("*.bundle"))
    rel = target.relative_to(repo.dir).as_posix()
    with RepoHTTPServer(repo.dir) as server:
        req = urllib.request.Request(server.url + "/" + rel, headers={"Range": "bytes=10-19"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 206
            assert resp.read() == target.read_bytes()[10:20]
    assert parse_range("bytes=-5", 100) == (95, 99)
    assert parse_range("bytes=100-", 100) is None


def test_publishing_is_idempotent_and_immutable(
    repo: UpdateRepository, tmp_path: Path, sample_payload: Path
) -> None:
    v = repo.targets().version
    repo.add_bundle(tmp_path / "v1.bundle")
    assert repo.targets().version == v
    other = build_bundle(sample_payload, tmp_path / "other.bundle", min_agent_version="0.2.0")
    with pytest.raises(TrustError, match="already published with different content"):
        repo.add_bundle(other)


def test_unknown_target(repo: UpdateRepository, source: str, tmp_path: Path) -> None:
    with pytest.raises(TargetNotFoundError, match="nope"):
        client(repo, source, tmp_path / "cache").get_target("nope")


def test_missing_key_is_a_clear_error(repo: UpdateRepository, tmp_path: Path, sample_payload: Path) -> None:
    for k in (repo.keys_dir / "snapshot").glob("*.pem"):
        k.unlink()
    other = build_bundle(sample_payload, tmp_path / "v2.bundle", version="2.0.0")
    with pytest.raises(RepositoryConfigError, match="signer file2:.*snapshot.*: no such key file"):
        repo.add_bundle(other)


def test_a_publish_without_the_release_key_fails_and_publishes_nothing(
    repo: UpdateRepository, source: str, tmp_path: Path, sample_payload: Path
) -> None:
    for k in (repo.keys_dir / "release").glob("*.pem"):
        k.unlink()
    server = UpdateRepository(repo.dir)
    with pytest.raises(RepositoryConfigError, match="no such key file"):
        server.add_bundle(build_bundle(sample_payload, tmp_path / "v2.bundle", version="2.0.0"))
    assert [t.path for t in client(repo, source, tmp_path / "cache").targets()] == [TARGET]


# ---- rotation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["root", "targets", "snapshot", "timestamp"])
def test_old_client_updates_through_rotation(
    repo: UpdateRepository, source: str, tmp_path: Path, role: str
) -> None:
    cache = tmp_path / "cache"
    client(repo, source, cache).refresh()
    old_keys = set(repo.root().roles[role].keyids)
    repo.rotate(role)
    repo.rotate(role)  # two rotations: the client must walk the chain, not jump
    assert not old_keys & set(repo.root().roles[role].keyids)
    c = client(repo, source, cache)  # still bootstrapped from root v1 only
    c.refresh()
    assert [t.path for t in c.targets()] == [TARGET]
    fresh = client(repo, source, tmp_path / "fresh-cache")
    fresh.download(fresh.get_target(TARGET), tmp_path / "got.bundle")


def test_metadata_signed_by_rotated_out_key_is_refused(
    repo: UpdateRepository, source: str, tmp_path: Path
) -> None:
    old_ts = repo.signers("timestamp")
    repo.rotate("timestamp")
    forge(repo, "timestamp", lambda s: None, old_ts)
    with pytest.raises(SignatureError, match="timestamp"):
        client(repo, source, tmp_path / "cache").refresh()


# ---- attacks ------------------------------------------------------------------------------------


def test_target_bytes_changed(repo: UpdateRepository, source: str, tmp_path: Path) -> None:
    stored = next(repo.targets_dir.rglob("*.bundle"))
    data = bytearray(stored.read_bytes())
    data[100] ^= 0x01
    stored.write_bytes(bytes(data))
    c = client(repo, source, tmp_path / "cache")
    with pytest.raises(HashMismatchError):
        c.download(c.get_target(TARGET), tmp_path / "got.bundle")
    assert not (tmp_path / "got.bundle").exists()


def test_target_endless_data(repo: UpdateRepository, source: str, tmp_path: Path) -> None:
    stored = next(repo.targets_dir.rglob("*.bundle"))
    with stored.open("ab") as fh:
        fh.write(b"\0" * 4096)
    c = client(repo, source, tmp_path / "cache")
    with pytest.raises(TooLargeError):
        c.download(c.get_target(TARGET), tmp_path / "got.bundle")


def test_metadata_signed_by_unknown_key(repo: UpdateRepository, source: str, tmp_path: Path) -> None:
    forge(repo, "timestamp", lambda s: None, [CryptoSigner.generate_ed25519()])
    with pytest.raises(SignatureError, match="timestamp"):
        client(repo, source, tmp_path / "cache").refresh()


def test_targets_signed_by_unknown_key(repo: UpdateRepository, source: str, tmp_path: Path) -> None:
    """Arbitrary installation: a new target signed by an attacker's key."""
    forge(repo, "targets", lambda s: None, [CryptoSigner.generate_ed25519()])
    tv = json.loads((repo.metadata_dir / "targets.json").read_bytes())["signed"]["version"]
    forge(repo, "snapshot", lambda s: s.meta.__setitem__("targets.json", MetaFile(tv)))
    sv = json.loads((repo.metadata_dir / "snapshot.json").read_bytes())["signed"]["version"]
    forge(repo, "timestamp", lambda s: setattr(s, "snapshot_meta", MetaFile(sv)))
    with pytest.raises(SignatureError, match="targets"):
        client(repo, source, tmp_path / "cache").refresh()


def test_expired_timestamp(repo: UpdateRepository, source: str, tmp_path: Path) -> None:
    """Indefinite freeze: a repository (or mirror) that stops re-signing is refused."""
    repo.refresh(now=datetime.now(UTC) - timedelta(days=3))
    with pytest.raises(ExpiredMetadataError, match="timestamp"):
        client(repo, source, tmp_path / "cache").refresh()


def test_replayed_old_timestamp(repo: UpdateRepository, source: str, tmp_path: Path) -> None:
    old = (repo.metadata_dir / "timestamp.json").read_bytes()
    repo.refresh()
    cache = tmp_path / "cache"
    client(repo, source, cache).refresh()
    (repo.metadata_dir / "timestamp.json").write_bytes(old)
    with pytest.raises(RollbackAttackError, match="timestamp"):
        client(repo, source, cache).refresh()


def test_rolled_back_snapshot_version(repo: UpdateRepository, source: str, tmp_path: Path) -> None:
    repo.refresh()
    cache = tmp_path / "cache"
    client(repo, source, cache).refresh()
    # An attacker with the timestamp key points to an older snapshot.
    forge(repo, "timestamp", lambda s: setattr(s, "snapshot_meta", MetaFile(1)))
    with pytest.raises(RollbackAttackError, match="snapshot"):
        client(repo, source, cache).refresh()


def test_rolled_back_targets_version(
    repo: UpdateRepository, source: str, tmp_path: Path, sample_payload: Path
) -> None:
    repo.add_bundle(build_bundle(sample_payload, tmp_path / "v2.bundle", version="2.0.0"))
    cache = tmp_path / "cache"
    client(repo, source, cache).targets()
    # An attacker with snapshot and timestamp keys serves release v2 (without 2.0.0) again.
    forge(repo, "snapshot", lambda s: s.meta.__setitem__("release.json", MetaFile(2)))
    sv = json.loads((repo.metadata_dir / "snapshot.json").read_bytes())["signed"]["version"]
    forge(repo, "timestamp", lambda s: setattr(s, "snapshot_meta", MetaFile(sv)))
    with pytest.raises(RollbackAttackError, match="release"):
        client(repo, source, cache).refresh()


def test_metadata_above_length_limit(repo: UpdateRepository, source: str, tmp_path: Path) -> None:
    forge(repo, "timestamp", lambda s: s.unrecognized_fields.__setitem__("pad", "x" * 20_000))
    with pytest.raises(TooLargeError, match="timestamp"):
        client(repo, source, tmp_path / "cache").refresh()


def test_root_threshold_not_met(repo: UpdateRepository, source: str, tmp_path: Path) -> None:
    """Key compromise below threshold: one of three root keys cannot make a new root."""
    one_key = repo.signers("root")[:1]
    attacker = CryptoSigner.generate_ed25519()

    def take_over(root: Any) -> None:
        for keyid in list(root.roles["targets"].keyids):
            root.revoke_key(keyid, "targets")
        root.add_key(attacker.public_key, "targets")

    forge(repo, "root", take_over, one_key)
    with pytest.raises(SignatureError, match="root"):
        client(repo, source, tmp_path / "cache").refresh()


def test_mix_and_match_targets(
    repo: UpdateRepository, source: str, tmp_path: Path, sample_payload: Path
) -> None:
    """release.json from one publish served with a snapshot that names another version."""
    repo.add_bundle(build_bundle(sample_payload, tmp_path / "v2.bundle", version="2.0.0"))
    current = json.loads((repo.metadata_dir / "snapshot.json").read_bytes())["signed"]
    tv = current["meta"]["release.json"]["version"]
    # Serve the older release file under the current version's name.
    (repo.metadata_dir / f"{tv}.release.json").write_bytes(
        (repo.metadata_dir / f"{tv - 1}.release.json").read_bytes()
    )
    c = client(repo, source, tmp_path / "cache")
    assert c.targets() == []  # the role fails verification: it vouches for nothing
    with pytest.raises(RollbackAttackError, match="release"):
        c.get_target("classifier/2.0.0/edge-cpu.bundle")


def test_init_refuses_bad_threshold_and_nonempty_dir(tmp_path: Path) -> None:
    with pytest.raises(RepositoryConfigError, match="threshold"):
        UpdateRepository.init(tmp_path / "r", root_keys=1, root_threshold=2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(RepositoryConfigError, match="not empty"):
        UpdateRepository.init(tmp_path / "full")
    with pytest.raises(RepositoryConfigError, match="no such repository"):
        UpdateRepository(tmp_path / "missing")


def test_an_older_version_is_refused_unless_it_is_an_allowed_downgrade(
    repo: UpdateRepository, tmp_path: Path, sample_payload: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The repository already holds classifier 1.0.0 for edge-cpu (the fixture)."""
    from tidegate.cli import main

    repo.add_bundle(build_bundle(sample_payload, tmp_path / "v11.bundle", version="1.1.0"))
    older = build_bundle(sample_payload, tmp_path / "v105.bundle", version="1.0.5")
    with pytest.raises(TrustError, match=r"1\.0\.5 is older than 1\.1\.0.*--allow-rollback"):
        repo.add_bundle(older)
    assert not any("1.0.5" in p for p in repo.targets().targets)
    assert main(["repo", "add", str(repo.dir), str(older)]) == 1
    assert "older than 1.1.0" in capsys.readouterr().err
    assert repo.add_bundle(older, allow_rollback=True).custom["allow_rollback"] is True
    other_sku = build_bundle(sample_payload, tmp_path / "v09.bundle", version="0.9.0", skus=["edge-gpu"])
    assert repo.add_bundle(other_sku).path.endswith("edge-gpu.bundle")  # no edge-gpu version above it
