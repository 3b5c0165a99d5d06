"""Tracing set-up for the gateway: the OpenTelemetry SDK with an OTLP/HTTP exporter, and the
tail-biased sampling of `cloud_serving.observability` (errors, fallbacks and slow requests
always, the rest at `sample_rate`). Needs the `otel` extra (`opentelemetry-sdk`,
`opentelemetry-exporter-otlp-proto-http`)."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from cloud_serving.observability import configure_sampling


def setup_tracing(
    *,
    exporter: SpanExporter | None = None,
    endpoint: str | None = None,
    sample_rate: float = 0.05,
    slow_ms: float = 250.0,
    service_name: str = "tidegate-gateway",
) -> TracerProvider:
    """Kept traces go in batches to `exporter`, or to an OTLP/HTTP exporter at `endpoint`;
    the provider also becomes the process's global one (other instrumentation uses it)."""
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint, timeout=10)
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    configure_sampling(provider.get_tracer("tidegate.serving"), sample_rate=sample_rate, slow_ms=slow_ms)
    return provider
