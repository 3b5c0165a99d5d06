"""MLOps KPIs from the event log: how fast defective rollouts were stopped, and how often a
defect got past a campaign's first wave.

A *mitigation* is a campaign stopped or paused by the system (the scheduler's gates or the
alerts, not an operator). For each:

* exposure began when the first device of the campaign finished an execution (the release
  was live on a device from then);
* time to mitigation = the stop decision's time − that start;
* the defect *escaped* when a device of a later wave than the first had installed the release
  before the stop.

Defect escape rate = escaped mitigations / mitigations. Pure arithmetic in `summarise`; the
loader reads decisions and executions in one pass each.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.campaigns.models import CampaignDecision
from fleet_server.jobs.models import JobExecution

SYSTEM_ACTORS = {"scheduler", "alerts"}
STOP_KINDS = {"paused", "stopped", "failed", "cancelled"}
FINISHED = {"SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "CANCELED", "REMOVED"}


@dataclass(frozen=True)
class Mitigation:
    campaign: str
    by: str
    reason: str
    exposed_at: datetime
    mitigated_at: datetime
    devices_exposed: int  # devices that had installed the release when it was stopped
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
    return {
        "mitigations": len(mitigations),
        "time_to_mitigation_s": {
            "p50": _quantile(secs, 0.5),
            "p90": _quantile(secs, 0.9),
            "max": max(secs, default=None),
        },
        "defect_escape_rate": sum(m.escaped for m in mitigations) / len(mitigations) if mitigations else None,
        "devices_exposed_mean": sum(m.devices_exposed for m in mitigations) / len(mitigations)
        if mitigations
        else None,
        "campaigns": [{**asdict(m), "seconds": m.seconds} for m in mitigations],
    }


def load(session: Session) -> list[Mitigation]:
    stops: dict[str, CampaignDecision] = {}
    for d in session.scalars(
        select(CampaignDecision)
        .where(CampaignDecision.actor.in_(SYSTEM_ACTORS), CampaignDecision.kind.in_(STOP_KINDS))
        .order_by(CampaignDecision.at)
    ):
        stops.setdefault(d.campaign_id, d)  # the first stop of each campaign
    if not stops:
        return []
    finished: dict[str, list[tuple[datetime, str, int | None]]] = {}
    for cid, at, status, wave in session.execute(
        select(
            JobExecution.campaign_id, JobExecution.last_updated_at, JobExecution.status, JobExecution.wave
        ).where(JobExecution.campaign_id.in_(list(stops)), JobExecution.status.in_(FINISHED))
    ):
        finished.setdefault(str(cid), []).append((at, status, wave))
    out = []
    for cid, d in stops.items():
        before = [f for f in finished.get(cid, []) if f[0] <= d.at]
        if not before:
            continue  # stopped before any device ran it: nothing was exposed
        installed = [f for f in before if f[1] == "SUCCEEDED"]
        out.append(
            Mitigation(
                campaign=cid,
                by=d.actor,
                reason=d.message,
                exposed_at=min(f[0] for f in before),
                mitigated_at=d.at,
                devices_exposed=len(installed),
                escaped=any((f[2] or 0) >= 1 for f in installed),
            )
        )
    return out
