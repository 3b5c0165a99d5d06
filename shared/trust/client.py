"""The client helper: verify and fetch targets through python-tuf's ngclient.

The caller keeps the trusted root (a device ships it at provisioning); the
cache directory holds what ngclient has verified since. Every python-tuf
exception is mapped to one of ours at this boundary.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig

from shared.fsutil import fsync_dir
from shared.trust.errors import (
    ExpiredMetadataError,
    FetchError,
    HashMismatchError,
    RollbackAttackError,
    SignatureError,
    TargetNotFoundError,
    TooLargeError,
    TrustError,
)
from shared.trust.fetcher import ProgressCallback, TidegateFetcher, source_to_url
from shared.trust.repository import CUSTOM_KEY

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrustLimits:
    """Upper bounds on metadata sizes and root rotations (python-tuf's `UpdaterConfig`)."""

    max_root_rotations: int = 64
    root_max_length: int = 512_000
    timestamp_max_length: int = 16_384
    snapshot_max_length: int = 2_000_000
    targets_max_length: int = 5_000_000

    def updater_config(self) -> UpdaterConfig:
        return UpdaterConfig(
            max_root_rotations=self.max_root_rotations,
            root_max_length=self.root_max_length,
            timestamp_max_length=self.timestamp_max_length,
            snapshot_max_length=self.snapshot_max_length,
            targets_max_length=self.targets_max_length,
        )


@dataclass(frozen=True)
class TargetInfo:
    """A target as signed metadata describes it."""

    path: str
    length: int
    sha256: str
    custom: dict[str, Any]
    tuf: TargetFile

    @property
    def tidegate(self) -> dict[str, Any]:
        value = self.custom.get(CUSTOM_KEY, {})
        return dict(value) if isinstance(value, dict) else {}


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Map python-tuf's exceptions to Tidegate's named ones, keeping the detail."""
    try:
        yield
    except TrustError:
        raise
    except tuf_exc.UnsignedMetadataError as exc:
        raise SignatureError(f"{what}: signature check failed: {exc}") from exc
    except tuf_exc.BadVersionNumberError as exc:
        raise RollbackAttackError(f"{what}: version rollback refused: {exc}") from exc
    except tuf_exc.ExpiredMetadataError as exc:
        raise ExpiredMetadataError(f"{what}: {exc}") from exc
    except tuf_exc.LengthOrHashMismatchError as exc:
        raise HashMismatchError(f"{what}: {exc}") from exc
    except tuf_exc.DownloadLengthMismatchError as exc:
        raise TooLargeError(f"{what}: {exc}") from exc
    except tuf_exc.DownloadHTTPError as exc:
        raise FetchError(f"{what}: HTTP {exc.status_code}: {exc}") from exc
    except tuf_exc.DownloadError as exc:
        # ngclient wraps a fetcher's non-download errors as "Failed to download URL" from the
        # real one: name that; a DownloadError of our own fetcher already says what happened.
        wrapped = exc.__cause__ is not None and str(exc).startswith("Failed to download")
        cause = exc.__cause__ if wrapped else exc
        raise FetchError(f"{what}: download failed: {cause}") from exc
    except tuf_exc.RepositoryError as exc:
        raise TrustError(f"{what}: metadata refused: {exc}") from exc
    except OSError as exc:
        raise FetchError(f"{what}: {exc}") from exc


class TrustClient:
    """Verify-then-fetch against one repository, from a trusted root the caller holds."""

    def __init__(
        self,
        *,
        repository: str | Path,
        trusted_root: bytes,
        cache_dir: Path,
        fetcher: TidegateFetcher | None = None,
        limits: TrustLimits = TrustLimits(),
    ) -> None:
        base = source_to_url(repository)
        self.repository = str(repository)
        self._target_base = base + "targets/"
        self._fetcher = fetcher or TidegateFetcher()
        cache_dir.mkdir(parents=True, exist_ok=True)
        with translate_errors("trusted root"):
            self._updater = Updater(
                metadata_dir=str(cache_dir),
                metadata_base_url=base + "metadata/",
                target_base_url=base + "targets/",
                fetcher=self._fetcher,
                config=limits.updater_config(),
                bootstrap=trusted_root,
            )
        self._refreshed = False

    def refresh(self) -> None:
        """Walk the root chain and load timestamp, snapshot and targets, verifying each."""
        with translate_errors(f"refresh from {self.repository}"):
            self._updater.refresh()
        self._refreshed = True

    def _ensure_fresh(self) -> None:
        if not self._refreshed:
            self.refresh()

    def targets(self) -> list[TargetInfo]:
        """Every target the verified metadata vouches for, top-level and delegated.

        Each delegated role's candidates are resolved again through ngclient's own walk
        (`get_targetinfo`), so a path a role lists outside its delegated patterns, or one a
        more trusted role shadows, is never returned. A delegated role that fails verification
        lists nothing (asking for one of its paths with `get_target` raises the reason).
        """
        self._ensure_fresh()
        # ngclient has no public listing; its trusted set is the verified state (tuf pinned).
        trusted = self._updater._trusted_set
        top = trusted.targets
        paths = set(top.targets)
        roles = (top.delegations.roles or {}) if top.delegations is not None else {}
        pending = [(r.name, "targets") for r in roles.values()]
        seen: set[str] = set()
        while pending:
            role, parent = pending.pop()
            if role in seen:
                continue
            seen.add(role)
            try:
                with translate_errors(f"delegated role {role!r}"):
                    signed = self._updater._load_targets(role, parent)
            except TrustError as exc:
                _log.warning("%s", exc)
                continue
            paths.update(signed.targets)
            if signed.delegations is not None and signed.delegations.roles:
                pending.extend((r.name, role) for r in signed.delegations.roles.values())
        out = []
        for path in sorted(paths):
            try:
                with translate_errors(f"target {path!r}"):
                    tf = self._updater.get_targetinfo(path)
            except TrustError:
                continue
            if tf is not None:
                out.append(_info(tf))
        return out

    def get_target(self, path: str) -> TargetInfo:
        self._ensure_fresh()
        with translate_errors(f"target {path!r}"):
            tf = self._updater.get_targetinfo(path)
        if tf is None:
            raise TargetNotFoundError(f"target {path!r} is not in the signed targets metadata")
        return _info(tf)

    def target_url(self, target: TargetInfo) -> str:
        """Where the target's bytes live: with consistent snapshots, under their hash."""
        dirname, sep, basename = target.path.rpartition("/")
        if self._updater._trusted_set.root.consistent_snapshot:
            basename = f"{target.sha256}.{basename}"
        return f"{self._target_base}{dirname}{sep}{basename}"

    def download(
        self, target: TargetInfo, dest: Path, *, on_progress: ProgressCallback | None = None
    ) -> Path:
        """Fetch a target to `dest`; `dest` exists only once length and SHA-256 match
        the signed metadata.

        Bytes accumulate in ``dest + ".part"``, which survives a crash or a
        dropped link and is resumed on the next call. A resumed file whose
        hash does not match is discarded and fetched once more from scratch
        (its prefix may have been damaged by a power cut).
        """
        self._ensure_fresh()
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        url = self.target_url(target)
        what = f"target {target.path!r}"
        for attempt in (1, 2):
            resumed = part.exists() and part.stat().st_size > 0
            with translate_errors(what):
                digest = self._fetcher.fetch_to_file(url, part, target.length, on_progress)
            if digest == target.sha256:
                os.replace(part, dest)
                fsync_dir(dest.parent)
                return dest
            part.unlink(missing_ok=True)
            if not resumed or attempt == 2:
                break
        raise HashMismatchError(f"{what}: sha256 {digest} does not match the signed {target.sha256}")


def _info(tf: TargetFile) -> TargetInfo:
    return TargetInfo(tf.path, tf.length, tf.hashes.get("sha256", ""), dict(tf.custom), tf)
