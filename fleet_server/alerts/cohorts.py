"""Feedback cohorts from the fleet: the devices a campaign went wrong on, exported with what a
data scientist needs to pull their data into the next training loop.

* `failure`: members whose latest execution ended FAILED, TIMED_OUT or REJECTED — the
  agent's reason and phase (self-test failed, SKU refused, …), the wave, and the device's
  descriptors and last telemetry (inference counts and latency, OOD count, temperatures);
* `drift`: updated members in a slice (region or SKU) whose score distribution drifted from
  the rest of the cohort, each with its own score histogram and the slice's reference.

Each export carries the query that selects the same devices again (the SQL over the
server's tables, with the campaign as a bound parameter, and the API call), so the set can
be refreshed or widened without this server's help.
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.alerts.watch import DriftWatchConfig, campaign_report, score_groups
from fleet_server.campaigns.models import Campaign
from fleet_server.devices.models import Device
from fleet_server.jobs.models import JobExecution

CohortKind = Literal["failure", "drift"]
FAILED = ("FAILED", "TIMED_OUT", "REJECTED")

FAILURE_SQL = (
    "SELECT e.thing_name, e.status, e.status_details, e.wave, d.sku, d.region, d.firmware, "
    "d.agent_version, d.active_version, d.last_beacon FROM job_executions e "
    "JOIN devices d ON d.thing_name = e.thing_name WHERE e.campaign_id = :campaign "
    "AND e.status IN ('FAILED', 'TIMED_OUT', 'REJECTED')"
)
DRIFT_SQL = (
    "SELECT d.thing_name, d.sku, d.region, d.active_version, d.last_beacon FROM devices d "
    "JOIN job_executions e ON e.thing_name = d.thing_name WHERE e.campaign_id = :campaign "
    "AND e.status = 'SUCCEEDED' AND (d.region = :region OR d.sku = :sku)"
)


def _descriptors(d: Device) -> dict[str, Any]:
    beacon = d.last_beacon or {}
    return {
        "sku": d.sku,
        "region": d.region,
        "firmware": d.firmware,
        "agent_version": d.agent_version,
        "active_version": d.active_version,
        "attributes": d.attributes,
        "last_seen_at": d.last_seen_at.isoformat() if d.last_seen_at else None,
        "telemetry": {
            "inference": beacon.get("inference"),
            "temperatures_c": beacon.get("temperatures_c"),
            "throttle_level": beacon.get("throttle_level"),
        },
    }


def export(
    session: Session, campaign: Campaign, kind: CohortKind, config: DriftWatchConfig, limit: int
) -> dict[str, Any]:
    members = set(campaign.members)
    devices = {
        d.thing_name: d
        for d in session.scalars(select(Device).where(Device.sku == campaign.spec["cohort"]["sku"]))
        if d.thing_name in members
    }
    items: list[dict[str, Any]] = []
    query: dict[str, Any]
    if kind == "failure":
        latest: dict[str, JobExecution] = {}
        for e in session.scalars(
            select(JobExecution)
            .where(JobExecution.campaign_id == campaign.id)
            .order_by(JobExecution.execution_number)
        ):
            latest[e.thing_name] = e  # retries: the last execution decides
        failed = [e for e in latest.values() if e.status in FAILED]
        for e in sorted(failed, key=lambda e: e.thing_name)[:limit]:
            d = devices.get(e.thing_name)
            items.append(
                {
                    "thing_name": e.thing_name,
                    "status": e.status,
                    "status_details": e.status_details,
                    "wave": e.wave,
                    "execution_number": e.execution_number,
                    "descriptors": _descriptors(d) if d is not None else None,
                }
            )
        query = {"sql": FAILURE_SQL, "params": {"campaign": campaign.id}}
        seen = len(failed)
    else:
        report = campaign_report(score_groups(session, campaign), config)
        drifted = [s for s in report.slices if any(f.drifted for f in s.features)]
        updated = set(
            session.scalars(
                select(JobExecution.thing_name).where(
                    JobExecution.campaign_id == campaign.id, JobExecution.status == "SUCCEEDED"
                )
            )
        )
        chosen: dict[str, list[str]] = {}
        for s in drifted:
            key, _, value = s.slice.partition("=")
            for thing in sorted(updated):
                d = devices.get(thing)
                if d is not None and ((d.region or "-") if key == "region" else d.sku) == value:
                    chosen.setdefault(thing, []).append(s.slice)
        for thing, slices in sorted(chosen.items())[:limit]:
            d = devices[thing]
            items.append({"thing_name": thing, "slices": slices, "descriptors": _descriptors(d)})
        query = {
            "sql": DRIFT_SQL,
            "params": {"campaign": campaign.id},
            "slices": [
                {"slice": s.slice, "psi": s.features[0].psi, "reference_answers": s.reference_rows}
                for s in drifted
            ],
        }
        seen = len(chosen)
    return {
        "campaign": campaign.id,
        "kind": kind,
        "seen": seen,
        "kept": len(items),
        "query": {**query, "api": f"/api/v1/campaigns/{campaign.id}/cohorts/{kind}"},
        "items": items,
    }
