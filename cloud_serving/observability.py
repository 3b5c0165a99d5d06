"""Traces and logs for the gateway.

Spans (OpenTelemetry API; exported by whatever SDK the deployment configures, none by
default): ``gateway.request`` for each inference request, with ``gateway.route`` and
``gateway.model`` inside it, carrying model, version, arm and whether the fallback answered.
Logs are JSON lines, and personal data in them is redacted by the formatter itself, so no
call site can forget to.
"""

from __future__ import annotations

import json
import logging
import sys
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from cloud_serving.canary import redact

tracer = trace.get_tracer("tidegate.serving")


class _Tracing:
    on = False


def refresh_tracing() -> bool:
    """Whether an OpenTelemetry SDK is the tracer provider, looked up once when a gateway
    starts (deployments install it before, through `opentelemetry-instrument` or code), not
    on every request: the lookup reads the environment each time."""
    _Tracing.on = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    return _Tracing.on


def span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A span when tracing is on; otherwise a null context, so the request path pays nothing
    for tracing nobody collects."""
    if not _Tracing.on:
        return _NULL_SPAN
    return tracer.start_as_current_span(name, attributes={f"tidegate.{k}": v for k, v in attributes.items()})


class _NoSpan:
    def set_attribute(self, key: str, value: Any) -> None:
        return None


_NO_SPAN = _NoSpan()
_NULL_SPAN = nullcontext(_NO_SPAN)  # reusable: nullcontext keeps no state

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra=` fields are included, redacted."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if extra:
            doc.update(redact(json.loads(json.dumps(extra, default=str))))
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            doc["trace_id"], doc["span_id"] = f"{span.trace_id:032x}", f"{span.span_id:016x}"
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc, sort_keys=True)


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("tidegate")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
