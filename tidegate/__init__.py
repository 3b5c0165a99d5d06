"""Tidegate: the one CLI (`tidegate`) that puts every package's command group together."""

from shared.version import TIDEGATE_VERSION as __version__

__all__ = ["__version__"]
