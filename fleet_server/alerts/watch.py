"""Score drift during a campaign: the top-class score distribution of the devices a campaign
has updated, against the devices of its cohort that still run what they ran before.

Devices report a histogram of their active model's top-class scores in each beacon
(`shared.telemetry.InferenceStats.score_histogram`). For each running campaign the watch
sums the latest histograms of both groups and computes their PSI; an `above` rule
(`shared.alerts`) on that value pauses the campaign when it fires (the same transition an
operator's pause makes, recorded as the alerts' decision) and notifies the webhooks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.campaigns import service
from fleet_server.campaigns.models import Campaign
from fleet_server.devices.models import Device
from fleet_server.jobs.models import JobExecution
from shared.alerts import AlertEvent, AlertRule, AlertState, Severity, ValueSample, step
from shared.drift.stats import psi_counts
from shared.telemetry import SCORE_BINS

log = logging.getLogger("tidegate.server.alerts")


@dataclass(frozen=True)
class DriftWatchConfig:
    psi_threshold: float = 0.25
    min_scores: int = 200  # answers needed in each group before the PSI means anything
    for_s: float = 0.0


@dataclass
class _Watched:
    state: AlertState = field(default_factory=AlertState)
    samples: list[ValueSample] = field(default_factory=list)


def score_groups(session: Session, campaign: Campaign) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(not yet updated, updated): summed score histograms of the campaign's members."""
    updated = set(
        session.scalars(
            select(JobExecution.thing_name).where(
                JobExecution.campaign_id == campaign.id, JobExecution.status == "SUCCEEDED"
            )
        )
    )
    before, after = np.zeros(SCORE_BINS), np.zeros(SCORE_BINS)
    for beacon_owner, beacon in session.execute(
        select(Device.thing_name, Device.last_beacon).where(Device.thing_name.in_(campaign.members))
    ):
        hist = ((beacon or {}).get("inference") or {}).get("score_histogram") or []
        if len(hist) == SCORE_BINS:
            (after if beacon_owner in updated else before)[:] += np.asarray(hist, dtype=np.float64)
    return before, after


class DriftWatch:
    def __init__(self, config: DriftWatchConfig = DriftWatchConfig()) -> None:
        self.config = config
        self.rule = AlertRule(
            "score-drift",
            "above",
            Severity.CRITICAL,
            threshold=config.psi_threshold,
            window_s=1e9,  # the latest reading decides (the histograms are cumulative already)
            for_s=config.for_s,
            min_samples=1,
            action="pause",
        )
        self._watched: dict[str, _Watched] = {}
        self.last_psi: dict[str, float] = {}  # running campaigns' latest PSI (for /metrics)

    def check(self, session: Session, now: datetime) -> list[tuple[str, AlertEvent]]:
        """One pass over the running campaigns; (campaign id, event) for each transition. A
        firing rule pauses its campaign in this session's transaction."""
        events: list[tuple[str, AlertEvent]] = []
        running = session.scalars(select(Campaign).where(Campaign.state == "running")).all()
        self.last_psi = {cid: v for cid, v in self.last_psi.items() if cid in {c.id for c in running}}
        for c in running:
            before, after = score_groups(session, c)
            w = self._watched.setdefault(c.id, _Watched())
            if before.sum() < self.config.min_scores or after.sum() < self.config.min_scores:
                continue
            value = psi_counts(before, after)
            self.last_psi[c.id] = value
            w.samples = [ValueSample(now, value)]
            event = step(self.rule, w.samples, now, w.state)
            if event is None:
                continue
            if event.status == "firing":
                reason = (
                    f"alert score-drift: PSI {value:.3f} ≥ {self.config.psi_threshold:g} between the "
                    f"{int(after.sum())} answers of updated devices and {int(before.sum())} of the others"
                )
                service.pause(session, campaign_id=c.id, actor="alerts", now=now, reason=reason)
                log.warning("campaign %s paused: %s", c.id, reason)
            events.append((c.id, event))
        return events
