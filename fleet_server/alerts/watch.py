"""Score drift during a campaign: the top-class score distribution of the devices a campaign
has updated, against the devices of its cohort that still run what they ran before — over
the whole cohort and per slice (each region, each SKU).

Devices report a histogram of their active model's top-class scores in each beacon
(`shared.telemetry.InferenceStats.score_histogram`). The scheduler runs the watch every few
seconds: for each running campaign it sums the latest histograms of both groups, overall and
per slice, and computes PSI (and a chi-square p-value, reported); an `above` rule
(`shared.alerts`) on the largest PSI of a tested slice pauses the campaign when it fires (the
same transition an operator's pause makes, recorded as the alerts' decision) and notifies
the webhooks. `campaign_report` is the same computation as a `shared.drift` report (JSON, or
the drift job's HTML page) for `GET /api/v1/campaigns/{id}/drift`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
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
from shared.drift.job import DriftReport, FeatureDrift, SliceDrift
from shared.drift.stats import chi2_counts, psi_counts
from shared.telemetry import SCORE_BINS

log = logging.getLogger("tidegate.server.alerts")


@dataclass(frozen=True)
class DriftWatchConfig:
    psi_threshold: float = 0.25
    min_scores: int = 200  # answers needed on each side of a slice before its PSI means anything
    for_s: float = 0.0
    alpha: float = 0.01  # the report's chi-square p-values are read at alpha / tested slices
    interval_s: float = 10.0  # how often the scheduler runs the watch (histograms move slowly)


@dataclass
class _Watched:
    state: AlertState = field(default_factory=AlertState)
    samples: list[ValueSample] = field(default_factory=list)


Groups = dict[str, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]


def score_groups(session: Session, campaign: Campaign) -> Groups:
    """Slice → (not yet updated, updated): summed score histograms of the campaign's members;
    slice "all" is the whole cohort, then "region=…" and "sku=…"."""
    updated = set(
        session.scalars(
            select(JobExecution.thing_name).where(
                JobExecution.campaign_id == campaign.id, JobExecution.status == "SUCCEEDED"
            )
        )
    )
    groups: Groups = defaultdict(lambda: (np.zeros(SCORE_BINS), np.zeros(SCORE_BINS)))
    members = set(campaign.members)
    # One pass over the cohort's SKU (indexed) rather than an IN list of every member: a
    # campaign may have hundreds of thousands of them.
    for thing, sku, region, beacon in session.execute(
        select(Device.thing_name, Device.sku, Device.region, Device.last_beacon).where(
            Device.sku == campaign.spec["cohort"]["sku"], Device.last_beacon.is_not(None)
        )
    ):
        if thing not in members:
            continue
        hist = ((beacon or {}).get("inference") or {}).get("score_histogram") or []
        if len(hist) != SCORE_BINS:
            continue
        counts = np.asarray(hist, dtype=np.float64)
        side = 1 if thing in updated else 0
        for name in ("all", f"region={region or '-'}", f"sku={sku}"):
            groups[name][side][:] += counts
    return dict(groups)


def campaign_report(groups: Groups, config: DriftWatchConfig) -> DriftReport:
    """The groups as a drift report: one feature (the top-class score) per slice; a slice is
    tested when both sides have `min_scores` answers, and drifted at the PSI threshold."""
    tested = [n for n, (b, a) in groups.items() if min(b.sum(), a.sum()) >= config.min_scores]
    per_test = config.alpha / max(len(tested), 1)

    def one(name: str) -> SliceDrift:
        before, after = groups.get(name, (np.zeros(SCORE_BINS), np.zeros(SCORE_BINS)))
        s = SliceDrift(name, int(before.sum()), int(after.sum()), name in tested)
        if s.tested:
            stat, p = chi2_counts(before, after)
            value = psi_counts(before, after)
            s.features.append(
                FeatureDrift("top_score", "histogram", "chi2", stat, p, value, value >= config.psi_threshold)
            )
        return s

    overall = one("all")
    slices = [one(n) for n in sorted(groups) if n != "all"]
    reasons = [
        f"{s.slice}: score PSI {f.psi:.3f} ≥ {config.psi_threshold:g} between {s.current_rows} answers of "
        f"updated devices and {s.reference_rows} of the others"
        for s in [overall, *slices]
        for f in s.features
        if f.drifted
    ]
    return DriftReport(
        config={**asdict(config), "bins": SCORE_BINS, "reference": "devices not yet updated"},
        reference_rows=overall.reference_rows,
        current_rows=overall.current_rows,
        tests=len(tested),
        per_test_alpha=per_test,
        overall=overall,
        slices=slices,
        concept=None,
        calibration=None,
        alarm=bool(reasons),
        reasons=reasons,
    )


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
            report = campaign_report(score_groups(session, c), self.config)
            w = self._watched.setdefault(c.id, _Watched())
            readings = [(f.psi, s.slice) for s in [report.overall, *report.slices] for f in s.features]
            if not readings:
                continue
            value, where = max(readings)
            self.last_psi[c.id] = value
            w.samples = [ValueSample(now, value)]
            event = step(self.rule, w.samples, now, w.state)
            if event is None:
                continue
            if event.status == "firing":
                reason = f"alert score-drift: {'; '.join(report.reasons) or where}"
                service.pause(session, campaign_id=c.id, actor="alerts", now=now, reason=reason)
                log.warning("campaign %s paused: %s", c.id, reason)
            events.append((c.id, event))
        return events
