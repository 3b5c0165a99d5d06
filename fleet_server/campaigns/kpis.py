"""MLOps KPIs from the fleet's event log (`shared.kpis` does the arithmetic).

A campaign's mitigation is its first stop or pause by the scheduler's gates or the alerts;
exposure began when the first device of the campaign finished an execution; the defect
escaped when a device of a later wave than the first had installed the release before the
stop. The loader reads decisions and executions in one pass each.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.campaigns.models import CampaignDecision
from fleet_server.jobs.models import JobExecution
from shared.kpis import Mitigation

SYSTEM_ACTORS = {"scheduler", "alerts"}
STOP_KINDS = {"paused", "stopped", "failed", "cancelled"}
FINISHED = {"SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "CANCELED", "REMOVED"}


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
                subject=cid,
                by=d.actor,
                reason=d.message,
                exposed_at=min(f[0] for f in before),
                mitigated_at=d.at,
                exposed=len(installed),
                escaped=any((f[2] or 0) >= 1 for f in installed),
            )
        )
    return out
