"""The bundle format: deterministic writing, and every refusal of the streaming reader."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import zstandard

from shared.bundle import (
    BundleManifest,
    CompressionError,
    DigestMismatchError,
    DuplicateMemberError,
    LinkMemberError,
    ManifestError,
    ManifestNotFirstError,
    MemberSizeError,
    MissingMemberError,
    ReaderLimits,
    SpecialFileError,
    TotalSizeError,
    UnlistedMemberError,
    UnsafePathError,
    read_bundle,
    verify_bundle,
    verify_tree,
)
from tests.helpers import BASIC_FILES, Member, build_bundle, manifest_bytes, raw_tar


def hostile(tmp_path: Path, members: list[Member]) -> Path:
    return raw_tar(tmp_path / "hostile.bundle", members)


def good_members(files: dict[str, bytes] = BASIC_FILES, **overrides: object) -> list[Member]:
    return [Member("bundle.json", manifest_bytes(files, **overrides))] + [
        Member(p, d) for p, d in sorted(files.items())
    ]


# ---- writing and round trip -----------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_round_trip_extracts_every_file(sample_payload: Path, tmp_path: Path, compression: str) -> None:
    bundle = build_bundle(sample_payload, tmp_path / "b.bundle", compression=compression)
    dest = tmp_path / "slot"
    dest.mkdir()
    progress: list[tuple[int, int]] = []
    manifest = read_bundle(bundle, dest, on_progress=lambda d, t: progress.append((d, t)), fsync=True)
    for f in manifest.files:
        assert (dest / f.path).read_bytes() == (sample_payload / f.path).read_bytes()
    assert progress[-1] == (manifest.total_size, manifest.total_size)
    verify_tree(dest, manifest)


def test_builds_are_byte_identical(sample_payload: Path, tmp_path: Path) -> None:
    a = build_bundle(sample_payload, tmp_path / "a.bundle", compression="zstd")
    b = build_bundle(sample_payload, tmp_path / "b.bundle", compression="zstd")
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(build_bundle(sample_payload, tmp_path / "plain.bundle")) as tf:
        names = tf.getnames()
        assert names[0] == "bundle.json"
        assert names[1:] == sorted(names[1:])
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tf.getmembers())


def test_verify_tree_catches_a_slot_damaged_after_extraction(sample_payload: Path, tmp_path: Path) -> None:
    bundle = build_bundle(sample_payload, tmp_path / "b.bundle")
    dest = tmp_path / "slot"
    dest.mkdir()
    manifest = read_bundle(bundle, dest)
    (dest / "model.onnx").write_bytes(b"corrupted")
    with pytest.raises(MemberSizeError, match="model.onnx"):
        verify_tree(dest, manifest)
    read_bundle(bundle, tmp_path / "slot2")
    (tmp_path / "slot2" / "extra.bin").write_bytes(b"x")
    with pytest.raises(UnlistedMemberError, match=r"extra\.bin"):
        verify_tree(tmp_path / "slot2", manifest)
    read_bundle(bundle, tmp_path / "slot3")
    (tmp_path / "slot3" / "inference_config.json").unlink()
    with pytest.raises(MissingMemberError, match="inference_config.json"):
        verify_tree(tmp_path / "slot3", manifest)


def test_manifest_refuses_references_to_unlisted_files() -> None:
    raw = manifest_bytes(BASIC_FILES, entry_model="other.onnx")
    with pytest.raises(ManifestError, match="entry_model"):
        BundleManifest.from_json_bytes(raw)


# ---- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "exc"),
    [
        ("/etc/passwd", UnsafePathError),
        ("../escape", UnsafePathError),
        ("selftest/../../escape", UnsafePathError),
        ("./model.onnx", UnsafePathError),
    ],
)
def test_refuses_unsafe_paths(tmp_path: Path, name: str, exc: type[Exception]) -> None:
    members = [*good_members(), Member(name, b"x")]
    with pytest.raises(exc, match="member"):
        verify_bundle(hostile(tmp_path, members))


def test_refuses_unsafe_path_in_manifest(tmp_path: Path) -> None:
    raw = manifest_bytes(BASIC_FILES)
    raw = raw.replace(b'"path": "model.onnx"', b'"path": "../model.onnx"')
    with pytest.raises(ManifestError, match=r"\.\."):
        verify_bundle(hostile(tmp_path, [Member("bundle.json", raw)]))


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_refuses_links(tmp_path: Path, kind: bytes) -> None:
    members = good_members()
    members.insert(1, Member("model.onnx", type=kind, linkname="/etc/shadow"))
    with pytest.raises(LinkMemberError, match=r"model\.onnx.*links are not allowed"):
        verify_bundle(hostile(tmp_path, members))


@pytest.mark.parametrize(
    ("kind", "word"),
    [
        (tarfile.CHRTYPE, "character device"),
        (tarfile.BLKTYPE, "block device"),
        (tarfile.FIFOTYPE, "FIFO"),
        (tarfile.DIRTYPE, "directories"),
    ],
)
def test_refuses_device_files_fifos_and_dirs(tmp_path: Path, kind: bytes, word: str) -> None:
    members = good_members()
    members.insert(1, Member("dev", type=kind))
    with pytest.raises(SpecialFileError, match=word):
        verify_bundle(hostile(tmp_path, members))


def test_refuses_duplicate_names(tmp_path: Path) -> None:
    members = [*good_members(), Member("model.onnx", BASIC_FILES["model.onnx"])]
    with pytest.raises(DuplicateMemberError, match=r"model\.onnx"):
        verify_bundle(hostile(tmp_path, members))


def test_refuses_a_second_bundle_json(tmp_path: Path) -> None:
    members = [*good_members(), Member("bundle.json", b"{}")]
    with pytest.raises(DuplicateMemberError, match="bundle.json"):
        verify_bundle(hostile(tmp_path, members))


def test_refuses_unlisted_members(tmp_path: Path) -> None:
    members = [*good_members(), Member("payload.sh", b"rm -rf /")]
    with pytest.raises(UnlistedMemberError, match=r"payload\.sh"):
        verify_bundle(hostile(tmp_path, members))


def test_refuses_member_larger_than_declared(tmp_path: Path) -> None:
    members = good_members()
    members[1] = Member("inference_config.json", b"{" * 1000)
    with pytest.raises(MemberSizeError, match=r"inference_config\.json.*above the declared 2"):
        verify_bundle(hostile(tmp_path, members))


def test_refuses_member_shorter_than_declared(tmp_path: Path) -> None:
    members = good_members()
    members[1] = Member("inference_config.json", b"{")
    with pytest.raises(MemberSizeError, match=r"inference_config\.json.*1 bytes, declared 2"):
        verify_bundle(hostile(tmp_path, members))


def test_refuses_changed_bytes(tmp_path: Path) -> None:
    members = good_members()
    members[2] = Member("model.onnx", b"X" * len(BASIC_FILES["model.onnx"]))
    with pytest.raises(DigestMismatchError, match=r"model\.onnx"):
        verify_bundle(hostile(tmp_path, members))


def test_refuses_missing_listed_file(tmp_path: Path) -> None:
    members = [m for m in good_members() if m.name != "selftest/outputs.npz"]
    with pytest.raises(MissingMemberError, match="selftest/outputs.npz"):
        verify_bundle(hostile(tmp_path, members))


def test_refuses_total_above_cap(tmp_path: Path) -> None:
    with pytest.raises(TotalSizeError, match="cap"):
        verify_bundle(hostile(tmp_path, good_members()), limits=ReaderLimits(max_total_size=50))


def test_refuses_manifest_not_first(tmp_path: Path) -> None:
    members = good_members()
    members = [members[1], members[0], *members[2:]]
    with pytest.raises(ManifestNotFirstError, match="must come first"):
        verify_bundle(hostile(tmp_path, members))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"not json", "not valid JSON"),
        (b'{"name": "x"}', "Field required"),
        (manifest_bytes(BASIC_FILES, version="1.0"), "not a semantic version"),
        (manifest_bytes(BASIC_FILES, runtime="tflite"), "runtime"),
        (manifest_bytes(BASIC_FILES, surprise=1), "surprise"),
        (manifest_bytes(BASIC_FILES, skus=[]), "skus"),
    ],
)
def test_refuses_manifest_failing_schema(tmp_path: Path, raw: bytes, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        verify_bundle(hostile(tmp_path, [Member("bundle.json", raw)]))


def test_refuses_oversized_manifest(tmp_path: Path) -> None:
    members = good_members()
    with pytest.raises(ManifestError, match="limit"):
        verify_bundle(hostile(tmp_path, members), limits=ReaderLimits(max_manifest_size=100))


def test_refuses_truncated_archive(sample_payload: Path, tmp_path: Path) -> None:
    bundle = build_bundle(sample_payload, tmp_path / "b.bundle")
    data = bundle.read_bytes()
    cut = tmp_path / "cut.bundle"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises((CompressionError, MemberSizeError, MissingMemberError)):
        verify_bundle(cut)


def test_refuses_zstd_window_above_bound(tmp_path: Path) -> None:
    """A frame that asks for a huge decoding window (a decompression-bomb trait) is refused."""
    raw = raw_tar(tmp_path / "plain.tar", good_members()).read_bytes()
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27)
    big = zstandard.ZstdCompressor(compression_params=params).compress(raw + b"\0" * (1 << 20))
    bundle = tmp_path / "bomb.bundle"
    bundle.write_bytes(big)
    with pytest.raises(CompressionError, match="zstd"):
        verify_bundle(bundle, limits=ReaderLimits(max_window_size=1 << 20))


def test_refuses_garbage_and_missing_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"\x00" * 10 + b"definitely not a tar")
    with pytest.raises((CompressionError, ManifestError)):
        verify_bundle(junk)
    from shared.bundle import BundleError

    with pytest.raises(BundleError, match="no such bundle file"):
        verify_bundle(tmp_path / "nope.bundle")


def test_extraction_never_writes_outside_dest(tmp_path: Path) -> None:
    members = [*good_members(), Member("../outside", b"x")]
    dest = tmp_path / "slot"
    dest.mkdir()
    with pytest.raises(UnsafePathError):
        read_bundle(hostile(tmp_path, members), dest)
    assert not (tmp_path / "outside").exists()


def test_read_manifest_reads_only_the_first_member(sample_payload: Path, tmp_path: Path) -> None:
    from shared.bundle import read_manifest

    bundle = build_bundle(sample_payload, tmp_path / "b.bundle", compression="zstd")
    assert read_manifest(bundle).name == "classifier"
    members = good_members()
    members[2] = Member("model.onnx", b"X" * len(BASIC_FILES["model.onnx"]))
    assert read_manifest(hostile(tmp_path, members)).version == "1.0.0"  # payload not read here
    with pytest.raises(DigestMismatchError):
        verify_bundle(hostile(tmp_path, members))
