"""The update repository: TUF metadata and bundle targets in one directory.

The key model (docs/SECURITY.md): root and the top-level targets role are *offline* — their
keys live in a directory (or on a token) the publishing host never holds; the top-level
targets role delegates target paths to *online* roles (``release`` by default, scoped by path
pattern) whose keys the fleet server and CI use, and snapshot and timestamp are online. A
delegated role may need a threshold of two (a build key online and an approver's key
elsewhere), so that one stolen online key cannot publish alone.

Layout (only ``metadata/`` and ``targets/`` are ever served)::

    DIR/repo.json                  expiry periods and the online keys' signer URIs
    DIR/keys/<role>/<keyid>.pem    online ed25519 keys, mode 0600, dir 0700
    DIR/metadata/N.root.json       every root version, for the client's root chain
    DIR/metadata/timestamp.json
    DIR/metadata/N.<role>.json     consistent snapshots: old versions stay fetchable
    DIR/staged/<role>.json         metadata awaiting signatures (never served)
    DIR/targets/<dir>/<sha256>.<name>
    OFFLINE/{root,targets}/<keyid>.pem   written by `init`; move it off the machine

A change that its delegator's threshold does not yet cover (a delegation made without the
offline targets key, a production target with one of two signatures) is *staged*: written
under ``staged/``, exported, signed elsewhere (`sign_envelope`), imported, and published with
everything it depends on once every signature is there (`_settle`).

Every write holds ``DIR/.lock`` (one writer at a time, across processes) and goes through
`shared.fsutil` (temp, fsync, rename, fsync dir). Functions take ``now`` so that expiry can
be tested without sleeping.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from securesystemslib.signer import Key, Signer
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import CanonicalJSONSerializer, JSONSerializer

from shared.bundle import BundleManifest, ReaderLimits, verify_bundle
from shared.fsutil import atomic_write_bytes, fsync_dir
from shared.trust.errors import RepositoryConfigError, TrustError
from shared.trust.keys import (
    Keyring,
    SignerError,
    file_uri,
    generate_file_key,
    load_signer,
    public_key_for_uri,
)

ROLES = ("root", "targets", "snapshot", "timestamp")
OFFLINE_ROLES = ("root", "targets")
DEFAULT_EXPIRY_DAYS = {"root": 365, "targets": 365, "snapshot": 7, "timestamp": 1, "delegated": 90}
CUSTOM_KEY = "tidegate"
DEFAULT_LIMITS = ReaderLimits()
FORMAT = 2
ROLE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class StagedChangeError(TrustError):
    """A staged change cannot be imported or signed as asked (wrong file, stale, bad signature)."""


@dataclass
class RepoConfig:
    expiry_days: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_EXPIRY_DAYS))
    #: key id -> signer URI of every online key (relative ``file2:keys/…`` lives under DIR)
    signers: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        body = {"format": FORMAT, "expiry_days": self.expiry_days, "signers": self.signers}
        return json.dumps(body, indent=2, sort_keys=True).encode()

    @classmethod
    def load(cls, path: Path) -> RepoConfig:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise RepositoryConfigError(f"{path}: not an update repository (no repo.json)") from exc
        except ValueError as exc:
            raise RepositoryConfigError(f"{path}: unreadable repository config ({exc})") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise RepositoryConfigError(
                f"{path}: written by an older tidegate (signing keys on the server); create the "
                "repository again with `tidegate repo init --offline-keys …` and republish"
            )
        try:
            return cls(expiry_days=dict(raw["expiry_days"]), signers=dict(raw["signers"]))
        except (KeyError, TypeError) as exc:
            raise RepositoryConfigError(f"{path}: unreadable repository config ({exc})") from exc

    def expiry(self, role: str) -> timedelta:
        days = self.expiry_days.get(role, self.expiry_days.get("delegated", 90))
        return timedelta(days=days)


@dataclass(frozen=True)
class Delegation:
    """An online role trusted with target paths matching `paths` (TUF glob per path segment)."""

    name: str
    paths: tuple[str, ...] = ("*/*/*",)
    threshold: int = 1


DEFAULT_DELEGATION = Delegation("release")


@dataclass(frozen=True)
class Pending:
    """A staged role still short of its threshold."""

    role: str
    version: int
    signatures: int
    threshold: int
    missing: tuple[str, ...]  # key ids that could still sign

    def describe(self) -> str:
        keys = ", ".join(k[:16] + "…" for k in self.missing)
        return (
            f"{self.role} v{self.version} has {self.signatures} of {self.threshold} signature(s); "
            f"awaits key(s) {keys}: `tidegate repo export` it, `tidegate repo sign` it where the key "
            "is, `tidegate repo import` it"
        )


@dataclass(frozen=True)
class PublishedTarget:
    path: str
    length: int
    sha256: str
    custom: dict[str, Any]
    role: str = "targets"
    #: non-empty when the target is staged, not yet visible to devices
    pending: tuple[Pending, ...] = ()


def default_target_path(manifest: BundleManifest) -> str:
    """Where a bundle lives in the repository: one path per name, version and SKU set."""
    return f"{manifest.name}/{manifest.version}/{'+'.join(sorted(manifest.skus))}.bundle"


def default_offline_dir(root_dir: Path) -> Path:
    return root_dir.parent / f"{root_dir.name}-offline-keys"


def check_patterns(paths: Sequence[str], existing: Iterable[str] = ()) -> None:
    """Refuse a delegation pattern that can match no target: TUF matches segment by segment
    (``*`` never crosses ``/``), and Tidegate's target paths are NAME/VERSION/SKUS.bundle."""
    if not paths:
        raise RepositoryConfigError("a delegation needs at least one path pattern")
    known = list(existing)
    for pattern in paths:
        if not pattern or pattern.startswith("/") or "//" in pattern:
            raise RepositoryConfigError(f"path pattern {pattern!r}: not a relative target path")
        if pattern.count("/") == 2:
            continue
        one = DelegatedRole("probe", [], 1, True, paths=[pattern])
        if not any(one.is_delegated_path(p) for p in known):
            parts = pattern.rstrip("/*").split("/")
            hint = "/".join([*(parts[:1] or ["*"]), "*", "*"])
            raise RepositoryConfigError(
                f"path pattern {pattern!r} matches no target: target paths are NAME/VERSION/SKUS.bundle "
                f"and TUF's * stops at /; did you mean {hint!r}?"
            )


