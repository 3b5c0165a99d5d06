"""Traces and logs for the gateway.

Spans (OpenTelemetry API; exported by whatever SDK the deployment configures, none by
default; `cloud_serving.tracing` sets one up with tail-biased sampling and OTLP):
``gateway.request`` for each inference request, with ``gateway.preprocess`` (body, schema,
tensor), ``gateway.model`` and ``gateway.postprocess`` (labels, the reply) inside it,
carrying model, version and whether the fallback answered; a failed request's root span has
error status.
Logs are JSON lines from `shared.logs` (personal data redacted by the formatter, the
request's correlation id in every line).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from opentelemetry import trace

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


def failed(current: Any, why: str) -> None:
    """Mark a span as an error (what tail-biased sampling keeps)."""
    if _Tracing.on:
        current.set_status(trace.Status(trace.StatusCode.ERROR, why[:200]))


class _NoSpan:
    def set_attribute(self, key: str, value: Any) -> None:
        return None


_NO_SPAN = _NoSpan()
_NULL_SPAN = nullcontext(_NO_SPAN)  # reusable: nullcontext keeps no state
