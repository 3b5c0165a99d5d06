"""MLOps KPIs over mitigations, the same arithmetic for fleet campaigns and gateway releases.

A *mitigation* is a defective release stopped by the system (gates or alerts, not an
operator): exposure began when the release first reached a device or a caller, and it was
mitigated when the stop was decided. It *escaped* when the release had gone past its first
step (wave or canary step) before the stop. Defect escape rate = escaped / mitigations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Mitigation:
    subject: str  # a campaign id, or "model:version" on the gateway
    by: str  # scheduler | alerts | gates
    reason: str
    exposed_at: datetime
    mitigated_at: datetime
    exposed: int  # devices that had installed it, or requests the candidate answered
    escaped: bool

    @property
    def seconds(self) -> float:
        return (self.mitigated_at - self.exposed_at).total_seconds()


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarise(mitigations: list[Mitigation]) -> dict[str, Any]:
    secs = [m.seconds for m in mitigations]
    n = len(mitigations)
    return {
        "mitigations": n,
        "time_to_mitigation_s": {
            "p50": _quantile(secs, 0.5),
            "p90": _quantile(secs, 0.9),
            "max": max(secs, default=None),
        },
        "defect_escape_rate": sum(m.escaped for m in mitigations) / n if n else None,
        "exposed_mean": sum(m.exposed for m in mitigations) / n if n else None,
        "mitigated": [{**asdict(m), "seconds": m.seconds} for m in mitigations],
    }
