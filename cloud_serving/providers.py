"""Metric providers for canary gates: a number read from Prometheus (a PromQL instant query)
or from a JSON field of an HTTP endpoint, besides the gateway's own counts.

A provider condition is read once per gateway tick, off the event loop, with explicit
timeouts; what it read becomes one timed sample the gate engine judges like any other. A
query that fails, times out, or returns no single number is *pending with the reason*: the
canary holds and says why, it never passes on missing data. At configuration time a PromQL
query Prometheus refuses as written is a 422 (the canary does not start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from cloud_serving.errors import InvalidReleaseError
from shared.gates import Comparator, Condition


class ProviderError(Exception):
    """A provider could not give one number now (the reason is what the canary reports)."""


@dataclass(frozen=True)
class ProviderCondition:
    """``name`` is the metric the gate sees; ``comparator`` and ``threshold`` judge it."""

    name: str
    provider: Literal["prometheus", "http"]
    comparator: Comparator
    threshold: float
    url: str  # Prometheus's base URL, or the JSON endpoint
    query: str = ""  # PromQL (prometheus)
    field: str = ""  # dotted path into the JSON answer (http), e.g. "model.accuracy" or "items.0.v"
    timeout_s: float = 5.0

    def condition(self) -> Condition:
        return Condition(self.name, self.comparator, self.threshold, min_samples=1)

    def read(self, client: httpx.Client) -> float:
        """One reading, or a `ProviderError` saying why there is none."""
        try:
            if self.provider == "prometheus":
                r = client.get(
                    self.url.rstrip("/") + "/api/v1/query",
                    params={"query": self.query},
                    timeout=self.timeout_s,
                )
                return _prometheus_value(self.query, r)
            r = client.get(self.url, timeout=self.timeout_s)
        except httpx.TimeoutException as exc:
            raise ProviderError(
                f"{self.provider} at {self.url}: no answer within {self.timeout_s:g} s"
            ) from exc
        except httpx.HTTPError as exc:
            raise ProviderError(f"{self.provider} at {self.url}: {type(exc).__name__}: {exc}") from exc
        if r.status_code >= 400:
            raise ProviderError(f"{self.url}: HTTP {r.status_code}")
        try:
            return _number(_dig(r.json(), self.field), self.field)
        except ValueError as exc:
            raise ProviderError(f"{self.url}: {exc}") from exc


def _prometheus_value(query: str, r: httpx.Response) -> float:
    try:
        body = r.json()
    except ValueError as exc:
        raise ProviderError(f"prometheus: HTTP {r.status_code}, not JSON") from exc
    if body.get("status") != "success":
        raise ProviderError(f"prometheus refused {query!r}: {body.get('errorType')}: {body.get('error')}")
    data = body.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar" and isinstance(result, list) and len(result) == 2:
        return _number(result[1], "scalar")
    if kind != "vector":
        raise ProviderError(
            f"prometheus: {query!r} gives a {kind}; a gate reads one number (an instant vector)"
        )
    if not isinstance(result, list) or not result:
        raise ProviderError(f"prometheus: {query!r} has no data yet")
    if len(result) > 1:
        raise ProviderError(f"prometheus: {query!r} gives {len(result)} series; aggregate it (sum, max, ...)")
    return _number(result[0]["value"][1], "value")


def _dig(value: Any, path: str) -> Any:
    for part in [p for p in path.split(".") if p]:
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise ValueError(f"no field {path!r} in the answer (stopped at {part!r})")
    return value


def _number(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is {value!r}, not a number") from exc
    if not math.isfinite(number):
        raise ValueError(f"{what} is {value!r}, not a finite number")
    return number


def check(conditions: tuple[ProviderCondition, ...], client: httpx.Client) -> None:
    """At configuration time: names unique, and every PromQL query one Prometheus accepts as
    written (a syntax error is a 422 now; an unreachable Prometheus is pending later)."""
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise InvalidReleaseError(f"provider conditions need distinct names: {names}")
    for c in conditions:
        if c.provider == "prometheus" and not c.query.strip():
            raise InvalidReleaseError(f"provider condition {c.name}: a prometheus query is needed")
        if c.provider == "http" and not c.field:
            raise InvalidReleaseError(f"provider condition {c.name}: an http provider names a JSON field")
        if c.provider != "prometheus":
            continue
        try:
            r = client.get(
                c.url.rstrip("/") + "/api/v1/query", params={"query": c.query}, timeout=c.timeout_s
            )
        except httpx.HTTPError:
            continue  # not reachable now: the canary holds with the reason until it is
        if r.status_code == 400:
            try:
                error = r.json().get("error")
            except ValueError:
                error = r.text[:200]
            raise InvalidReleaseError(f"provider condition {c.name}: prometheus refuses {c.query!r}: {error}")
