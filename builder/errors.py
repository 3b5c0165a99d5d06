"""The builder's refusals: each names the input and the reason."""

from __future__ import annotations

from shared.errors import TidegateError


class BuildError(TidegateError):
    """Root of every builder refusal."""

    exit_code = 2  # bad input: nothing was built


class CatalogueError(BuildError):
    """The SKU catalogue is unreadable, or names no such SKU."""


class ModelError(BuildError):
    """The ONNX model fails the checker or declares shapes the builder cannot serve."""


class CalibrationError(BuildError):
    """The calibration data does not match the model's inputs."""


class VersionError(BuildError):
    """The version is not semver, or not above the last one published for the name."""


class OutputDirError(BuildError):
    """The output directory exists and is not empty."""


class SkuBuildError(BuildError):
    """One SKU could not be built (the others still are)."""


class GpuRequiredError(SkuBuildError):
    """A TensorRT SKU on a machine without TensorRT or without a GPU."""


class ToleranceError(SkuBuildError):
    """The built artifact strays from the fp32 model further than the SKU allows."""


class NondeterministicError(SkuBuildError):
    """Two runs of the built artifact on the same inputs gave different outputs."""
