"""Writes docs/CONFIGURATION.md from the settings models themselves, so the reference can never
drift from what the code accepts (a test fails when the file is stale):

    python docs/generate_config.py
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

HERE = Path(__file__).parent


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in args)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return f"table of {_type(args[1])}" if len(args) == 2 else "table"
    if annotation is type(None):
        return "none"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return (
        getattr(annotation, "__name__", str(annotation)).replace("PosixPath", "path").replace("Path", "path")
    )


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, Path):
        return f"`{value}`"
    return f"`{json.dumps(value, default=str)}`"


def _rows(model: type[BaseModel], prefix: str, env: bool = False) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        nested = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if nested is not None and not env:
            rows += _rows(nested, f"{prefix}{name}.")
            continue
        key = f"TIDEGATE_{name.upper()}" if env else f"{prefix}{name}"
        doc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | {_type(ann)} | {_default(field)} | {doc} |")
    return rows


def render() -> str:
    from agent.config import AgentConfig
    from cloud_serving.config import GatewayConfig, ModelConfig
    from fleet_server.settings import Settings

    head = "| setting | type | default | notes |\n|---|---|---|---|"
    return "\n".join(
        [
            "# Configuration reference",
            "",
            "Generated from the settings models by `python docs/generate_config.py`; a test keeps it",
            "current. Every value is validated at start: an unknown key or a bad value stops the",
            "process with one line naming it.",
            "",
            "## Fleet server (`tidegate server run`)",
            "",
            "Environment variables (or a `.env` file in the working directory); command-line options",
            "of `tidegate server run` (`--db`, `--port`, `--mqtt-host`, `--mqtt-port`, `--tick-s`)",
            "override them.",
            "",
            head,
            *_rows(Settings, "", env=True),
            "",
            "## Agent (`tidegate agent run --config agent.toml`)",
            "",
            "TOML sections; `agent/packaging/agent.toml.example` is a commented example.",
            "",
            head,
            *_rows(AgentConfig, ""),
            "",
            "## Gateway (`tidegate serve --config serving.toml`)",
            "",
            "`[gateway]`:",
            "",
            head,
            *_rows(GatewayConfig, "gateway."),
            "",
            "`[models.<name>]` (one table per model; `versions.<version>` per loaded version,",
            "`[[models.<name>.alerts]]` per alert rule):",
            "",
            head,
            *_rows(ModelConfig, "models.<name>."),
            "",
        ]
    )


def main() -> None:
    (HERE / "CONFIGURATION.md").write_text(render())


if __name__ == "__main__":
    main()
