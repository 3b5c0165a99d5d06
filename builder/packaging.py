"""What ships around a bundle: an OCI image-layout archive, an AWS IoT Greengrass v2
component recipe, a device update manifest and a Triton model configuration.

All are written directly (no Docker engine, no AWS SDK) and reproducibly: the same bundle
and settings give the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from builder.catalogue import Sku
from builder.model import ModelInfo
from shared.fsutil import atomic_writer

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
BUNDLE_ANNOTATION = "dev.tidegate.bundle"
LAYER_DIR = "tidegate/bundles"


@dataclass(frozen=True)
class Artifact:
    """A file the build produced, as manifests name it."""

    path: Path
    sha256: str
    size: int

    @classmethod
    def of(cls, path: Path) -> Artifact:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        return cls(path, h.hexdigest(), path.stat().st_size)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


#: A tar member's content: bytes, a file streamed from disk, or None for a directory.
Content = bytes | Path | None


class _Hashing:
    """A write-only stream that hashes and counts what passes through it to `out` (all
    tarfile needs of a file opened for writing is write and tell)."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.out.write(data)

    def tell(self) -> int:
        return self.size


def _tar_to(out: Any, entries: Iterable[tuple[str, Content]]) -> None:
    """A reproducible tar: fixed owner, mode and mtime. A file's content is copied from disk
    in chunks by tarfile, never read whole: bundles are hundreds of megabytes."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            elif isinstance(data, Path):
                info.size, info.mode = data.stat().st_size, 0o644
                with data.open("rb") as fh:
                    tf.addfile(info, fh)
            else:
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))


def _descriptor(media_type: str, blob: bytes, **extra: Any) -> dict[str, Any]:
    return _descriptor_of(media_type, hashlib.sha256(blob).hexdigest(), len(blob), **extra)


def _descriptor_of(media_type: str, sha256: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": f"sha256:{sha256}", "size": size, **extra}


def write_oci_archive(
    out: Path, bundle: Path, *, name: str, version: str, sku: Sku, created: str, description: str
) -> Path:
    """An OCI image layout as a tar (`oci-archive:`), one image whose only layer holds the
    bundle at `tidegate/bundles/<file>`, tagged `<version>-<sku>`, for any OCI registry.

    Written by streaming: the layer goes to a temporary file beside `out` (hashed as it is
    written), then into the archive, which replaces `out` atomically; memory stays a few
    buffers whatever the bundle's size."""
    bundle_sha = Artifact.of(bundle).sha256
    with tempfile.TemporaryDirectory(prefix=".oci-", dir=out.parent) as scratch:
        layer_path = Path(scratch) / "layer.tar"
        with layer_path.open("wb") as raw:
            hashing = _Hashing(raw)
            _tar_to(hashing, [("tidegate", None), (LAYER_DIR, None), (f"{LAYER_DIR}/{bundle.name}", bundle)])
        layer = _descriptor_of(
            OCI_LAYER,
            hashing.sha.hexdigest(),
            hashing.size,
            annotations={"org.opencontainers.image.title": bundle.name},
        )
        annotations = {
            "org.opencontainers.image.created": created,
            "org.opencontainers.image.title": f"{name} {version} for {sku.name}",
            "org.opencontainers.image.description": description,
            "org.opencontainers.image.version": version,
            "org.opencontainers.image.vendor": "Tidegate",
            f"{BUNDLE_ANNOTATION}.name": name,
            f"{BUNDLE_ANNOTATION}.sku": sku.name,
            f"{BUNDLE_ANNOTATION}.runtime": sku.runtime,
            f"{BUNDLE_ANNOTATION}.precision": sku.precision,
            f"{BUNDLE_ANNOTATION}.sha256": bundle_sha,
            f"{BUNDLE_ANNOTATION}.path": f"/{LAYER_DIR}/{bundle.name}",
        }
        config = _json(
            {
                "architecture": sku.architecture,
                "os": "linux",
                "created": created,
                "config": {"Labels": annotations},
                "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},  # uncompressed: same digest
                "history": [{"created": created, "created_by": "tidegate build"}],
            }
        )
        manifest = _json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": _descriptor(OCI_CONFIG, config),
                "layers": [layer],
                "annotations": annotations,
            }
        )
        index = _json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    _descriptor(
                        OCI_MANIFEST,
                        manifest,
                        platform={"architecture": sku.architecture, "os": "linux"},
                        annotations={"org.opencontainers.image.ref.name": f"{version}-{sku.name}"},
                    )
                ],
            }
        )
        blobs: dict[str, Content] = {hashlib.sha256(b).hexdigest(): b for b in (config, manifest)}
        blobs[hashing.sha.hexdigest()] = layer_path
        with atomic_writer(out) as fh:
            _tar_to(
                fh,
                [
                    ("oci-layout", _json({"imageLayoutVersion": "1.0.0"})),
                    ("index.json", index),
                    ("blobs", None),
                    ("blobs/sha256", None),
                    *((f"blobs/sha256/{digest}", blob) for digest, blob in sorted(blobs.items())),
                ],
            )
    return out


