"""The Tidegate bundle: one tar file (optionally zstd-compressed) holding
``bundle.json`` first and then every payload file it lists.

Public API: `BundleManifest` (the schema), `write_bundle` (deterministic
writer), `read_bundle` (streaming, verifying reader), `ReaderLimits`, and the
`BundleError` family.
"""

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
    UnsafePathError,
)
from shared.bundle.manifest import (
    MANIFEST_NAME,
    BuildProvenance,
    BundleManifest,
    PayloadFile,
    Runtime,
    SelfTestSpec,
    Tolerance,
)
from shared.bundle.pack import collect_payload, manifest_for, pack_directory
from shared.bundle.reader import ReaderLimits, read_bundle, read_manifest, verify_bundle, verify_tree
from shared.bundle.writer import describe_files, sha256_file, write_bundle

__all__ = [
    "MANIFEST_NAME",
    "BuildProvenance",
    "BundleError",
    "BundleManifest",
    "CompressionError",
    "DigestMismatchError",
    "DuplicateMemberError",
    "LinkMemberError",
    "ManifestError",
    "ManifestNotFirstError",
    "MemberSizeError",
    "MissingMemberError",
    "PayloadFile",
    "ReaderLimits",
    "Runtime",
    "SelfTestSpec",
    "SpecialFileError",
    "Tolerance",
    "TotalSizeError",
    "UnlistedMemberError",
    "UnsafePathError",
    "collect_payload",
    "describe_files",
    "manifest_for",
    "pack_directory",
    "read_bundle",
    "read_manifest",
    "sha256_file",
    "verify_bundle",
    "verify_tree",
    "write_bundle",
]
