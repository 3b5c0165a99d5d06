"""The SKU catalogue: per hardware SKU, what to build and the limits its bundle promises.

A TOML file (`config/skus.toml`, documented in docs/SKUS.md) read into strict
models: an unknown field, runtime or precision is an error that names the SKU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from builder.errors import CatalogueError
from shared.semver import InvalidVersionError, SemVer
from shared.settings_file import first_error, read_toml

DEFAULT_CATALOGUE = Path(__file__).resolve().parent.parent / "config" / "skus.toml"


class Tolerance(BaseModel):
    """How far the built artifact may stray from the fp32 model on the calibration inputs."""

    model_config = ConfigDict(extra="forbid")

    max_abs_error: float = Field(ge=0)
    min_top1_agreement: float = Field(default=1.0, ge=0, le=1)


class Sku(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str = ""
    runtime: Literal["onnxruntime", "tensorrt"]
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    architecture: Literal["amd64", "arm64"] = "amd64"
    execution_providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"], min_length=1)
    memory_ceiling_mb: float = Field(gt=0)
    latency_budget_ms: float = Field(gt=0)  # p95
    min_agent_version: str = "0.1.0"
    hardware_compatibility: Literal["none", "ampere_plus", "same_compute_capability"] = "none"
    tensorrt_major: int | None = Field(default=None, ge=8)
    drivers: dict[str, str] = Field(default_factory=dict)
    tolerance: Tolerance

    @model_validator(mode="after")
    def _consistent(self) -> Sku:
        try:
            SemVer.parse(self.min_agent_version)
        except InvalidVersionError as exc:
            raise ValueError(f"min_agent_version: {exc}") from exc
        if self.runtime == "tensorrt" and self.tensorrt_major is None:
            raise ValueError("a tensorrt SKU names its tensorrt_major (10 or 11)")
        if self.runtime == "onnxruntime" and self.precision == "fp16":
            raise ValueError("onnxruntime SKUs build fp32 or int8 (fp16 on CPU is slower, not smaller)")
        if self.tensorrt_major is not None and self.tensorrt_major >= 11 and self.precision == "int8":
            raise ValueError(
                "TensorRT 11 has no int8 calibrator: quantise with Q/DQ nodes (an int8 onnxruntime SKU)"
            )
        return self


class Catalogue(BaseModel):
    skus: dict[str, Sku]

    def get(self, name: str) -> Sku:
        try:
            return self.skus[name]
        except KeyError as exc:
            raise CatalogueError(
                f"unknown SKU {name!r}; the catalogue has: {', '.join(sorted(self.skus))}"
            ) from exc


def load_catalogue(path: Path = DEFAULT_CATALOGUE) -> Catalogue:
    raw = read_toml(path, CatalogueError, "SKU catalogue")
    table = raw.get("sku")
    if not isinstance(table, dict) or not table:
        raise CatalogueError(f"{path}: no [sku.<name>] tables")
    skus: dict[str, Sku] = {}
    for name, fields in table.items():
        try:
            skus[name] = Sku.model_validate({**fields, "name": name})
        except ValidationError as exc:
            raise CatalogueError(f"{path}: SKU {name!r}: {first_error(exc)}") from exc
    return Catalogue(skus=skus)
