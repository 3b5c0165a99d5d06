"""Tail-biased sampling on the real OpenTelemetry SDK: errors, fallbacks and slow requests
are always kept, whole and with their parentage; ordinary traces at the configured rate;
the spans of dropped traces never reach the SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from cloud_serving import observability
from cloud_serving.observability import configure_sampling, failed, sampling_counts, span


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    saved = dict(vars(observability._Tracing))
    out = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(out))
    configure_sampling(provider.get_tracer("test"), sample_rate=0.1, slow_ms=20, seed=3)
    yield out
    for k, v in saved.items():
        if not k.startswith("__"):
            setattr(observability._Tracing, k, v)


def _request(kind: str) -> None:
    with span("gateway.request", kind=kind) as root:
        with span("gateway.model"):
            if kind == "slow":
                time.sleep(0.05)
        if kind == "error":
            failed(root, "backend failed")
        if kind == "fallback":
            root.set_attribute("tidegate.fallback", True)


def test_errors_fallbacks_and_slow_traces_are_kept_whole_and_the_rest_sampled(
    exporter: InMemorySpanExporter,
) -> None:
    for i in range(2000):
        _request("ok")
        if i % 100 == 0:
            _request("error")
            _request("fallback")
        if i % 400 == 0:
            _request("slow")
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "gateway.request"]
    by_kind = {
        k: sum(1 for s in roots if s.attributes["tidegate.kind"] == k)
        for k in ("ok", "error", "fallback", "slow")
    }
    assert by_kind["error"] == 20 and by_kind["fallback"] == 20 and by_kind["slow"] == 5
    assert 120 <= by_kind["ok"] <= 280  # 10 % of 2000, binomial sd ~13
    children = [s for s in spans if s.name == "gateway.model"]
    assert len(children) == len(roots)  # every kept trace is whole
    by_id = {s.context.span_id: s for s in roots}
    for c in children:  # replayed with their parentage and times
        root = by_id[c.parent.span_id]
        assert c.context.trace_id == root.context.trace_id
        assert root.start_time <= c.start_time <= c.end_time <= root.end_time
    slow = next(s for s in roots if s.attributes["tidegate.kind"] == "slow")
    assert (slow.end_time - slow.start_time) / 1e6 >= 50
    assert all(
        s.status.status_code is StatusCode.ERROR for s in roots if s.attributes["tidegate.kind"] == "error"
    )
    counts = sampling_counts()
    assert counts["error"] == 40 and counts["slow"] == 5 and counts["dropped"] == 2000 - by_kind["ok"]


def test_an_exception_inside_a_span_marks_the_trace_failed_and_keeps_it(
    exporter: InMemorySpanExporter,
) -> None:
    with pytest.raises(ValueError), span("gateway.request"), span("gateway.preprocess"):
        raise ValueError("bad body")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["gateway.preprocess"].status.status_code is StatusCode.ERROR
    assert "ValueError: bad body" in (spans["gateway.preprocess"].status.description or "")
