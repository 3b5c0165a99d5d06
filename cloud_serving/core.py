"""What the parts of the gateway share: the attributes `Gateway.__init__` sets, and the few
helpers every part calls (a model by name, an event, a registry record)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from cloud_serving.backends import OnnxBackend
from cloud_serving.config import BatchingConfig, ServingConfig
from cloud_serving.errors import (
    ReleaseError,
    UnknownModelError,
)
from cloud_serving.flags import FlagCache
from cloud_serving.graylog import GrayLog
from cloud_serving.incidents import IncidentRecorder
from cloud_serving.model_state import ModelState
from cloud_serving.registry import Promotion, Registry
from cloud_serving.shadow_worker import WorkerAddress
from shared.batching import InferencePool
from shared.kpis import Mitigation
from shared.logs import Redactor

log = logging.getLogger("tidegate.serving")


def onnx_backend(version: str, path: Path, b: BatchingConfig, pool: InferencePool) -> OnnxBackend:
    return OnnxBackend(
        version,
        path,
        max_batch=b.max_batch,
        max_delay_us=b.max_delay_us,
        max_queue=b.max_queue,
        preferred_sizes=tuple(b.preferred_sizes),
        concurrency=b.concurrency,
        pool=pool,
    )


class GatewayCore:
    # What every part of the gateway shares (set by `Gateway.__init__`).
    config: ServingConfig
    clock: Callable[[], datetime]
    models: dict[str, ModelState]
    redactor: Redactor
    mitigations: list[Mitigation]
    incidents: IncidentRecorder
    gray: GrayLog | None
    registry: Registry | None
    flags: FlagCache | None
    pool: InferencePool
    shadow_worker: WorkerAddress | None  # where shadows run, when not in a child process
    _providers_http: httpx.Client | None
    _flag_writes: deque[tuple[str, Any, str]]
    _notifications: set[asyncio.Task[Any]]

    def model(self, name: str) -> ModelState:
        try:
            return self.models[name]
        except KeyError as exc:
            raise UnknownModelError(f"no model {name!r}; serving {', '.join(sorted(self.models))}") from exc

    def _note(self, st: ModelState, text: str) -> None:
        st.events.append(f"{self.clock().isoformat()} {text}")

    def _known(self, st: ModelState, version: str) -> None:
        if version not in st.versions:
            raise ReleaseError(
                f"{st.name} has no loaded version {version!r}; loaded: {', '.join(sorted(st.versions))}"
            )

    def _background(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    def _promoted(
        self, model: str, version: str, section: str, content: dict[str, Any], *, stage: bool = True
    ) -> None:
        """Queue a model-card section for the registry; `stage` also moves the release to
        production (a promotion), otherwise the section is evidence only."""
        if self.registry is not None:
            self.registry.pending.append(Promotion(model, version, section, content, promote=stage))
