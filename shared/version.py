"""The Tidegate version, one number for every package (agent, builder, server…)."""

from importlib.metadata import PackageNotFoundError, version

try:
    TIDEGATE_VERSION = version("tidegate")
except PackageNotFoundError:  # running from a source tree that was never installed
    TIDEGATE_VERSION = "0.0.0"
