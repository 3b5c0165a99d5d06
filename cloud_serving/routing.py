"""Traffic assignment, pure: which version (or arm) serves a request.

Sticky by caller key: the key and a per-release salt hash to a point in [0, 1), and the
weights cut [0, 1) into consecutive ranges in a fixed (sorted) order. The same key stays on
the same version while weights grow (a canary's 1 → 5 → 25 % keeps its first 1 %), and a
new salt reshuffles callers for the next release. Requests without a key are spread by a
random draw with the same weights.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass

from shared.errors import TidegateError


class RoutingError(TidegateError, ValueError):
    """Weights that do not describe a split."""


def bucket(key: str, salt: str) -> float:
    """A stable point in [0, 1) for `key` under `salt`."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def normalise(weights: Mapping[str, float]) -> dict[str, float]:
    if not weights:
        raise RoutingError("no versions to route to")
    if any(w < 0 for w in weights.values()):
        raise RoutingError(f"negative weight in {dict(weights)}")
    total = sum(weights.values())
    if total <= 0:
        raise RoutingError(f"weights sum to {total}; at least one must be positive")
    return {k: w / total for k, w in weights.items() if w > 0}


@dataclass(frozen=True)
class Split:
    """Weights prepared once (normalised, ordered, cumulative), so each request costs one
    hash and one bisect: the gateway rebuilds it only when an operator changes the weights."""

    names: tuple[str, ...]
    edges: tuple[float, ...]

    @classmethod
    def of(cls, weights: Mapping[str, float], order: list[str] | None = None) -> Split:
        split = normalise(weights)
        first = [n for n in (order or []) if n in split]
        names = first + sorted(n for n in split if n not in first)
        edges, edge = [], 0.0
        for name in names:
            edge += split[name]
            edges.append(edge)
        edges[-1] = 1.0  # rounding
        return cls(tuple(names), tuple(edges))

    def pick(self, *, key: str | None, salt: str, rng: random.Random | None = None) -> str:
        if len(self.names) == 1:
            return self.names[0]
        point = bucket(key, salt) if key is not None else (rng or random).random()
        return self.names[min(bisect.bisect_right(self.edges, point), len(self.names) - 1)]


def choose(
    weights: Mapping[str, float],
    *,
    key: str | None,
    salt: str,
    rng: random.Random | None = None,
    order: list[str] | None = None,
) -> str:
    """The version for this request. `order` fixes the ranges (default: the candidate
    last, i.e. sorted keys with any name in `order` first), so growing a canary moves only
    callers from production to the candidate, never back and forth."""
    return Split.of(weights, order).pick(key=key, salt=salt, rng=rng)
