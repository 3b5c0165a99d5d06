"""Traces for the gateway, sampled at the tail at almost no cost for the traces dropped.

Spans: ``gateway.request`` for each inference request, with ``gateway.preprocess`` (body,
schema, tensor), ``gateway.model`` and ``gateway.postprocess`` (labels, the reply) inside
it, carrying model, version, the request's correlation id and whether the fallback
answered; a failed request has error status.

Tail-biased sampling decides when the request's root span ends: a trace with an error (or a
fallback answer) or slower than `slow_ms` is kept, the rest at `sample_rate`. Until then a
span is a small record (name, times, attributes) in a context variable, not an OpenTelemetry
span; a kept trace is replayed into the OpenTelemetry tracer with its recorded times and
parentage, so the SDK's cost is paid for kept traces only (creating SDK spans for every
request and dropping most at export cost the gateway 12 % of its throughput). Without an
OpenTelemetry SDK nothing is recorded at all. `cloud_serving.tracing` installs an SDK with
an OTLP exporter; a deployment may install its own (then every trace is kept unless
`configure_sampling` says otherwise).

Logs are JSON lines from `shared.logs` (personal data redacted by the formatter, the
request's correlation id in every line).
"""

from __future__ import annotations

import contextvars
import random
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

from opentelemetry import context as otel_context
from opentelemetry import trace

from shared.logs import request_id


class _Tracing:
    on: ClassVar[bool] = False
    tracer: ClassVar[Any] = None
    sample_rate: ClassVar[float] = 1.0
    slow_ms: ClassVar[float] = 250.0
    rng: ClassVar[random.Random] = random.Random()
    kept: ClassVar[dict[str, int]] = {"error": 0, "slow": 0, "sampled": 0}
    dropped: ClassVar[int] = 0


def refresh_tracing() -> bool:
    """Whether an OpenTelemetry SDK is the tracer provider, looked up once when a gateway
    starts (deployments install it before, through `opentelemetry-instrument` or code), not
    on every request: the lookup reads the environment each time."""
    if _Tracing.tracer is None and not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        _Tracing.tracer = trace.get_tracer("tidegate.serving")
    _Tracing.on = _Tracing.tracer is not None
    return _Tracing.on


def configure_sampling(tracer: Any, *, sample_rate: float, slow_ms: float, seed: int | None = None) -> None:
    """Trace through `tracer` with tail-biased sampling."""
    _Tracing.tracer, _Tracing.on = tracer, tracer is not None
    _Tracing.sample_rate, _Tracing.slow_ms, _Tracing.rng = sample_rate, slow_ms, random.Random(seed)
    _Tracing.kept = {"error": 0, "slow": 0, "sampled": 0}
    _Tracing.dropped = 0


def sampling_counts() -> dict[str, int]:
    return {**_Tracing.kept, "dropped": _Tracing.dropped}


@dataclass
class _Record:
    name: str
    parent: int | None
    start_ns: int
    attributes: dict[str, Any]
    end_ns: int = 0
    error: str | None = None

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value


@dataclass
class _Trace:
    records: list[_Record] = field(default_factory=list)
    # The OpenTelemetry context current when the root began (an HTTP server span of the
    # framework's own instrumentation, say): the replayed root becomes its child.
    parent: Any = None


_current: contextvars.ContextVar[tuple[_Trace, int] | None] = contextvars.ContextVar(
    "tidegate_trace", default=None
)


def span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A recorded span when tracing is on; otherwise a null context, so the request path
    pays nothing for tracing nobody collects."""
    if not _Tracing.on:
        return _NULL_SPAN
    return _recorded(name, {f"tidegate.{k}": v for k, v in attributes.items()})


@contextmanager
def _recorded(name: str, attributes: dict[str, Any]) -> Iterator[_Record]:
    state = _current.get()
    tr, parent = (_Trace(parent=otel_context.get_current()), None) if state is None else state
    if parent is None and (rid := request_id.get()) is not None:
        attributes["tidegate.request_id"] = rid
    rec = _Record(name, parent, time.time_ns(), attributes)
    tr.records.append(rec)
    token = _current.set((tr, len(tr.records) - 1))
    try:
        yield rec
    except BaseException as exc:
        rec.error = rec.error or f"{type(exc).__name__}: {exc}"[:200]
        raise
    finally:
        rec.end_ns = time.time_ns()
        _current.reset(token)
        if parent is None:
            _finish(tr)


def failed(current: Any, why: str) -> None:
    """Mark a span as failed (what tail-biased sampling always keeps)."""
    if isinstance(current, _Record):
        current.error = why[:200]


def _finish(tr: _Trace) -> None:
    root = tr.records[0]
    if any(r.error for r in tr.records) or root.attributes.get("tidegate.fallback") is True:
        why: str | None = "error"
    elif (root.end_ns - root.start_ns) / 1e6 >= _Tracing.slow_ms:
        why = "slow"
    else:
        why = "sampled" if _Tracing.rng.random() < _Tracing.sample_rate else None
    if why is None:
        _Tracing.dropped += 1
        return
    _Tracing.kept[why] += 1
    _replay(tr)


def _replay(tr: _Trace) -> None:
    """The kept trace as OpenTelemetry spans, with the recorded times and parentage."""
    tracer = _Tracing.tracer
    spans: list[Any] = []
    for r in tr.records:
        parent_ctx = trace.set_span_in_context(spans[r.parent]) if r.parent is not None else tr.parent
        s = tracer.start_span(r.name, context=parent_ctx, start_time=r.start_ns, attributes=r.attributes)
        if r.error:
            s.set_status(trace.Status(trace.StatusCode.ERROR, r.error))
        spans.append(s)
    for s, r in zip(reversed(spans), reversed(tr.records), strict=True):
        s.end(end_time=r.end_ns)


class _NoSpan:
    def set_attribute(self, key: str, value: Any) -> None:
        return None


_NO_SPAN = _NoSpan()
_NULL_SPAN = nullcontext(_NO_SPAN)  # reusable: nullcontext keeps no state
