"""Tracing set-up for the gateway: the OpenTelemetry SDK, an OTLP/HTTP exporter, and
tail-biased sampling.

Head sampling decides before anything is known; this decides when a trace's root span
ends: every trace with an error span (or a fallback answer) and every trace slower than
`slow_ms` is kept, the rest at `sample_rate`. Spans wait in memory until their root ends
(bounded: the oldest unfinished traces are dropped first and counted). Needs the `otel`
extra (`opentelemetry-sdk`, `opentelemetry-exporter-otlp-proto-http`).
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import StatusCode

from cloud_serving.observability import refresh_tracing


class TailSampler(SpanProcessor):
    def __init__(
        self,
        inner: SpanProcessor,
        *,
        sample_rate: float = 0.05,
        slow_ms: float = 250.0,
        max_traces: int = 10_000,
        seed: int | None = None,
    ) -> None:
        self.inner, self.sample_rate, self.slow_ms, self.max_traces = inner, sample_rate, slow_ms, max_traces
        self._pending: OrderedDict[int, list[ReadableSpan]] = OrderedDict()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.kept = {"error": 0, "slow": 0, "sampled": 0}
        self.dropped = 0
        self.evicted = 0

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        return None

    def _why_keep(self, spans: list[ReadableSpan], root: ReadableSpan) -> str | None:
        if any(s.status.status_code is StatusCode.ERROR for s in spans) or any(
            (s.attributes or {}).get("tidegate.fallback") is True for s in spans
        ):
            return "error"
        took_ms = ((root.end_time or 0) - (root.start_time or 0)) / 1e6
        if took_ms >= self.slow_ms:
            return "slow"
        return "sampled" if self._rng.random() < self.sample_rate else None

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        if ctx is None:
            return
        with self._lock:
            spans = self._pending.setdefault(ctx.trace_id, [])
            spans.append(span)
            if span.parent is not None and span.parent.is_valid:
                while len(self._pending) > self.max_traces:
                    self._pending.popitem(last=False)
                    self.evicted += 1
                return
            del self._pending[ctx.trace_id]
            why = self._why_keep(spans, span)
            if why is None:
                self.dropped += 1
                return
            self.kept[why] += 1
        for s in spans:
            self.inner.on_end(s)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return bool(self.inner.force_flush(timeout_millis))


def setup_tracing(
    *,
    exporter: SpanExporter | None = None,
    endpoint: str | None = None,
    sample_rate: float = 0.05,
    slow_ms: float = 250.0,
    service_name: str = "tidegate-gateway",
) -> TailSampler:
    """Install the SDK as the process's tracer provider (once per process): spans go through
    the tail sampler to `exporter`, or to an OTLP/HTTP exporter at `endpoint`."""
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint, timeout=10)
    sampler = TailSampler(BatchSpanProcessor(exporter), sample_rate=sample_rate, slow_ms=slow_ms)
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(sampler)
    trace.set_tracer_provider(provider)
    refresh_tracing()
    return sampler
