"""What answers a request: one interface, several kinds.

* `OnnxBackend`: a model in ONNX Runtime in this process, behind the shared dynamic
  batcher (bounded queue: `OverloadedError` when full, which the gateway turns into 429).
* `ConstantFallback`: a heuristic policy (fixed outputs) for when the model fails or
  breaches its guardrails.

* `TritonBackend`: a model on a remote NVIDIA Triton server, over its HTTP (KServe v2)
  protocol through `tritonclient` (the `triton` extra); Triton batches on its side.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shared.batching import DynamicBatcher, InferencePool, NonFiniteOutputError, OnnxModelRunner
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
        (overloaded, not loaded); a caller may fail the future itself at its deadline.
        Outputs are finite: a model that emits NaN or infinity has failed, and the future
        gets `NonFiniteOutputError` (the guardrail that sends the caller to the fallback)."""
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
            raise BackendError(f"version {version}: cannot load {model}: {str(exc).splitlines()[0]}") from exc
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
            finite_outputs=True,  # checked per batch in the inference thread
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
        for name, value in self.outputs.items():
            if not np.all(np.isfinite(value)):
                raise BackendError(f"fallback output {name!r} is not finite")

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


_TRITON_TYPES = {
    "float32": "FP32",
    "float16": "FP16",
    "float64": "FP64",
    "int64": "INT64",
    "int32": "INT32",
    "uint8": "UINT8",
}


class TritonBackend:
    """One model version served by Triton: `submit` starts a request on the event loop."""

    def __init__(
        self, version: str, url: str, model: str, *, model_version: str = "", timeout_s: float = 10.0
    ) -> None:
        try:
            import tritonclient.http as triton_http
            import tritonclient.http.aio as triton_aio
        except ImportError as exc:
            raise BackendError("a Triton backend needs tritonclient: pip install 'tidegate[triton]'") from exc
        self.version, self.url, self.model, self.model_version = version, url, model, model_version
        self.timeout_s = timeout_s
        self._http, self._aio = triton_http, triton_aio
        self._client: Any = None
        self.input_name, self.input_type = "", "FP32"
        self.output_names: list[str] = []
        self.sample_shape: tuple[int | None, ...] = ()

    async def start(self) -> None:
        host = self.url.removeprefix("http://").removeprefix("https://").rstrip("/")
        self._client = self._aio.InferenceServerClient(host, conn_timeout=self.timeout_s)
        try:
            meta = await self._client.get_model_metadata(self.model, self.model_version)
        except Exception as exc:  # tritonclient raises its own InferenceServerException and aiohttp's errors
            await self._client.close()
            raise BackendError(f"Triton at {self.url}: model {self.model!r} unavailable: {exc}") from exc
        first = meta["inputs"][0]
        self.input_name, self.input_type = first["name"], first["datatype"]
        self.sample_shape = tuple(d if d > 0 else None for d in first["shape"][1:])
        self.output_names = [o["name"] for o in meta["outputs"]]

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def _infer(self, sample: np.ndarray[Any, Any]) -> Outputs:
        batch = sample[None, ...].astype(np.float32 if self.input_type == "FP32" else sample.dtype)
        inp = self._http.InferInput(self.input_name, list(batch.shape), self.input_type)
        inp.set_data_from_numpy(batch, binary_data=False)
        outs = [self._http.InferRequestedOutput(n, binary_data=False) for n in self.output_names]
        try:
            result = await self._client.infer(
                self.model,
                [inp],
                model_version=self.model_version,
                outputs=outs,
                timeout=int(self.timeout_s * 1e6),
            )
        except Exception as exc:
            raise BackendError(f"Triton {self.model} {self.version}: {str(exc)[:200]}") from exc
        outputs = {n: np.asarray(result.as_numpy(n))[0] for n in self.output_names}
        for name, value in outputs.items():
            if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
                raise NonFiniteOutputError(f"output {name!r} is not finite")
        return outputs

    def submit(self, sample: np.ndarray[Any, Any]) -> asyncio.Future[Outputs]:
        return asyncio.ensure_future(self._infer(sample))

    async def infer(self, sample: np.ndarray[Any, Any]) -> Outputs:
        return await self._infer(sample)