class UpdateRepository:
    """Writes and signs one TUF repository on local disk.

    `offline` holds whatever offline keys the caller brought to this command (none on the
    fleet server); online keys come from repo.json.
    """

    def __init__(self, root_dir: Path, *, offline: Keyring | None = None) -> None:
        self.dir = root_dir
        self.metadata_dir = root_dir / "metadata"
        self.targets_dir = root_dir / "targets"
        self.keys_dir = root_dir / "keys"
        self.staged_dir = root_dir / "staged"
        if not root_dir.is_dir():
            raise RepositoryConfigError(f"{root_dir}: no such repository directory")
        self.config = RepoConfig.load(root_dir / "repo.json")
        self.offline = offline or Keyring()
        #: the roles the last write published (the rest of what it touched is staged)
        self.last_published: list[str] = []

    # ---- one writer ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the repository's lock (fcntl, so across processes) and read the config afresh:
        two publishers, or a publish and a refresh, must not each write on what they read
        before the other wrote."""
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.config = RepoConfig.load(self.dir / "repo.json")
            yield
        finally:
            os.close(fd)  # closing drops the lock

    # ---- creation -------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        root_dir: Path,
        *,
        offline_dir: Path | None = None,
        root_keys: int = 1,
        root_threshold: int = 1,
        expiry_days: dict[str, float] | None = None,
        key_uris: dict[str, list[str]] | None = None,
        delegations: Sequence[Delegation] = (DEFAULT_DELEGATION,),
        now: datetime | None = None,
    ) -> UpdateRepository:
        """Create keys and version-1 metadata: root and targets keys in `offline_dir` (outside
        the repository), snapshot, timestamp and the delegated roles' keys online.

        `key_uris` names existing keys (``ROLE: [uri, …]``, e.g. a PKCS#11 token) instead of
        generating files for that role. The returned repository holds the offline keys for
        the rest of this command only.
        """
        offline_dir = (offline_dir or default_offline_dir(root_dir)).absolute()
        root_abs = root_dir.absolute()
        if offline_dir == root_abs or root_abs in offline_dir.parents:
            raise RepositoryConfigError(
                f"{offline_dir}: offline keys must live outside the repository directory {root_dir}"
            )
        if root_threshold < 1 or root_threshold > root_keys:
            raise RepositoryConfigError(
                f"root threshold {root_threshold} must be between 1 and the number of root keys ({root_keys})"
            )
        key_uris = dict(key_uris or {})
        names = [d.name for d in delegations]
        unknown_roles = set(key_uris) - set(ROLES) - set(names)
        if unknown_roles:
            raise RepositoryConfigError(f"--key for unknown role(s): {', '.join(sorted(unknown_roles))}")
        for d in delegations:
            _check_role_name(d.name)
            check_patterns(d.paths)
        for where in (root_dir, offline_dir):
            if where.exists() and any(where.iterdir()):
                raise RepositoryConfigError(f"{where}: directory is not empty")
        imported = {role: [(u, public_key_for_uri(u)) for u in uris] for role, uris in key_uris.items()}
        now = now or _utcnow()
        config = RepoConfig()
        if expiry_days:
            unknown = set(expiry_days) - set(DEFAULT_EXPIRY_DAYS) - set(names)
            if unknown:
                raise RepositoryConfigError(f"unknown role(s) in expiry: {sorted(unknown)}")
            config.expiry_days.update(expiry_days)
        for sub in ("metadata", "targets", "staged"):
            (root_dir / sub).mkdir(parents=True, exist_ok=True)
        (root_dir / "keys").mkdir(mode=0o700, exist_ok=True)
        offline_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fsync_dir(root_dir)
        fsync_dir(root_dir.parent)
        offline = Keyring()

        def keys_for(role: str, count: int) -> list[Key]:
            if role in imported:
                pairs = imported[role]
            else:
                base = offline_dir if role in OFFLINE_ROLES else root_dir / "keys"
                pairs = [_generated(base / role) for _ in range(count)]
            for uri, key in pairs:
                if role in OFFLINE_ROLES:
                    offline.uris[key.keyid] = uri
                else:
                    config.signers[key.keyid] = _relative_uri(uri, root_dir)
            return [key for _, key in pairs]

        root = Root(expires=now + config.expiry("root"), consistent_snapshot=True)
        for role in ROLES:
            for key in keys_for(role, root_keys if role == "root" else 1):
                root.add_key(key, role)
        root.roles["root"].threshold = root_threshold
        targets = Targets(expires=now + config.expiry("targets"))
        targets.delegations = Delegations(keys={}, roles={})
        delegated: list[Metadata[Targets]] = []
        for d in delegations:
            keys = keys_for(d.name, d.threshold)
            _add_delegation(targets, d, keys)
            delegated.append(Metadata(Targets(expires=now + config.expiry(d.name))))
        atomic_write_bytes(root_dir / "repo.json", config.to_json())
        repo = cls(root_dir, offline=offline)
        with repo._writing():
            root_md = Metadata(root)
            repo._sign(root_md, repo._signers_for(root.roles["root"].keyids, root.keys))
            repo._write_published("root", root_md)
            targets_md = Metadata(targets)
            repo._stage_signed("targets", targets_md)
            for d, md in zip(delegations, delegated, strict=True):
                repo._stage_signed(d.name, md)
            repo._settle(now, force_snapshot=True)
        return repo

    # ---- keys -----------------------------------------------------------------------------

    def _keyring(self) -> Keyring:
        online = {k: _absolute_uri(u, self.dir) for k, u in self.config.signers.items()}
        return Keyring(online).merged(self.offline)

    def _signers_for(self, keyids: Iterable[str], keys: dict[str, Key]) -> list[Signer]:
        ring = self._keyring()
        out: list[Signer] = []
        for keyid in keyids:
            signer = ring.signer(keys[keyid])
            if signer is not None:
                out.append(signer)
        return out

    def signers(self, role: str) -> list[Signer]:
        """Signers at hand for the keys that `role`'s delegator assigns to it (a threshold's worth
        or refused: for a role that must be signed now, such as snapshot)."""
        keyids, keys, threshold = self._role_keys(role)
        out = self._signers_for(keyids, keys)
        if len(out) < threshold:
            where = "offline keys (--offline-keys)" if role in OFFLINE_ROLES else "repo.json's signers"
            raise RepositoryConfigError(
                f"role {role!r}: {len(out)} private key(s) at hand in {where}, threshold is {threshold}"
            )
        return out

    def _role_keys(self, role: str) -> tuple[list[str], dict[str, Key], int]:
        if role in ROLES:
            root = self.root()
            return list(root.roles[role].keyids), dict(root.keys), root.roles[role].threshold
        delegator = self._effective_targets().signed
        dele = delegator.delegations
        if dele is None or dele.roles is None or role not in dele.roles:
            raise RepositoryConfigError(f"no delegated role {role!r} (see `tidegate repo delegations`)")
        r = dele.roles[role]
        return list(r.keyids), dict(dele.keys), r.threshold

    # ---- reading --------------------------------------------------------------------------

    def _load(self, role: str, *, staged: bool = False) -> Metadata[Any]:
        path = (self.staged_dir if staged else self.metadata_dir) / f"{role}.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise RepositoryConfigError(f"{path}: missing") from exc
        if staged:
            data = json.dumps(_unwrap(data, path)[1]).encode()
        try:
            return Metadata.from_bytes(data)
        except Exception as exc:  # python-tuf raises several deserialisation types
            raise RepositoryConfigError(f"{path}: unreadable metadata ({exc})") from exc

    def _effective(self, role: str) -> Metadata[Any]:
        if (self.staged_dir / f"{role}.json").exists():
            return self._load(role, staged=True)
        return self._load(role)

    def _effective_targets(self) -> Metadata[Targets]:
        return self._effective("targets")

    def root(self) -> Root:
        return cast(Root, self._load("root").signed)

    def targets(self) -> Targets:
        return cast(Targets, self._load("targets").signed)

    def delegations(self) -> list[DelegatedRole]:
        dele = self.targets().delegations
        return list(dele.roles.values()) if dele is not None and dele.roles else []

    def _published_roles(self) -> list[tuple[str, Targets]]:
        """Top-level targets and every published delegated role, in delegation order."""
        out: list[tuple[str, Targets]] = [("targets", self.targets())]
        for d in self.delegations():
            if (self.metadata_dir / f"{d.name}.json").exists():
                out.append((d.name, cast(Targets, self._load(d.name).signed)))
        return out

    def published(self) -> list[PublishedTarget]:
        """Every published target with the role that signs it (as a client resolves it)."""
        seen: dict[str, PublishedTarget] = {}
        delegated = {d.name: d for d in self.delegations()}
        for role, signed in self._published_roles():
            for path, tf in sorted(signed.targets.items()):
                if path in seen or (role in delegated and not delegated[role].is_delegated_path(path)):
                    continue
                info = dict(tf.custom.get(CUSTOM_KEY, {}))
                seen[path] = PublishedTarget(path, tf.length, tf.hashes["sha256"], info, role)
        return [seen[p] for p in sorted(seen)]

    def staged(self) -> list[Pending]:
        """Every staged role and the signatures it still needs."""
        out = []
        for path in sorted(self.staged_dir.glob("*.json")) if self.staged_dir.is_dir() else []:
            role = path.stem
            md = self._load(role, staged=True)
            out.append(self._pending(role, md))
        return out

    # ---- signing and staging ---------------------------------------------------------------

    def _sign(self, md: Metadata[Any], signers: Iterable[Signer]) -> None:
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)

    def _write_published(self, role: str, md: Metadata[Any]) -> None:
        data = md.to_bytes(JSONSerializer(compact=False))
        if role != "timestamp":
            atomic_write_bytes(self.metadata_dir / f"{md.signed.version}.{role}.json", data)
        atomic_write_bytes(self.metadata_dir / f"{role}.json", data)

    def _stage_signed(self, role: str, md: Metadata[Any]) -> None:
        """Sign `md` with every key of `role` at hand and stage it; `_settle` publishes it once
        its delegator's threshold is met."""
        keyids, keys, _ = self._role_keys(role)
        self._sign(md, self._signers_for(keyids, keys))
        self._write_staged(role, md)

    def _write_staged(self, role: str, md: Metadata[Any]) -> None:
        envelope = {"role": role, "metadata": md.to_dict()}
        atomic_write_bytes(self.staged_dir / f"{role}.json", json.dumps(envelope, indent=1).encode())

    def _verification(
        self, role: str, md: Metadata[Any], delegator: Root | Targets
    ) -> tuple[int, int, list[str]]:
        payload = CanonicalJSONSerializer().serialize(md.signed)
        result = delegator.get_verification_result(role, payload, dict(md.signatures))
        return len(result.signed), result.threshold, sorted(result.unsigned)

    def _pending(self, role: str, md: Metadata[Any]) -> Pending:
        if role in ROLES:
            return self._check(role, md, self.root())
        return self._check(role, md, self._effective_targets().signed)

    def _settle(self, now: datetime, *, force_snapshot: bool = False) -> list[Pending]:
        """Publish every staged role that its delegator's threshold covers and whose delegator
        is published or published with it; then snapshot and timestamp. Returns what waits.

        A delegated role is checked against the staged targets once that is ready, and against
        the published targets otherwise, so a pending delegation of one role does not hold back
        publishes to another whose keys it leaves alone."""
        staged = {p.stem: self._load(p.stem, staged=True) for p in sorted(self.staged_dir.glob("*.json"))}
        ready: list[str] = []
        waiting: list[Pending] = []
        published = (self.metadata_dir / "targets.json").exists()
        delegator: Targets = self._load("targets").signed if published else Targets()
        if "targets" in staged:
            p = self._check("targets", staged["targets"], self.root())
            if p.signatures >= p.threshold:
                ready.append("targets")
                delegator = staged["targets"].signed
            else:
                waiting.append(p)
        for role, md in staged.items():
            if role == "targets":
                continue
            p = self._check(role, md, delegator)
            if p.signatures >= p.threshold:
                ready.append(role)
            else:
                waiting.append(p)
        self.last_published = list(ready)
        for role in ready:  # targets first: the delegated roles verify against it
            self._write_published(role, staged[role])
        for role in ready:
            (self.staged_dir / f"{role}.json").unlink()
        if ready:
            fsync_dir(self.staged_dir)
        if ready or force_snapshot:
            self._publish_snapshot_and_timestamp(now, bump_snapshot=not force_snapshot)
        return waiting

    def _check(self, role: str, md: Metadata[Any], delegator: Root | Targets) -> Pending:
        """How many of the signatures on `md` the delegator's keys for `role` verify (a role it
        does not delegate counts as none)."""
        try:
            have, threshold, missing = self._verification(role, md, delegator)
        except ValueError:
            return Pending(role, md.signed.version, 0, 1, ())
        return Pending(role, md.signed.version, have, threshold, tuple(missing))

    def _publish_snapshot_and_timestamp(self, now: datetime, *, bump_snapshot: bool = True) -> None:
        try:
            snap_md: Metadata[Snapshot] = self._load("snapshot")
            if bump_snapshot:
                snap_md.signed.version += 1
        except RepositoryConfigError:
            snap_md = Metadata(Snapshot())
        snap = snap_md.signed
        snap.meta = {"targets.json": MetaFile(version=self.targets().version)}
        for d in self.delegations():
            if (self.metadata_dir / f"{d.name}.json").exists():
                snap.meta[f"{d.name}.json"] = MetaFile(version=self._load(d.name).signed.version)
        snap.expires = now + self.config.expiry("snapshot")
        self._sign(snap_md, self.signers("snapshot"))
        self._write_published("snapshot", snap_md)
        try:
            ts_md: Metadata[Timestamp] = self._load("timestamp")
            ts_md.signed.version += 1
        except RepositoryConfigError:
            ts_md = Metadata(Timestamp())
        ts_md.signed.snapshot_meta = MetaFile(version=snap.version)
        ts_md.signed.expires = now + self.config.expiry("timestamp")
        self._sign(ts_md, self.signers("timestamp"))
        self._write_published("timestamp", ts_md)

    def _next(self, role: str) -> Metadata[Any]:
        """The metadata a change to `role` builds on: what is staged (already a new version), or
        the published version plus one."""
        if (self.staged_dir / f"{role}.json").exists():
            return self._load(role, staged=True)
        md = self._load(role) if (self.metadata_dir / f"{role}.json").exists() else None
        if md is None:
            return Metadata(Targets(expires=_utcnow() + self.config.expiry(role)))
        md.signed.version += 1
        return md

    # ---- publishing -------------------------------------------------------------------------

    def role_for(self, path: str) -> str:
        """The delegated role a device will consult for `path` (the first whose patterns match)."""
        dele = self._effective_targets().signed.delegations
        for d in (dele.roles or {}).values() if dele is not None else ():
            if d.is_delegated_path(path):
                return d.name
        raise RepositoryConfigError(
            f"no delegated role covers target path {path!r}; the holder of the offline targets key adds "
            "one: tidegate repo delegate DIR NAME --paths 'NAME/*/*' --offline-keys …"
        )

    def add_bundle(
        self,
        bundle: Path,
        *,
        target_path: str | None = None,
        allow_rollback: bool = False,
        limits: ReaderLimits = DEFAULT_LIMITS,
        now: datetime | None = None,
    ) -> PublishedTarget:
        """Verify a bundle, copy it in under its hash, and sign it into the delegated role that
        covers its path (staged if that role's threshold needs a key not at hand).

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
        with self._writing():
            role = self.role_for(path)
            md: Metadata[Targets] = self._next(role)
            every = [t for _, s in self._published_roles() for t in s.targets.items()]
            every += list(md.signed.targets.items())
            known = dict(every)
            if not allow_rollback and path not in known:
                _refuse_older(every, manifest.name, manifest.version, set(manifest.skus))
            existing = known.get(path)
            if existing is not None:
                if existing.hashes == tf.hashes and existing.custom == tf.custom:
                    waits = tuple(p for p in self.staged() if p.role == role and path in md.signed.targets)
                    digest = tf.hashes["sha256"]
                    return PublishedTarget(path, tf.length, digest, custom[CUSTOM_KEY], role, waits)
                raise TrustError(f"target {path!r} is already published with different content")
            digest = tf.hashes["sha256"]
            dirname, _, basename = path.rpartition("/")
            dest = self.targets_dir / dirname / f"{digest}.{basename}"
            _mkdirs(dest.parent, self.targets_dir)
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.copyfile(bundle, tmp)
            with tmp.open("rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
            md.signed.targets[path] = tf
            md.signed.expires = now + self.config.expiry(role)
            self._stage_signed(role, md)
            waiting = tuple(p for p in self._settle(now) if p.role == role)
        return PublishedTarget(path, tf.length, digest, custom[CUSTOM_KEY], role, waiting)

    def refresh(self, *, now: datetime | None = None) -> tuple[int, int]:
        """Re-sign snapshot and timestamp with fresh expiry; returns their new versions."""
        now = now or _utcnow()
        with self._writing():
            self._publish_snapshot_and_timestamp(now)
            return self._load("snapshot").signed.version, self._load("timestamp").signed.version

    def refresh_due(self, now: datetime) -> bool:
        """Whether snapshot or timestamp is in the last half of its validity (when the server
        re-signs them on its own schedule, so devices never meet an expired timestamp)."""
        for role in ("timestamp", "snapshot"):
            expires = self._load(role).signed.expires
            if expires - now <= self.config.expiry(role) / 2:
                return True
        return False

    # ---- delegations ------------------------------------------------------------------------

    def delegate(
        self,
        name: str,
        paths: Sequence[str],
        *,
        threshold: int = 1,
        new_keys: int = 0,
        key_uris: Sequence[str] = (),
        public_keys: Sequence[Key] = (),
        now: datetime | None = None,
    ) -> list[Pending]:
        """Delegate `paths` to a new online role (or replace an existing role's paths and keys).

        Keys: `new_keys` generated online, `key_uris` usable here (recorded as online signers),
        `public_keys` held elsewhere (an approver's). Changes top-level targets, so the offline
        targets key must be at hand or the change is staged for `export`/`sign`/`import`.
        """
        _check_role_name(name)
        now = now or _utcnow()
        with self._writing():
            check_patterns(paths, (t.path for t in self.published()))
            count = new_keys + len(key_uris) + len(public_keys)
            if not count:
                raise RepositoryConfigError(f"role {name!r}: no keys (give --new-key, --key or --public-key)")
            if not 1 <= threshold <= count:
                raise RepositoryConfigError(
                    f"role {name!r}: threshold {threshold} must be between 1 and its {count} key(s)"
                )
            pairs = [(u, public_key_for_uri(u)) for u in key_uris]
            pairs += [_generated(self.keys_dir / name) for _ in range(new_keys)]
            keys = [k for _, k in pairs] + list(public_keys)
            for uri, key in pairs:
                self.config.signers[key.keyid] = _relative_uri(uri, self.dir)
            atomic_write_bytes(self.dir / "repo.json", self.config.to_json())
            targets_md: Metadata[Targets] = self._next("targets")
            _add_delegation(targets_md.signed, Delegation(name, tuple(paths), threshold), keys)
            targets_md.signed.expires = now + self.config.expiry("targets")
            self._stage_signed("targets", targets_md)
            role_md: Metadata[Targets] = self._next(name)
            role_md.signed.expires = now + self.config.expiry(name)
            self._stage_signed(name, role_md)
            return self._settle(now)

    def rotate(self, role: str, *, key_uri: str | None = None, now: datetime | None = None) -> list[str]:
        """Replace every key of `role` with a fresh one (or the key `key_uri` names); returns
        the new key ids.

        A top-level role's keys are listed in root, so the offline root keys must be at hand;
        the new root is signed by the old root keys *and* the new ones (for root), so a client
        that trusts only the old root still walks the chain. A delegated role's keys are listed
        in targets: its rotation needs the offline targets key, or is staged until signed, and
        never touches root.
        """
        now = now or _utcnow()
        with self._writing():
            if role in ROLES:
                return self._rotate_top(role, key_uri, now)
            return self._rotate_delegated(role, key_uri, now)

    def _rotate_top(self, role: str, key_uri: str | None, now: datetime) -> list[str]:
        old_root_signers = self.signers("root")
        root_md: Metadata[Root] = self._load("root")
        root = root_md.signed
        old_keyids = list(root.roles[role].keyids)
        old_uris = self._keyring().uris
        if role in OFFLINE_ROLES:
            offline_base = self._offline_dir_for(role)
            pairs = [_generated(offline_base) for _ in old_keyids] if key_uri is None else []
        else:
            pairs = [_generated(self.keys_dir / role) for _ in old_keyids] if key_uri is None else []
        if key_uri is not None:
            pairs = [(key_uri, public_key_for_uri(key_uri))]
        for keyid in old_keyids:
            root.revoke_key(keyid, role)
        for uri, key in pairs:
            root.add_key(key, role)
            if role in OFFLINE_ROLES:
                self.offline.uris[key.keyid] = uri
            else:
                self.config.signers[key.keyid] = _relative_uri(uri, self.dir)
        for keyid in old_keyids:
            self.config.signers.pop(keyid, None)
        atomic_write_bytes(self.dir / "repo.json", self.config.to_json())
        root.version += 1
        root.expires = now + self.config.expiry("root")
        new_signers = [load_signer(u, k) for u, k in pairs] if role == "root" else []
        self._sign(root_md, [*old_root_signers, *new_signers])
        self._write_published("root", root_md)
        for keyid in old_keyids:
            _forget_file_key(old_uris.get(keyid), keyid)
            self.offline.uris.pop(keyid, None)
        if role == "targets":
            md: Metadata[Targets] = self._next("targets")
            self._stage_signed("targets", md)
            self._settle(now)
        else:
            self._publish_snapshot_and_timestamp(now)
        return [k.keyid for _, k in pairs]

    def _offline_dir_for(self, role: str) -> Path:
        for uri in self.offline.uris.values():
            if uri.startswith("file2:"):
                return Path(uri[len("file2:") :]).parent.parent / role
        raise SignerError(f"rotating {role} needs the offline keys (--offline-keys DIR)")

    def _rotate_delegated(self, role: str, key_uri: str | None, now: datetime) -> list[str]:
        targets_md: Metadata[Targets] = self._next("targets")
        dele = targets_md.signed.delegations
        if dele is None or dele.roles is None or role not in dele.roles:
            raise RepositoryConfigError(f"no delegated role {role!r} (see `tidegate repo delegations`)")
        delegated = dele.roles[role]
        old = list(delegated.keyids)
        old_uris = self._keyring().uris
        pairs = [(key_uri, public_key_for_uri(key_uri))] if key_uri else [_generated(self.keys_dir / role)]
        for keyid in old:
            targets_md.signed.revoke_key(keyid, role)
            self.config.signers.pop(keyid, None)
        for uri, key in pairs:
            targets_md.signed.add_key(key, role)
            self.config.signers[key.keyid] = _relative_uri(uri, self.dir)
        delegated.threshold = min(delegated.threshold, len(delegated.keyids))
        atomic_write_bytes(self.dir / "repo.json", self.config.to_json())
        self._stage_signed("targets", targets_md)
        role_md: Metadata[Targets] = self._next(role)
        self._stage_signed(role, role_md)
        self._settle(now)
        for keyid in old:
            _forget_file_key(old_uris.get(keyid), keyid)
        return [k.keyid for _, k in pairs]

    # ---- offline signing --------------------------------------------------------------------

    def export(self, role: str) -> bytes:
        """The staged metadata of `role` with its signatures so far, for `sign_envelope`."""
        path = self.staged_dir / f"{role}.json"
        if not path.exists():
            staged = ", ".join(p.role for p in self.staged()) or "nothing"
            raise StagedChangeError(f"nothing staged for role {role!r} (staged: {staged})")
        return path.read_bytes()

    def import_signatures(self, data: bytes, *, now: datetime | None = None) -> list[Pending]:
        """Add the signatures in an exported file to what is staged, then publish whatever is
        now fully signed. The file's signed part must be byte-for-byte what is staged."""
        now = now or _utcnow()
        role, body = _unwrap(data, Path("<import>"))
        try:
            incoming = Metadata.from_dict(dict(body))
        except Exception as exc:  # python-tuf raises several deserialisation types
            raise StagedChangeError(f"the file is not TUF metadata ({exc})") from exc
        with self._writing():
            if not (self.staged_dir / f"{role}.json").exists():
                raise StagedChangeError(f"nothing staged for role {role!r}: already published or discarded")
            staged = self._load(role, staged=True)
            canon = CanonicalJSONSerializer()
            if canon.serialize(staged.signed) != canon.serialize(incoming.signed):
                raise StagedChangeError(
                    f"{role}: the signed content differs from what is staged "
                    f"(staged v{staged.signed.version}, file v{incoming.signed.version}); "
                    "export again and sign that"
                )
            keyids, keys, _ = self._role_keys(role)
            payload = canon.serialize(staged.signed)
            added = 0
            for keyid, sig in incoming.signatures.items():
                if keyid not in keyids:
                    raise StagedChangeError(f"{role}: key {keyid[:16]}… is not one of the role's keys")
                try:
                    keys[keyid].verify_signature(sig, payload)
                except Exception as exc:
                    raise StagedChangeError(
                        f"{role}: the signature by key {keyid[:16]}… does not verify"
                    ) from exc
                if keyid not in staged.signatures:
                    added += 1
                staged.signatures[keyid] = sig
            if not added:
                raise StagedChangeError(f"{role}: the file adds no new signature")
            self._write_staged(role, staged)
            return self._settle(now)

    def discard(self, role: str) -> None:
        with self._writing():
            path = self.staged_dir / f"{role}.json"
            if not path.exists():
                raise StagedChangeError(f"nothing staged for role {role!r}")
            path.unlink()
            fsync_dir(self.staged_dir)


def sign_envelope(data: bytes, key_uri: str) -> tuple[bytes, str]:
    """Sign an exported staged file with the key `key_uri` names, on whatever machine holds
    it; returns the file with the signature added and a one-line summary of what was signed."""
    role, body = _unwrap(data, Path("<file>"))
    try:
        md: Metadata[Any] = Metadata.from_dict(dict(body))
    except Exception as exc:  # python-tuf raises several deserialisation types
        raise StagedChangeError(f"the file is not TUF metadata ({exc})") from exc
    key = public_key_for_uri(key_uri)
    md.sign(load_signer(key_uri, key), append=True)
    signed = md.signed
    summary = f"{role} v{signed.version}, expires {signed.expires:%Y-%m-%d}"
    if isinstance(signed, Targets):
        summary += f", {len(signed.targets)} target(s)"
        if signed.delegations is not None and signed.delegations.roles:
            roles = "; ".join(
                f"{r.name}: {' '.join(r.paths or [])} ({r.threshold} of {len(r.keyids)})"
                for r in signed.delegations.roles.values()
            )
            summary += f", delegations {roles}"
    return json.dumps({"role": role, "metadata": md.to_dict()}, indent=1).encode(), summary


def _unwrap(data: bytes, path: Path) -> tuple[str, dict[str, Any]]:
    try:
        raw = json.loads(data)
        role, body = raw["role"], raw["metadata"]
        if not isinstance(role, str) or not isinstance(body, dict):
            raise TypeError("role must be a string and metadata an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise StagedChangeError(f"{path}: not an exported staged change ({exc})") from exc
    return role, body


def _check_role_name(name: str) -> None:
    if name in ROLES or not ROLE_NAME.match(name):
        raise RepositoryConfigError(
            f"role name {name!r}: lower-case letters, digits and '-', not one of {', '.join(ROLES)}"
        )


def _add_delegation(targets: Targets, d: Delegation, keys: Sequence[Key]) -> None:
    if targets.delegations is None:
        targets.delegations = Delegations(keys={}, roles={})
    dele = targets.delegations
    assert dele.roles is not None
    old = dele.roles.get(d.name)
    if old is not None:
        for keyid in list(old.keyids):
            targets.revoke_key(keyid, d.name)
    role = DelegatedRole(d.name, [], d.threshold, True, paths=list(d.paths))
    if old is not None:
        dele.roles[d.name] = role  # keeps its place in the order devices search
    else:
        # A new delegation goes first: devices search delegations in order and every role is
        # terminating, so a narrower role added later (safety/*/*, 2 of 2) must not be
        # shadowed by an older catch-all (release, */*/*).
        dele.roles = {d.name: role, **dele.roles}
    for key in keys:
        targets.add_key(key, d.name)


def _generated(directory: Path) -> tuple[str, Key]:
    uri, signer = generate_file_key(directory)
    return uri, signer.public_key


def _relative_uri(uri: str, root_dir: Path) -> str:
    """Online file keys under the repository are recorded relative to it (the directory moves)."""
    if uri.startswith("file2:"):
        path = Path(uri[len("file2:") :])
        with contextlib.suppress(ValueError):
            return "file2:" + str(path.relative_to(root_dir.resolve()))
    return uri


def _absolute_uri(uri: str, root_dir: Path) -> str:
    if uri.startswith("file2:") and not uri[len("file2:") :].startswith("/"):
        return file_uri(root_dir / uri[len("file2:") :])
    return uri


def _forget_file_key(uri: str | None, keyid: str) -> None:
    """Delete a rotated-out key file that Tidegate generated (never a token's key)."""
    if uri and uri.startswith("file2:"):
        path = Path(uri[len("file2:") :])
        if path.stem == keyid:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                fsync_dir(path.parent)


def _mkdirs(path: Path, top: Path) -> None:
    """mkdir -p with every new directory's entry made durable in its parent."""
    missing = []
    p = path
    while not p.exists() and p != top:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
        fsync_dir(d.parent)


def _refuse_older(targets: Iterable[tuple[str, TargetFile]], name: str, version: str, skus: set[str]) -> None:
    """A version below the newest already published for the same name and a shared SKU is a
    mistake unless it is meant (`allow_rollback`): devices would see it as a downgrade."""
    from shared.semver import SemVer

    ours = SemVer.parse(version)
    for path, tf in targets:
        other = (tf.unrecognized_fields.get("custom") or {}).get(CUSTOM_KEY) or {}
        if other.get("name") != name or not skus & set(other.get("skus", [])):
            continue
        theirs = str(other.get("version", "0.0.0"))
        if SemVer.parse(theirs) > ours:
            raise TrustError(
                f"{name} {version} is older than {theirs}, already published as {path}; "
                "publish a downgrade on purpose with --allow-rollback"
            )
