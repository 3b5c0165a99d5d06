"""The streaming, verifying bundle reader.

It reads the archive once, front to back, in bounded memory: ``bundle.json``
must come first, and every later member is checked against it *before* its
bytes are trusted (name, type, size) and *while* they stream (SHA-256). A
bundle that fails any check raises a named `BundleError` saying which member
and why.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import zstandard

from shared.bundle.errors import (
    BundleError,
    CompressionError,
    DigestMismatchError,
    DuplicateMemberError,
    LinkMemberError,
    ManifestError,
    ManifestNotFirstError,
    MemberSizeError,
    MissingMemberError,
    SpecialFileError,
    TotalSizeError,
    UnlistedMemberError,
)
from shared.bundle.manifest import MANIFEST_NAME, BundleManifest, check_member_name
from shared.fsutil import fsync_dir

CHUNK = 1 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

ProgressCallback = Callable[[int, int], None]
"""Called with (payload bytes read so far, total payload bytes declared)."""


@dataclass(frozen=True)
class ReaderLimits:
    """Bounds that hold whatever the archive claims about itself."""

    max_total_size: int = 8 << 30
    max_manifest_size: int = 1 << 20
    max_members: int = 10_000
    # zstd frames may ask for a window of up to 2 GiB; this bounds decoder memory.
    max_window_size: int = 1 << 25


DEFAULT_LIMITS = ReaderLimits()


def _open_stream(fh: BinaryIO, limits: ReaderLimits) -> IO[bytes]:
    head = fh.read(4)
    fh.seek(-len(head), os.SEEK_CUR)
    if head == ZSTD_MAGIC:
        dctx = zstandard.ZstdDecompressor(max_window_size=limits.max_window_size)
        reader: IO[bytes] = dctx.stream_reader(fh, read_size=CHUNK, closefd=False)
        return reader
    return fh


def _check_type(member: tarfile.TarInfo) -> None:
    if member.issym() or member.islnk():
        raise LinkMemberError(f"member {member.name!r}: links are not allowed (-> {member.linkname!r})")
    if member.isdir():
        raise SpecialFileError(f"member {member.name!r}: directories are not allowed; bundles list files")
    if not member.isreg():
        kind = {
            tarfile.CHRTYPE: "character device",
            tarfile.BLKTYPE: "block device",
            tarfile.FIFOTYPE: "FIFO",
        }.get(member.type, f"type {member.type!r}")
        raise SpecialFileError(f"member {member.name!r}: {kind} is not a regular file")


def _open_dest(dest: Path, name: str) -> int:
    target = dest / name
    target.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL|O_NOFOLLOW: never write through something already in the staging dir.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    return os.open(target, flags, 0o644)


def _read_manifest(
    tf: tarfile.TarFile, first: tarfile.TarInfo | None, limits: ReaderLimits
) -> BundleManifest:
    if first is None:
        raise ManifestError("empty archive: no bundle.json")
    check_member_name(first.name)
    if first.name != MANIFEST_NAME:
        raise ManifestNotFirstError(f"first member is {first.name!r}; {MANIFEST_NAME} must come first")
    _check_type(first)
    if first.size > limits.max_manifest_size:
        raise ManifestError(
            f"{MANIFEST_NAME} is {first.size} bytes, above the {limits.max_manifest_size}-byte limit"
        )
    fobj = tf.extractfile(first)
    assert fobj is not None  # a regular file always has a body
    manifest = BundleManifest.from_json_bytes(fobj.read(limits.max_manifest_size + 1))
    if manifest.total_size > limits.max_total_size:
        raise TotalSizeError(
            f"bundle declares {manifest.total_size} payload bytes, above the cap of {limits.max_total_size}"
        )
    if len(manifest.files) > limits.max_members:
        raise TotalSizeError(f"bundle lists {len(manifest.files)} files, above {limits.max_members}")
    return manifest


def _copy_member(
    body: IO[bytes],
    name: str,
    declared_size: int,
    dest_fd: int | None,
    on_bytes: Callable[[int], None],
) -> tuple[str, int]:
    h = hashlib.sha256()
    got = 0
    while True:
        chunk = body.read(min(CHUNK, declared_size - got + 1))
        if not chunk:
            break
        got += len(chunk)
        if got > declared_size:
            raise MemberSizeError(f"member {name!r}: more than the declared {declared_size} bytes")
        h.update(chunk)
        if dest_fd is not None:
            view = memoryview(chunk)
            while view:
                view = view[os.write(dest_fd, view) :]
        on_bytes(len(chunk))
    return h.hexdigest(), got


def read_bundle(
    source: Path | BinaryIO,
    dest: Path | None = None,
    *,
    limits: ReaderLimits = DEFAULT_LIMITS,
    on_progress: ProgressCallback | None = None,
    fsync: bool = False,
) -> BundleManifest:
    """Verify a bundle and, when `dest` is given, extract its payload there.

    `dest` must be an empty staging directory owned by the caller; when this
    raises, whatever it holds is to be discarded (the agent does).
    Returns the verified manifest.
    """
    if isinstance(source, Path):
        try:
            with source.open("rb") as fh:
                return read_bundle(fh, dest, limits=limits, on_progress=on_progress, fsync=fsync)
        except FileNotFoundError as exc:
            raise BundleError(f"{source}: no such bundle file") from exc
        except IsADirectoryError as exc:
            raise BundleError(f"{source}: is a directory, not a bundle file") from exc
    try:
        return _read(source, dest, limits, on_progress, fsync)
    except BundleError:
        raise
    except zstandard.ZstdError as exc:
        raise CompressionError(f"zstd stream refused: {exc}") from exc
    except (tarfile.TarError, EOFError) as exc:
        raise CompressionError(f"not a readable bundle archive (truncated or corrupt): {exc}") from exc


def _read(
    source: BinaryIO,
    dest: Path | None,
    limits: ReaderLimits,
    on_progress: ProgressCallback | None,
    fsync: bool,
) -> BundleManifest:
    stream = _open_stream(source, limits)
    with tarfile.open(fileobj=stream, mode="r|") as tf:
        manifest = _read_manifest(tf, tf.next(), limits)
        declared = {f.path: f for f in manifest.files}
        seen: set[str] = {MANIFEST_NAME}
        total = manifest.total_size
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if done > limits.max_total_size:
                raise TotalSizeError(f"payload exceeds the cap of {limits.max_total_size} bytes")
            if on_progress is not None:
                on_progress(done, total)

        while (member := tf.next()) is not None:
            name = check_member_name(member.name)
            _check_type(member)
            if name in seen:
                raise DuplicateMemberError(f"member {name!r} appears more than once")
            seen.add(name)
            entry = declared.get(name)
            if entry is None:
                raise UnlistedMemberError(f"member {name!r} is not listed in {MANIFEST_NAME}")
            if member.size > entry.size:
                raise MemberSizeError(
                    f"member {name!r}: {member.size} bytes, above the declared {entry.size}"
                )
            body = tf.extractfile(member)
            assert body is not None
            fd = _open_dest(dest, name) if dest is not None else None
            try:
                digest, got = _copy_member(body, name, entry.size, fd, advance)
                if fd is not None and fsync:
                    os.fsync(fd)
            finally:
                if fd is not None:
                    os.close(fd)
            if got != entry.size:
                raise MemberSizeError(f"member {name!r}: {got} bytes, declared {entry.size}")
            if digest != entry.sha256:
                raise DigestMismatchError(
                    f"member {name!r}: sha256 {digest} does not match the declared {entry.sha256}"
                )
        missing = sorted(set(declared) - seen)
        if missing:
            raise MissingMemberError(f"listed in {MANIFEST_NAME} but not in the archive: {missing}")
    if dest is not None and fsync:
        for d in sorted({(dest / p).parent for p in declared} | {dest}, key=lambda p: -len(p.parts)):
            fsync_dir(d)
    return manifest


def read_manifest(source: Path, *, limits: ReaderLimits = DEFAULT_LIMITS) -> BundleManifest:
    """Read and validate only ``bundle.json`` (the first member), without the payload.

    For a bundle whose whole-file hash was already verified against signed
    metadata; its members are still checked one by one when it is extracted.
    """
    try:
        with source.open("rb") as fh, tarfile.open(fileobj=_open_stream(fh, limits), mode="r|") as tf:
            return _read_manifest(tf, tf.next(), limits)
    except FileNotFoundError as exc:
        raise BundleError(f"{source}: no such bundle file") from exc
    except zstandard.ZstdError as exc:
        raise CompressionError(f"zstd stream refused: {exc}") from exc
    except (tarfile.TarError, EOFError) as exc:
        raise CompressionError(f"not a readable bundle archive: {exc}") from exc


def verify_bundle(source: Path | BinaryIO, *, limits: ReaderLimits = DEFAULT_LIMITS) -> BundleManifest:
    """Check a bundle completely without extracting it."""
    return read_bundle(source, None, limits=limits)


def verify_tree(root: Path, manifest: BundleManifest, *, check_hashes: bool = True) -> None:
    """Check an extracted payload against its manifest: every listed file present,
    regular (not a link), of the declared size and (with `check_hashes`) digest,
    and nothing else there.

    The agent runs this on a slot before flipping to it, so a slot that was
    damaged after extraction is never activated. Right after `read_bundle`
    extracted and hashed every byte, the structural check suffices; a slot
    written by an earlier boot gets the full check.
    """
    declared = {f.path: f for f in manifest.files}
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                rel = os.path.relpath(os.path.join(dirpath, d), root)
                raise LinkMemberError(f"slot entry {rel!r} is a link")
        for fname in filenames:
            full = os.path.join(dirpath, fname)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel == MANIFEST_NAME:
                continue
            if rel not in declared:
                raise UnlistedMemberError(f"slot holds {rel!r}, which {MANIFEST_NAME} does not list")
            if not stat.S_ISREG(os.lstat(full).st_mode):
                raise LinkMemberError(f"slot entry {rel!r} is not a regular file")
            found.add(rel)
            entry = declared[rel]
            if not check_hashes:
                size = os.lstat(full).st_size
                if size != entry.size:
                    raise MemberSizeError(f"slot file {rel!r}: {size} bytes, declared {entry.size}")
                continue
            h = hashlib.sha256()
            size = 0
            with open(full, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
            if size != entry.size:
                raise MemberSizeError(f"slot file {rel!r}: {size} bytes, declared {entry.size}")
            if h.hexdigest() != entry.sha256:
                raise DigestMismatchError(f"slot file {rel!r}: sha256 does not match {MANIFEST_NAME}")
    missing = sorted(set(declared) - found)
    if missing:
        raise MissingMemberError(f"slot is missing listed files: {missing}")