def greengrass_recipe(
    *,
    name: str,
    version: str,
    sku: Sku,
    bundle: Artifact,
    artifact_uri_base: str,
    repository_url: str,
    description: str,
) -> dict[str, Any]:
    """An AWS IoT Greengrass v2 component recipe that installs the bundle with the agent,
    which verifies the file against the update repository's signed metadata (Greengrass's
    own digest check is not the trust anchor), flips its A/B slot and self-tests."""
    arch = {"amd64": "amd64", "arm64": "aarch64"}[sku.architecture]
    file = bundle.path.name
    return {
        "RecipeFormatVersion": "2020-01-25",
        "ComponentName": f"dev.tidegate.model.{name}",
        "ComponentVersion": version,
        "ComponentDescription": description,
        "ComponentPublisher": "Tidegate",
        "ComponentConfiguration": {
            "DefaultConfiguration": {
                "sku": sku.name,
                "agentRoot": "/var/lib/tidegate",
                "repository": repository_url,
                "latencyBudgetMs": sku.latency_budget_ms,
                "memoryCeilingMb": sku.memory_ceiling_mb,
            }
        },
        "ComponentDependencies": {
            "dev.tidegate.agent": {
                "VersionRequirement": f">={sku.min_agent_version}",
                "DependencyType": "HARD",
            }
        },
        "Manifests": [
            {
                "Platform": {"os": "linux", "architecture": arch},
                "Lifecycle": {
                    "Install": {
                        "Script": (
                            "tidegate agent install --root {configuration:/agentRoot} "
                            f"--repo {{configuration:/repository}} --bundle {{artifacts:path}}/{file} --quiet"
                        ),
                        "RequiresPrivilege": True,
                        "Timeout": 1800,
                    }
                },
                "Artifacts": [
                    {
                        "URI": f"{artifact_uri_base.rstrip('/')}/{name}/{version}/{file}",
                        "Digest": base64.b64encode(bytes.fromhex(bundle.sha256)).decode(),
                        "Algorithm": "SHA-256",
                        "Unarchive": "NONE",
                        "Permission": {"Read": "OWNER", "Execute": "NONE"},
                    }
                ],
            }
        ],
    }


def update_manifest(
    *,
    name: str,
    version: str,
    sku: Sku,
    bundle: Artifact,
    oci: Artifact,
    target_path: str,
    artifact_uri_base: str,
) -> dict[str, Any]:
    """What a device (or an operator planning a campaign) needs to know before fetching."""
    mb = bundle.size / (1024 * 1024)
    return {
        "schema": "tidegate.update-manifest/1",
        "name": name,
        "version": version,
        "sku": sku.name,
        "runtime": sku.runtime,
        "precision": sku.precision,
        "min_agent_version": sku.min_agent_version,
        "artifacts": [
            {"kind": "bundle", "uri": f"tuf:{target_path}", "sha256": bundle.sha256, "size": bundle.size},
            {
                "kind": "oci-archive",
                "uri": f"{artifact_uri_base.rstrip('/')}/{name}/{version}/{oci.path.name}",
                "sha256": oci.sha256,
                "size": oci.size,
            },
        ],
        "preconditions": {
            # download, the inactive slot and the old slot kept for rollback
            "min_free_disk_mb": round(mb * 3 + 16, 1),
            "networks": ["wifi", "ethernet"] if mb > 50 else None,
        },
        "rollout_hints": {
            "waves": [{"percent": 1, "soak_s": 3600}, {"percent": 10, "soak_s": 3600}, {"percent": 100}],
            "latency_budget_ms_p95": sku.latency_budget_ms,
            "memory_ceiling_mb": sku.memory_ceiling_mb,
            "drivers": sku.drivers,
        },
    }


_TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "bool": "TYPE_BOOL",
}


def triton_config(info: ModelInfo, *, name: str, sku: Sku, max_batch_size: int = 32) -> str:
    """A Triton Inference Server `config.pbtxt` for the cloud side. A model whose inputs and
    outputs all lead with one dynamic dimension is batched by Triton (that axis leaves `dims`)."""
    tensors = (*info.inputs, *info.outputs)
    batched = all(t.shape and isinstance(t.shape[0], str) for t in tensors)

    def block(kind: str, specs: Iterable[Any]) -> str:
        parts = []
        for t in specs:
            dims = t.shape[1:] if batched else t.shape
            shown = ", ".join(str(d) if isinstance(d, int) else "-1" for d in dims)
            dtype = _TRITON_TYPES.get(t.dtype, "TYPE_FP32")
            parts.append(f'  {{\n    name: "{t.name}"\n    data_type: {dtype}\n    dims: [ {shown} ]\n  }}')
        return f"{kind} [\n" + ",\n".join(parts) + "\n]\n"

    platform = "tensorrt_plan" if sku.runtime == "tensorrt" else "onnxruntime_onnx"
    kind = "KIND_GPU" if sku.runtime == "tensorrt" else "KIND_CPU"
    text = f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch_size if batched else 0}\n'
    text += block("input", info.inputs) + block("output", info.outputs)
    text += f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n"
    if batched:
        text += "dynamic_batching {\n  max_queue_delay_microseconds: 2000\n}\n"
    return text
