"""The AWS IoT Jobs MQTT device protocol: topics, states and message shapes.

Field for field as AWS documents it (and as aws-iot-device-sdk-python-v2's
``awsiot/iotjobs.py`` models it), so that a Tidegate agent talks to AWS IoT
Core unchanged and the fleet server serves devices built on the AWS SDK.
The agent uses the device side, the fleet server the service side.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

PREFIX = "$aws/things/{thing}/jobs"
MAX_STATUS_DETAILS_KEY = 128
MAX_STATUS_DETAILS_VALUE = 1024
_DETAIL_KEY = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")
_THING = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")
_JOB_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class JobStatus(StrEnum):
    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    REJECTED = "REJECTED"
    REMOVED = "REMOVED"
    CANCELED = "CANCELED"

    @property
    def terminal(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.IN_PROGRESS)


#: A pending execution (AWS IoT Jobs' word): queued or in progress, not yet terminal.
PENDING = (JobStatus.QUEUED.value, JobStatus.IN_PROGRESS.value)

DEVICE_SETTABLE = frozenset(
    {JobStatus.IN_PROGRESS, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.REJECTED}
)


class RejectedCode(StrEnum):
    INVALID_TOPIC = "InvalidTopic"
    INVALID_JSON = "InvalidJson"
    INVALID_REQUEST = "InvalidRequest"
    INVALID_STATE_TRANSITION = "InvalidStateTransition"
    RESOURCE_NOT_FOUND = "ResourceNotFound"
    VERSION_MISMATCH = "VersionMismatch"
    INTERNAL_ERROR = "InternalError"
    REQUEST_THROTTLED = "RequestThrottled"


def valid_thing_name(name: str) -> bool:
    return bool(_THING.match(name))


def valid_job_id(job_id: str) -> bool:
    return bool(_JOB_ID.match(job_id))


class Topics:
    """Every topic of one thing, on both sides of the protocol."""

    def __init__(self, thing: str) -> None:
        if not valid_thing_name(thing):
            raise ValueError(f"invalid thing name {thing!r}")
        self.thing = thing
        self.prefix = PREFIX.format(thing=thing)

    @property
    def notify(self) -> str:
        return f"{self.prefix}/notify"

    @property
    def notify_next(self) -> str:
        return f"{self.prefix}/notify-next"

    @property
    def get(self) -> str:
        return f"{self.prefix}/get"

    @property
    def start_next(self) -> str:
        return f"{self.prefix}/start-next"

    def job_get(self, job_id: str) -> str:
        return f"{self.prefix}/{job_id}/get"

    def update(self, job_id: str) -> str:
        return f"{self.prefix}/{job_id}/update"

    @staticmethod
    def accepted(topic: str) -> str:
        return f"{topic}/accepted"

    @staticmethod
    def rejected(topic: str) -> str:
        return f"{topic}/rejected"


def check_status_details(details: Any) -> str | None:
    """Why `details` is not a valid statusDetails map, or None when it is."""
    if details is None:
        return None
    if not isinstance(details, dict):
        return "statusDetails must be an object of strings"
    for k, v in details.items():
        if not isinstance(k, str) or not _DETAIL_KEY.match(k):
            return f"statusDetails key {k!r} must match [a-zA-Z0-9:_-]{{1,128}}"
        if not isinstance(v, str) or not v or len(v) > MAX_STATUS_DETAILS_VALUE:
            return f"statusDetails value for {k!r} must be a string of 1 to {MAX_STATUS_DETAILS_VALUE} chars"
    return None


def clean_status_details(details: dict[str, Any]) -> dict[str, str]:
    """Make a device's details fit AWS's limits: keys filtered, values stringified and truncated."""
    out: dict[str, str] = {}
    for k, v in details.items():
        key = re.sub(r"[^a-zA-Z0-9:_-]", "_", str(k))[:MAX_STATUS_DETAILS_KEY]
        if not key:
            continue
        text = v if isinstance(v, str) else str(v)
        out[key] = (text or "-")[:MAX_STATUS_DETAILS_VALUE]
    return out
