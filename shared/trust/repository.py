"""The update repository: TUF metadata and bundle targets in one directory.

Layout (only ``metadata/`` and ``targets/`` are ever served)::

    DIR/repo.json                  expiry periods and thresholds (no secrets)
    DIR/keys/<role>/<keyid>.pem    ed25519 private keys, mode 0600, dir 0700
    DIR/metadata/N.root.json       every root version, for the client's root chain
    DIR/metadata/timestamp.json
    DIR/metadata/N.snapshot.json   consistent snapshots: old versions stay
    DIR/metadata/N.targets.json    fetchable for clients mid-update
    DIR/targets/<dir>/<sha256>.<name>

Every write goes through `shared.fsutil` (temp, fsync, rename, fsync dir).
Functions take ``now`` so that expiry can be tested without sleeping.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from shared.bundle import BundleManifest, ReaderLimits, verify_bundle
from shared.fsutil import atomic_write_bytes, fsync_dir
from shared.trust.errors import RepositoryConfigError, TrustError

ROLES = ("root", "targets", "snapshot", "timestamp")
DEFAULT_EXPIRY_DAYS = {"root": 365, "targets": 90, "snapshot": 7, "timestamp": 1}
CUSTOM_KEY = "tidegate"
DEFAULT_LIMITS = ReaderLimits()


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class RepoConfig:
    expiry_days: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_EXPIRY_DAYS))
    thresholds: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 1))

    def to_json(self) -> bytes:
        return json.dumps(
            {"expiry_days": self.expiry_days, "thresholds": self.thresholds}, indent=2, sort_keys=True
        ).encode()

    @classmethod
    def load(cls, path: Path) -> RepoConfig:
        try:
            raw = json.loads(path.read_text())
            return cls(expiry_days=dict(raw["expiry_days"]), thresholds=dict(raw["thresholds"]))
        except FileNotFoundError:
            raise RepositoryConfigError(f"{path}: not an update repository (no repo.json)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise RepositoryConfigError(f"{path}: unreadable repository config ({exc})") from None


@dataclass(frozen=True)
class PublishedTarget:
    path: str
    length: int
    sha256: str
    custom: dict[str, Any]


def default_target_path(manifest: BundleManifest) -> str:
    """Where a bundle lives in the repository: one path per name, version and SKU set."""
    return f"{manifest.name}/{manifest.version}/{'+'.join(sorted(manifest.skus))}.bundle"


class UpdateRepository:
    """Writes and signs one TUF repository on local disk."""

    def __init__(self, root_dir: Path) -> None:
        self.dir = root_dir
        self.metadata_dir = root_dir / "metadata"
        self.targets_dir = root_dir / "targets"
        self.keys_dir = root_dir / "keys"
        if not root_dir.is_dir():
            raise RepositoryConfigError(f"{root_dir}: no such repository directory")
        self.config = RepoConfig.load(root_dir / "repo.json")

    # ---- creation -------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        root_dir: Path,
        *,
        root_keys: int = 1,
        root_threshold: int = 1,
        expiry_days: dict[str, float] | None = None,
        now: datetime | None = None,
    ) -> UpdateRepository:
        """Create keys and version-1 metadata for all four top-level roles."""
        if root_threshold < 1 or root_threshold > root_keys:
            raise RepositoryConfigError(
                f"root threshold {root_threshold} must be between 1 and the number of root keys ({root_keys})"
            )
        if root_dir.exists() and any(root_dir.iterdir()):
            raise RepositoryConfigError(f"{root_dir}: directory is not empty")
        now = now or _utcnow()
        config = RepoConfig()
        config.thresholds["root"] = root_threshold
        if expiry_days:
            unknown = set(expiry_days) - set(ROLES)
            if unknown:
                raise RepositoryConfigError(f"unknown role(s) in expiry: {sorted(unknown)}")
            config.expiry_days.update(expiry_days)
        for sub in ("metadata", "targets"):
            (root_dir / sub).mkdir(parents=True, exist_ok=True)
        (root_dir / "keys").mkdir(mode=0o700, exist_ok=True)
        atomic_write_bytes(root_dir / "repo.json", config.to_json())

        root = Root(expires=now + timedelta(days=config.expiry_days["root"]), consistent_snapshot=True)
        root_signers: list[Signer] = []
        for role in ROLES:
            count = root_keys if role == "root" else 1
            for _ in range(count):
                signer = _new_key(root_dir / "keys", role)
                root.add_key(signer.public_key, role)
                if role == "root":
                    root_signers.append(signer)
            root.roles[role].threshold = config.thresholds[role]
        repo = cls(root_dir)
        repo._write_root(Metadata(root), signers=root_signers)
        targets = Targets(expires=now + timedelta(days=config.expiry_days["targets"]))
        repo._write_role(Metadata(targets))
        repo._publish_snapshot_and_timestamp(now, bump_snapshot=False)
        return repo

    # ---- keys -----------------------------------------------------------------------------

    def signers(self, role: str) -> list[Signer]:
        """Signers for the keys that the current root assigns to `role`."""
        root = self.root()
        keyids = root.roles[role].keyids
        out: list[Signer] = []
        for keyid in keyids:
            path = self.keys_dir / role / f"{keyid}.pem"
            if not path.exists():
                continue
            out.append(_load_signer(path, root.keys[keyid]))
        if len(out) < root.roles[role].threshold:
            raise RepositoryConfigError(
                f"role {role!r}: {len(out)} private key(s) under {self.keys_dir / role}, "
                f"threshold is {root.roles[role].threshold}"
            )
        return out

    # ---- reading --------------------------------------------------------------------------

    def _load(self, role: str) -> Metadata[Any]:
        path = self.metadata_dir / f"{role}.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RepositoryConfigError(f"{path}: missing") from None
        try:
            return Metadata.from_bytes(data)
        except Exception as exc:  # python-tuf raises several deserialisation types
            raise RepositoryConfigError(f"{path}: unreadable metadata ({exc})") from None

    def root(self) -> Root:
        return cast(Root, self._load("root").signed)

    def targets(self) -> Targets:
        return cast(Targets, self._load("targets").signed)

    def published(self) -> list[PublishedTarget]:
        out = []
        for path, tf in sorted(self.targets().targets.items()):
            out.append(
                PublishedTarget(path, tf.length, tf.hashes["sha256"], dict(tf.custom.get(CUSTOM_KEY, {})))
            )
        return out

    # ---- writing --------------------------------------------------------------------------

    def _sign(self, md: Metadata[Any], signers: Iterable[Signer]) -> None:
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)

    def _write_root(self, md: Metadata[Root], signers: Iterable[Signer]) -> None:
        self._sign(md, signers)
        data = md.to_bytes(JSONSerializer(compact=False))
        atomic_write_bytes(self.metadata_dir / f"{md.signed.version}.root.json", data)
        atomic_write_bytes(self.metadata_dir / "root.json", data)

    def _write_role(self, md: Metadata[Any]) -> None:
        role = md.signed.type
        self._sign(md, self.signers(role))
        data = md.to_bytes(JSONSerializer(compact=False))
        if role != "timestamp":
            atomic_write_bytes(self.metadata_dir / f"{md.signed.version}.{role}.json", data)
        atomic_write_bytes(self.metadata_dir / f"{role}.json", data)

    def _publish_snapshot_and_timestamp(self, now: datetime, *, bump_snapshot: bool = True) -> None:
        targets = self.targets()
        try:
            snap_md: Metadata[Snapshot] = self._load("snapshot")
            snap = snap_md.signed
            if bump_snapshot:
                snap.version += 1
        except RepositoryConfigError:
            snap_md = Metadata(Snapshot())
            snap = snap_md.signed
        snap.meta["targets.json"] = MetaFile(version=targets.version)
        snap.expires = now + timedelta(days=self.config.expiry_days["snapshot"])
        self._write_role(snap_md)
        try:
            ts_md: Metadata[Timestamp] = self._load("timestamp")
            ts_md.signed.version += 1
        except RepositoryConfigError:
            ts_md = Metadata(Timestamp())
        ts_md.signed.snapshot_meta = MetaFile(version=snap.version)
        ts_md.signed.expires = now + timedelta(days=self.config.expiry_days["timestamp"])
        self._write_role(ts_md)

    def add_bundle(
        self,
        bundle: Path,
        *,
        target_path: str | None = None,
        allow_rollback: bool = False,
        limits: ReaderLimits = DEFAULT_LIMITS,
        now: datetime | None = None,
    ) -> PublishedTarget:
        """Verify a bundle, copy it in under its hash, and sign it into targets.

        Publishing the same bytes twice is a no-op; publishing different bytes
        under a path already published is refused (published targets are
        immutable: devices mid-update may be fetching them).
        """
        now = now or _utcnow()
        manifest = verify_bundle(bundle, limits=limits)
        path = target_path or default_target_path(manifest)
        custom = {
            CUSTOM_KEY: {
                "name": manifest.name,
                "version": manifest.version,
                "skus": list(manifest.skus),
                "runtime": manifest.runtime.value,
                "min_agent_version": manifest.min_agent_version,
                "allow_rollback": allow_rollback,
            }
        }
        tf = TargetFile.from_file(path, str(bundle), ["sha256"])
        tf.unrecognized_fields["custom"] = custom
        md: Metadata[Targets] = self._load("targets")
        if not allow_rollback and path not in md.signed.targets:
            _refuse_older(md.signed, manifest.name, manifest.version, set(manifest.skus))
        existing = md.signed.targets.get(path)
        if existing is not None:
            if existing.hashes == tf.hashes and existing.custom == tf.custom:
                return PublishedTarget(path, tf.length, tf.hashes["sha256"], custom[CUSTOM_KEY])
            raise TrustError(f"target {path!r} is already published with different content")
        digest = tf.hashes["sha256"]
        dirname, _, basename = path.rpartition("/")
        dest = self.targets_dir / dirname / f"{digest}.{basename}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(bundle, tmp)
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        md.signed.targets[path] = tf
        md.signed.version += 1
        md.signed.expires = now + timedelta(days=self.config.expiry_days["targets"])
        self._write_role(md)
        self._publish_snapshot_and_timestamp(now)
        return PublishedTarget(path, tf.length, digest, custom[CUSTOM_KEY])

    def refresh(self, *, now: datetime | None = None) -> tuple[int, int]:
        """Re-sign snapshot and timestamp with fresh expiry; returns their new versions."""
        now = now or _utcnow()
        self._publish_snapshot_and_timestamp(now)
        return self._load("snapshot").signed.version, self._load("timestamp").signed.version

    def rotate(self, role: str, *, now: datetime | None = None) -> list[str]:
        """Replace every key of `role` with a fresh one; returns the new key ids.

        The new root is signed by the old root keys *and* the new ones, so a
        client that trusts only the old root still walks the chain to it.
        Metadata of the rotated role (and everything below it) is re-signed.
        """
        if role not in ROLES:
            raise RepositoryConfigError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        now = now or _utcnow()
        old_root_signers = self.signers("root")
        root_md: Metadata[Root] = self._load("root")
        root = root_md.signed
        old_keyids = list(root.roles[role].keyids)
        new_signers = [_new_key(self.keys_dir, role) for _ in old_keyids]
        for keyid in old_keyids:
            root.revoke_key(keyid, role)
        for signer in new_signers:
            root.add_key(signer.public_key, role)
        root.version += 1
        root.expires = now + timedelta(days=self.config.expiry_days["root"])
        signers = [*old_root_signers, *new_signers] if role == "root" else old_root_signers
        self._write_root(root_md, signers)
        for keyid in old_keyids:
            (self.keys_dir / role / f"{keyid}.pem").unlink(missing_ok=True)
        fsync_dir(self.keys_dir / role)
        if role == "targets":
            md: Metadata[Targets] = self._load("targets")
            md.signed.version += 1
            self._write_role(md)
        if role in ("targets", "snapshot", "timestamp", "root"):
            self._publish_snapshot_and_timestamp(now)
        return [s.public_key.keyid for s in new_signers]


def _new_key(keys_dir: Path, role: str) -> CryptoSigner:
    signer = CryptoSigner.generate_ed25519()
    role_dir = keys_dir / role
    role_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write_bytes(role_dir / f"{signer.public_key.keyid}.pem", signer.private_bytes, mode=0o600)
    return signer


def _load_signer(path: Path, public_key: Any) -> Signer:
    try:
        private = load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise RepositoryConfigError(f"{path}: unreadable private key ({exc})") from None
    return CryptoSigner(private, public_key)


def _refuse_older(targets: Targets, name: str, version: str, skus: set[str]) -> None:
    """A version below the newest already published for the same name and a shared SKU is a
    mistake unless it is meant (`allow_rollback`): devices would see it as a downgrade."""
    from shared.semver import SemVer

    ours = SemVer.parse(version)
    for path, tf in targets.targets.items():
        other = (tf.unrecognized_fields.get("custom") or {}).get(CUSTOM_KEY) or {}
        if other.get("name") != name or not skus & set(other.get("skus", [])):
            continue
        theirs = str(other.get("version", "0.0.0"))
        if SemVer.parse(theirs) > ours:
            raise TrustError(
                f"{name} {version} is older than {theirs}, already published as {path}; "
                "publish a downgrade on purpose with --allow-rollback"
            )
