"""The bundle's software bill of materials, CycloneDX 1.6 JSON (cyclonedx-python-lib).

The model is a `machine-learning-model` component with its digest; the runtime the
SKU needs and the Python packages the agent runs it with are libraries with purls.
Reproducible: the serial number is derived from the content and the timestamp is the
build's fixed creation time, so the same inputs give the same bytes.
"""

from __future__ import annotations

import importlib.metadata
import json
import uuid
from datetime import datetime

from cyclonedx.model import HashAlgorithm, HashType
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output import make_outputter
from cyclonedx.schema import OutputFormat, SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from packageurl import PackageURL

from builder.catalogue import Sku
from builder.errors import BuildError
from shared.version import TIDEGATE_VERSION

SCHEMA = SchemaVersion.V1_6
# What the agent needs to run an onnxruntime bundle; TensorRT SKUs add the engine runtime.
RUNTIME_PACKAGES = ("onnxruntime", "numpy")


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def make_sbom(
    *,
    name: str,
    version: str,
    sku: Sku,
    artifact: str,
    artifact_sha256: str,
    source_sha256: str,
    created: datetime,
) -> str:
    """The SBOM as CycloneDX JSON text, validated against the schema before it is returned."""
    model = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL,
        name=name,
        version=version,
        bom_ref=f"model:{name}@{version}:{sku.name}",
        description=f"{artifact} for SKU {sku.name} ({sku.runtime}, {sku.precision})",
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=artifact_sha256)],
        purl=PackageURL(
            type="generic", namespace="tidegate", name=name, version=version, qualifiers={"sku": sku.name}
        ),
    )
    bom = Bom()
    bom.metadata.timestamp = created
    bom.metadata.component = model
    bom.metadata.tools.components.add(
        Component(type=ComponentType.APPLICATION, name="tidegate-builder", version=TIDEGATE_VERSION)
    )
    source = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL,
        name=f"{name}-fp32-source",
        version=version,
        bom_ref=f"model:{name}@{version}:source",
        description="the trained fp32 ONNX model the artifact was built from",
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=source_sha256)],
    )
    bom.components.add(source)
    deps = [source]
    packages: list[tuple[str, str | None]] = [(p, _installed(p)) for p in RUNTIME_PACKAGES]
    if sku.runtime == "tensorrt":
        packages.append(("tensorrt", sku.drivers.get("tensorrt")))
    for pkg, pkg_version in packages:
        lib = Component(
            type=ComponentType.LIBRARY,
            name=pkg,
            version=pkg_version,
            bom_ref=f"pypi:{pkg}",
            purl=PackageURL(type="pypi", name=pkg, version=pkg_version),
        )
        bom.components.add(lib)
        deps.append(lib)
    bom.register_dependency(model, deps)
    bom.serial_number = uuid.uuid5(
        uuid.NAMESPACE_URL, f"tidegate:{name}:{version}:{sku.name}:{artifact_sha256}"
    )
    text = make_outputter(bom, OutputFormat.JSON, SCHEMA).output_as_string(indent=2)
    errors = JsonStrictValidator(SCHEMA).validate_str(text)
    if errors is not None:
        raise BuildError(
            f"the SBOM for {sku.name} does not validate against CycloneDX {SCHEMA.to_version()}: {errors}"
        )
    return json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def validate_sbom(text: str) -> None:
    """Raise if `text` is not valid CycloneDX 1.6 JSON (used by tests and `bundle inspect`)."""
    errors = JsonStrictValidator(SCHEMA).validate_str(text)
    if errors is not None:
        raise BuildError(f"not a valid CycloneDX {SCHEMA.to_version()} SBOM: {errors}")
