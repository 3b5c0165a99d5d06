"""Observability overhead on the gateway: closed-loop throughput of 32 callers through the
HTTP app (in process, ASGI) with request metrics and tracing on (OpenTelemetry SDK, spans
for request, pre-processing, model and post-processing, tail-biased sampling at 5 %, batch
export to a discarding exporter) against both off, alternating runs. Goal >= 0.95."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from bench.common import print_table, write_result
from builder.samples import make_mlp
from cloud_serving import observability
from cloud_serving.app import _hash, create_app
from cloud_serving.config import ServingConfig
from cloud_serving.gateway import Gateway
from cloud_serving.observability import configure_sampling, sampling_counts


class _Discard(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


async def _load(app: Any, seconds: float, callers: int = 32) -> float:
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32).tolist()
    done = 0
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:

        async def caller(n: int) -> None:
            nonlocal done
            i = n
            while time.perf_counter() < stop:
                r = await client.post(
                    "/v1/models/m/infer",
                    json={"inputs": x[i % 64], "key": f"k{i}"},
                    headers={"Authorization": "Bearer bench-key"},
                )
                assert r.status_code == 200
                done += 1
                i += callers

        t0 = time.perf_counter()
        await asyncio.gather(*(caller(n) for n in range(callers)))
        return done / (time.perf_counter() - t0)


async def _run(work: Path, seconds: float, rounds: int) -> list[dict[str, Any]]:
    model = make_mlp(work / "m.onnx", features=256, hidden=512, layers=2, seed=0)
    config = ServingConfig.model_validate(
        {
            "gateway": {"api_keys_sha256": [_hash("bench-key")], "failure_dir": str(work / "failures")},
            "models": {"m": {"production": "1", "versions": {"1": {"path": str(model)}}}},
        }
    )
    exporter = _Discard()
    # The provider is not made global: FastAPI's own spans would then run in both modes.
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    configure_sampling(provider.get_tracer("bench"), sample_rate=0.05, slow_ms=250)
    gw = await Gateway(config, seed=0).start(tick=False)
    plain, observed = create_app(gw, start=False, observe=False), create_app(gw, start=False, observe=True)
    off: list[float] = []
    on: list[float] = []
    await _load(observed, 1.0)  # warm-up
    for _ in range(rounds):
        observability._Tracing.on = False
        off.append(await _load(plain, seconds))
        observability._Tracing.on = True
        on.append(await _load(observed, seconds))
    await gw.stop()
    provider.shutdown()
    counts = sampling_counts()
    base, with_obs = statistics.median(off), statistics.median(on)
    return [
        {
            "case": "HTTP gateway, 32 callers, metrics + tracing (tail sampling 5 %)",
            "baseline": "metrics and tracing off",
            "baseline req/s": base,
            "req/s": with_obs,
            "ratio": with_obs / base,
            "goal": ">= 0.95",
            "traces kept": counts["error"] + counts["slow"] + counts["sampled"],
            "traces dropped": counts["dropped"],
            "spans exported": exporter.spans,
        }
    ]


def run(seconds: float = 4.0, rounds: int = 3) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-obs-") as tmp:
        rows = asyncio.run(_run(Path(tmp), seconds, rounds))
    print_table("observability overhead (medians of alternating runs)", rows)
    write_result(
        "observability",
        rows,
        notes="in-process ASGI; client and server share the 2 cores",
    )
    return rows


if __name__ == "__main__":
    run()
