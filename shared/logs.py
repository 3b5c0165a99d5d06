"""Structured logs for every Tidegate service: one JSON object per line, personal data
redacted by the formatter itself (no call site can forget), and the correlation id of the
request being served in every line.

Redaction has two parts, both configurable: values under keys that look personal (email,
VIN, user, ...) become a short hash (correlatable, not readable), and text anywhere (the
message, any string value) that matches a pattern (e-mail addresses, VINs, phone numbers,
IPv4 addresses by default) is replaced by the same kind of hash.

The correlation id comes from the caller's ``X-Request-ID`` (or is made up) and lives in a
context variable for the length of the request; services pass it on in their own outgoing
calls, so one id follows a request from the gateway to the registry and the fleet server.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import re
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

REQUEST_ID_HEADER = "X-Request-ID"
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("tidegate_request_id", default=None)

DEFAULT_KEYS = r"(?i)(email|phone|name|address|vin|user|ip|token|key|location|lat|lon|password|secret)"
DEFAULT_PATTERNS = (
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",  # e-mail
    r"\b[A-HJ-NPR-Z0-9]{17}\b",  # VIN (ISO 3779: no I, O, Q)
    r"\+?\d[\d ()-]{8,}\d",  # phone number
    r"\b(?:\d{1,3}\.){3}\d{1,3}\b",  # IPv4
)


def _token(value: str) -> str:
    return f"redacted:{hashlib.sha256(value.encode()).hexdigest()[:12]}"


class Redactor:
    def __init__(self, keys: str = DEFAULT_KEYS, patterns: Iterable[str] = DEFAULT_PATTERNS) -> None:
        self.keys = re.compile(keys)
        pats = list(patterns)
        self.text = re.compile("|".join(f"(?:{p})" for p in pats)) if pats else None

    def string(self, value: str) -> str:
        return self.text.sub(lambda m: _token(m.group(0)), value) if self.text else value

    def __call__(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: _token(json.dumps(v, default=str, sort_keys=True)) if self.keys.search(str(k)) else self(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self(v) for v in value]
        if isinstance(value, str):
            return self.string(value)
        return value


DEFAULT_REDACTOR = Redactor()


@contextmanager
def correlated(incoming: str | None) -> Iterator[str]:
    """The request's correlation id (the caller's `X-Request-ID` when sane, else a new one),
    current for the length of the block: every log line and outgoing call in it carries it."""
    rid = new_request_id(incoming)
    token = request_id.set(rid)
    try:
        yield rid
    finally:
        request_id.reset(token)


def new_request_id(incoming: str | None) -> str:
    """The caller's id when it is a sane token, else a fresh one."""
    if incoming and len(incoming) <= 128 and re.fullmatch(r"[A-Za-z0-9._:-]+", incoming):
        return incoming
    return uuid.uuid4().hex


def pass_request_id(request: Any) -> None:
    """An httpx request hook: outgoing calls made while serving a request carry its id."""
    if (rid := request_id.get()) is not None:
        request.headers.setdefault(REQUEST_ID_HEADER, rid)


_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the request's correlation id,
    the trace (when OpenTelemetry has a current span) and every `extra=` field, redacted."""

    def __init__(self, redactor: Redactor = DEFAULT_REDACTOR) -> None:
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": self.redactor.string(record.getMessage()),
        }
        if (rid := request_id.get()) is not None:
            doc["request_id"] = rid
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if extra:
            doc.update(self.redactor(json.loads(json.dumps(extra, default=str))))
        trace_ids = _trace_ids()
        if trace_ids:
            doc["trace_id"], doc["span_id"] = trace_ids
        if record.exc_info:
            doc["error"] = self.redactor.string(self.formatException(record.exc_info))
        return json.dumps(doc, sort_keys=True)


def _trace_ids() -> tuple[str, str] | None:
    if "opentelemetry.trace" not in sys.modules:  # nothing traces: do not import it for a log line
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}") if ctx.is_valid else None


#: Loggers of Tidegate's own packages: logged at the level asked for (libraries stay at WARNING).
OWN_LOGGERS = ("tidegate", "agent", "fleet_server", "cloud_serving", "hil", "builder", "shared")


def configure_logging(level: int = logging.INFO, redactor: Redactor = DEFAULT_REDACTOR) -> None:
    """One JSON line per record on stderr, the same schema in every process (time, level,
    logger, message, the request's id, `extra=` fields), personal data redacted. The handler
    sits on the root logger, so every logger's records reach it once (and the agent's own
    log tail sees them too); Tidegate's loggers log at `level`, libraries at WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(redactor))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in OWN_LOGGERS:
        own = logging.getLogger(name)
        own.setLevel(level)
        own.handlers[:] = []
        own.propagate = True


class RateLimitedLog:
    """Log an exception that a hot path handles and moves past (a failed canary answered by
    production, a dropped shadow batch) without letting a failing backend write a line per
    request: the first occurrence of each kind is logged with its traceback, further ones
    within `every_s` are counted and reported, with the count, on the next line logged."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0, clock: Any = None) -> None:
        import time

        self.logger, self.every_s = logger, every_s
        self.clock = clock or time.monotonic
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def exception(self, kind: str, message: str, exc: BaseException) -> bool:
        """Log `exc` under `kind` unless one was logged within `every_s`; True if it was."""
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.every_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._last[kind] = now
        more = self._suppressed.pop(kind, 0)
        suffix = f" ({more} more since the last report)" if more else ""
        self.logger.warning("%s: %s%s", message, str(exc) or type(exc).__name__, suffix, exc_info=exc)
        return True
