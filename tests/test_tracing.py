"""Tail-biased sampling on the real OpenTelemetry SDK: errors, fallbacks and slow requests
are always kept, whole; ordinary traces at the configured rate."""

from __future__ import annotations

import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from cloud_serving.tracing import TailSampler


def test_errors_and_slow_traces_are_kept_whole_and_the_rest_sampled() -> None:
    exporter = InMemorySpanExporter()
    sampler = TailSampler(SimpleSpanProcessor(exporter), sample_rate=0.1, slow_ms=20, seed=3)
    provider = TracerProvider()
    provider.add_span_processor(sampler)
    tracer = provider.get_tracer("test")

    def request(kind: str) -> None:
        with tracer.start_as_current_span("gateway.request", attributes={"kind": kind}) as root:
            with tracer.start_as_current_span("gateway.model"):
                if kind == "slow":
                    time.sleep(0.05)
            if kind == "error":
                root.set_status(Status(StatusCode.ERROR, "backend failed"))
            if kind == "fallback":
                root.set_attribute("tidegate.fallback", True)

    for i in range(2000):
        request("ok")
        if i % 100 == 0:
            request("error")
            request("fallback")
        if i % 400 == 0:
            request("slow")
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "gateway.request"]
    by_kind = {
        k: sum(1 for s in roots if s.attributes["kind"] == k) for k in ("ok", "error", "fallback", "slow")
    }
    assert by_kind["error"] == 20 and by_kind["fallback"] == 20 and by_kind["slow"] == 5
    assert 120 <= by_kind["ok"] <= 280  # 10 % of 2000, binomial sd ~13
    assert len(spans) == 2 * len(roots)  # every kept trace is whole: root and model span
    assert (
        sampler.kept["error"] == 40 and sampler.kept["slow"] == 5 and sampler.dropped == 2000 - by_kind["ok"]
    )
    assert not sampler._pending  # nothing left waiting


def test_unfinished_traces_are_bounded() -> None:
    exporter = InMemorySpanExporter()
    sampler = TailSampler(SimpleSpanProcessor(exporter), sample_rate=1.0, max_traces=10)
    provider = TracerProvider()
    provider.add_span_processor(sampler)
    tracer = provider.get_tracer("test")
    roots = [tracer.start_span("root") for _ in range(50)]  # roots that never end
    from opentelemetry import trace

    for r in roots:
        with trace.use_span(r, end_on_exit=False), tracer.start_as_current_span("child"):
            pass
    assert len(sampler._pending) == 10 and sampler.evicted == 40
