"""The schema of ``bundle.json``: what a bundle claims about itself.

The manifest is strict (unknown fields are refused) because the reader trusts
nothing in the archive that the manifest does not describe; new fields come
with a new ``format_version``.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.bundle.errors import ManifestError, UnsafePathError
from shared.semver import InvalidVersionError, SemVer
from shared.settings_file import first_error

MANIFEST_NAME = "bundle.json"
FORMAT_VERSION = 1

_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_SKU = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_SHA256 = r"^[0-9a-f]{64}$"
_MAX_PATH = 255


def check_member_name(name: str) -> str:
    """Return `name` if it is a plain relative POSIX path, else raise `UnsafePathError`.

    Shared by the manifest (for listed paths) and the reader (for tar
    members) so both refuse exactly the same names.
    """
    if not name or len(name) > _MAX_PATH:
        raise UnsafePathError(f"member {name!r}: empty or longer than {_MAX_PATH} characters")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UnsafePathError(f"member {name!r}: absolute path")
    if "\\" in name or "\x00" in name:
        raise UnsafePathError(f"member {name!r}: backslash or NUL in name")
    parts = name.split("/")
    if any(p == ".." for p in parts):
        raise UnsafePathError(f"member {name!r}: '..' escapes the bundle")
    if any(p in ("", ".") for p in parts):
        raise UnsafePathError(f"member {name!r}: empty or '.' path component")
    return name


def _semver(value: str) -> str:
    try:
        SemVer.parse(value)
    except InvalidVersionError as exc:
        raise ValueError(str(exc)) from exc
    return value


class Runtime(StrEnum):
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PayloadFile(_Strict):
    path: str
    size: Annotated[int, Field(ge=0)]
    sha256: Annotated[str, Field(pattern=_SHA256)]

    @field_validator("path")
    @classmethod
    def _safe(cls, v: str) -> str:
        try:
            check_member_name(v)
        except UnsafePathError as exc:
            raise ValueError(str(exc)) from exc
        if v == MANIFEST_NAME:
            raise ValueError(f"{MANIFEST_NAME} cannot list itself")
        return v


class Tolerance(_Strict):
    atol: Annotated[float, Field(ge=0)] = 1e-5
    rtol: Annotated[float, Field(ge=0)] = 1e-4


class SelfTestSpec(_Strict):
    """What the agent runs after a flip before it commits the new slot."""

    inputs: str
    outputs: str
    tolerance: Tolerance = Tolerance()
    latency_budget_ms: Annotated[float, Field(gt=0)]
    memory_ceiling_mb: Annotated[float, Field(gt=0)]
    runs: Annotated[int, Field(ge=1, le=10_000)] = 20


class BuildProvenance(_Strict):
    builder_version: str
    created: str
    model_sha256: Annotated[str, Field(pattern=_SHA256)] | None = None
    lineage: dict[str, str] = Field(default_factory=dict)


class BundleManifest(_Strict):
    format_version: Literal[1] = 1
    name: Annotated[str, Field(pattern=_NAME)]
    version: str
    skus: Annotated[list[Annotated[str, Field(pattern=_SKU)]], Field(min_length=1)]
    runtime: Runtime
    entry_model: str
    inference_config: str
    self_test: SelfTestSpec
    files: Annotated[list[PayloadFile], Field(min_length=1)]
    min_agent_version: str = "0.1.0"
    provenance: BuildProvenance

    _validate_version = field_validator("version", "min_agent_version")(_semver)

    @field_validator("skus")
    @classmethod
    def _unique_skus(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("duplicate SKU")
        return v

    @model_validator(mode="after")
    def _cross_check(self) -> BundleManifest:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("files lists the same path twice")
        listed = set(paths)
        refs = {
            "entry_model": self.entry_model,
            "inference_config": self.inference_config,
            "self_test.inputs": self.self_test.inputs,
            "self_test.outputs": self.self_test.outputs,
        }
        for field, path in refs.items():
            if path not in listed:
                raise ValueError(f"{field} {path!r} is not one of the listed files")
        return self

    @property
    def semver(self) -> SemVer:
        return SemVer.parse(self.version)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> PayloadFile:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def to_json_bytes(self) -> bytes:
        """Canonical serialisation: sorted keys, no whitespace, so builds are byte-identical."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes, *, source: str = MANIFEST_NAME) -> BundleManifest:
        try:
            raw: Any = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{source}: not valid JSON ({exc})") from exc
        return cls.from_obj(raw, source=source)

    @classmethod
    def from_obj(cls, raw: Any, *, source: str = MANIFEST_NAME) -> BundleManifest:
        """Validate a decoded manifest, turning the first schema error into a `ManifestError`."""
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            raise ManifestError(f"{source}: {first_error(exc)}{more}") from exc
