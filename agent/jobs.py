"""The device side of the AWS IoT Jobs MQTT protocol.

Requests carry a ``clientToken``; the reply arrives on ``<topic>/accepted``
or ``<topic>/rejected`` with the token echoed, and resolves the waiting
future. Messages on topics that are not this thing's are ignored and logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from agent.errors import AgentError
from agent.mqtt import Transport
from shared.iotjobs import JobStatus, Topics, clean_status_details

log = logging.getLogger(__name__)


class JobsRejectedError(AgentError):
    def __init__(self, code: str, message: str, execution_state: dict[str, Any] | None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.execution_state = execution_state or {}


class JobsTimeoutError(AgentError):
    """No reply from the jobs service in time."""


class JobsClient:
    def __init__(self, transport: Transport, thing: str, *, timeout_s: float = 10.0) -> None:
        self.transport = transport
        self.topics = Topics(thing)
        self.timeout_s = timeout_s
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.on_notify_next: Callable[[dict[str, Any] | None], None] = lambda e: None

    def subscriptions(self) -> list[str]:
        t = self.topics
        reply_bases = [t.start_next, t.get, f"{t.prefix}/+/update", f"{t.prefix}/+/get"]
        return [t.notify_next] + [f"{b}/{kind}" for b in reply_bases for kind in ("accepted", "rejected")]

    def handle(self, topic: str, payload: bytes) -> bool:
        """Route one incoming message; True if it was a jobs message for this thing."""
        if not topic.startswith(self.topics.prefix + "/"):
            if topic.startswith("$aws/things/"):
                log.warning("ignored a jobs message for another thing on %s", topic)
            return False
        try:
            body = json.loads(payload)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            log.warning("ignored malformed JSON on %s", topic)
            return True
        if topic == self.topics.notify_next:
            execution = body.get("execution")
            self.on_notify_next(execution if isinstance(execution, dict) else None)
            return True
        token = body.get("clientToken")
        fut = self._pending.pop(token, None) if isinstance(token, str) else None
        if fut is None or fut.done():
            return True
        if topic.endswith("/rejected"):
            fut.set_exception(
                JobsRejectedError(str(body.get("code")), str(body.get("message")), body.get("executionState"))
            )
        else:
            fut.set_result(body)
        return True

    async def _request(self, topic: str, body: dict[str, Any]) -> dict[str, Any]:
        token = uuid.uuid4().hex[:32]
        body = {**body, "clientToken": token}
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[token] = fut
        try:
            if not await self.transport.publish(topic, json.dumps(body).encode()):
                raise JobsTimeoutError(f"publish to {topic} was not acknowledged")
            return await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError as exc:
            raise JobsTimeoutError(f"no reply to {topic} within {self.timeout_s:g}s") from exc
        finally:
            self._pending.pop(token, None)

    async def start_next(
        self, details: dict[str, Any] | None = None, step_timeout_min: int | None = None
    ) -> dict[str, Any] | None:
        body: dict[str, Any] = {}
        if details:
            body["statusDetails"] = clean_status_details(details)
        if step_timeout_min:
            body["stepTimeoutInMinutes"] = step_timeout_min
        reply = await self._request(self.topics.start_next, body)
        execution = reply.get("execution")
        return execution if isinstance(execution, dict) else None

    async def describe(self, job_id: str) -> dict[str, Any] | None:
        reply = await self._request(self.topics.job_get(job_id), {"includeJobDocument": True})
        execution = reply.get("execution")
        return execution if isinstance(execution, dict) else None

    async def update(
        self,
        job_id: str,
        status: JobStatus,
        details: dict[str, Any],
        *,
        expected_version: int | None = None,
        step_timeout_min: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": status.value,
            "statusDetails": clean_status_details(details),
            "includeJobExecutionState": True,
        }
        if expected_version is not None:
            body["expectedVersion"] = expected_version
        if step_timeout_min:
            body["stepTimeoutInMinutes"] = step_timeout_min
        return await self._request(self.topics.update(job_id), body)
