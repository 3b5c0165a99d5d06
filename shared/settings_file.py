"""Reading TOML settings files and reporting schema errors, the same way everywhere
(agent.toml, the SKU catalogue, serving.toml, manifests, job documents)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.errors import TidegateError


def read_toml(path: Path, error: type[TidegateError], what: str) -> dict[str, Any]:
    """The parsed file, or `error` naming the file and what is wrong with it."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise error(f"{path}: no such {what}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read the {what} ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from exc


def first_error(exc: ValidationError, root: str = "(root)") -> str:
    """`where: what` for the first schema error: one clear line rather than pydantic's list."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or root
    return f"{where}: {first['msg']}"
