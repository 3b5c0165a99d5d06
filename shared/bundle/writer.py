"""Deterministic bundle writer: the same inputs give byte-identical bundles.

Members are written in sorted order with fixed mtime, owner and mode, after
``bundle.json``, so that a rebuild can be checked by digest alone.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Literal

import zstandard

from shared.bundle.errors import BundleError
from shared.bundle.manifest import MANIFEST_NAME, BundleManifest, PayloadFile, check_member_name
from shared.fsutil import atomic_writer

CHUNK = 1 << 20
Compression = Literal["none", "zstd"]


def sha256_file(path: Path) -> tuple[str, int]:
    """Return (hex digest, size) of a file, streaming."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def describe_files(sources: Mapping[str, Path]) -> list[PayloadFile]:
    """The ``files`` list of a manifest for payload `sources` (archive name -> local path)."""
    out = []
    for name in sorted(sources):
        check_member_name(name)
        digest, size = sha256_file(sources[name])
        out.append(PayloadFile(path=name, size=size, sha256=digest))
    return out


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _write_tar(out: IO[bytes], manifest: BundleManifest, sources: Mapping[str, Path]) -> None:
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        data = manifest.to_json_bytes()
        tf.addfile(_tarinfo(MANIFEST_NAME, len(data)), io.BytesIO(data))
        for entry in sorted(manifest.files, key=lambda f: f.path):
            src = sources[entry.path]
            with src.open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size != entry.size:
                    raise BundleError(
                        f"{entry.path}: source {src} is {size} bytes, manifest says {entry.size}"
                    )
                tf.addfile(_tarinfo(entry.path, entry.size), fh)


def write_bundle(
    out_path: Path,
    manifest: BundleManifest,
    sources: Mapping[str, Path],
    *,
    compression: Compression = "none",
    zstd_level: int = 10,
) -> Path:
    """Write `manifest` and its payload `sources` to `out_path` atomically.

    Refuses a manifest whose file list does not match `sources` exactly,
    so a bundle can never list what it does not carry.
    """
    listed = {f.path for f in manifest.files}
    if listed != set(sources):
        missing = sorted(listed - set(sources))
        extra = sorted(set(sources) - listed)
        raise BundleError(f"sources do not match manifest files (missing {missing}, unlisted {extra})")
    with atomic_writer(out_path) as fh:
        if compression == "zstd":
            cctx = zstandard.ZstdCompressor(level=zstd_level, write_checksum=True)
            with cctx.stream_writer(fh, closefd=False) as zfh:
                _write_tar(zfh, manifest, sources)
        else:
            _write_tar(fh, manifest, sources)
    return out_path
