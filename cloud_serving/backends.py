"""What answers a request: one interface, several kinds.

* `OnnxBackend`: a model in ONNX Runtime in this process, behind the shared dynamic
  batcher (bounded queue: `OverloadedError` when full, which the gateway turns into 429).
* `ConstantFallback`: a heuristic policy (fixed outputs) for when the model fails or
  breaches its guardrails.

A remote NVIDIA Triton backend (KServe v2 over HTTP through `tritonclient`) is the next
kind behind the same interface; it is not built yet.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shared.batching import DynamicBatcher, InferencePool, OnnxModelRunner
from shared.errors import TidegateError


class BackendError(TidegateError):
    """A backend could not answer (load failure, inference error, timeout)."""


Outputs = dict[str, np.ndarray[Any, Any]]


class Backend(Protocol):
    version: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def submit(self, sample: np.ndarray[Any, Any]) -> asyncio.Future[Outputs]:
        """Start one inference; the future gets the outputs. Raising here means refused now
        (overloaded, not loaded); a caller may fail the future itself at its deadline."""
        ...

    async def infer(self, sample: np.ndarray[Any, Any]) -> Outputs: ...


class OnnxBackend:
    """One model version, loaded once; `infer` takes one sample (no batch axis)."""

    def __init__(
        self,
        version: str,
        model: Path,
        *,
        max_batch: int = 32,
        max_delay_us: int = 2000,
        max_queue: int = 1024,
        preferred_sizes: tuple[int, ...] = (),
        concurrency: int = 2,
        threads: int = 1,
        pool: InferencePool | None = None,
    ) -> None:
        self.version, self.model_path = version, model
        try:
            runner = OnnxModelRunner(model, threads=threads, version=version)
        except Exception as exc:  # ONNX Runtime's load errors come in several types
            raise BackendError(
                f"version {version}: cannot load {model}: {str(exc).splitlines()[0]}"
            ) from None
        self.input_name = runner.input_name
        self.output_names = runner.output_names
        self.sample_shape: tuple[int | None, ...] = tuple(
            d if isinstance(d, int) else None for d in runner.input_shape[1:]
        )
        self.batcher = DynamicBatcher(
            runner,
            max_batch=max_batch,
            max_delay_ms=max_delay_us / 1000,
            max_queue=max_queue,
            concurrency=concurrency,
            preferred_sizes=preferred_sizes,
            pool=pool,
        )

    async def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    def submit(self, sample: np.ndarray[Any, Any]) -> asyncio.Future[Outputs]:
        return self.batcher.submit(sample)

    async def infer(self, sample: np.ndarray[Any, Any]) -> Outputs:
        return await self.batcher.submit(sample)


class ConstantFallback:
    """Answers every request with the same outputs: the safe policy when the model cannot."""

    def __init__(self, outputs: dict[str, list[Any]], *, version: str = "fallback") -> None:
        self.version = version
        self.outputs = {k: np.asarray(v, dtype=np.float32) for k, v in outputs.items()}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def submit(self, sample: np.ndarray[Any, Any]) -> asyncio.Future[Outputs]:
        fut: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        fut.set_result(dict(self.outputs))
        return fut

    async def infer(self, sample: np.ndarray[Any, Any]) -> Outputs:
        return await self.submit(sample)
