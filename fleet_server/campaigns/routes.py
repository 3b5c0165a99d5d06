"""/api/v1/campaigns — thin: validate, call the service in one transaction, audit, answer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.auth.deps import Principal, require
from fleet_server.auth.service import Role, audit
from fleet_server.campaigns import service
from fleet_server.campaigns.models import Campaign, CampaignDecision
from fleet_server.campaigns.planner import wave_bounds
from fleet_server.campaigns.spec import CampaignSpec
from fleet_server.jobs.models import JobExecution
from fleet_server.jobs.protocol import Outgoing
from fleet_server.paging import known_filters

router = APIRouter(prefix="/api/v1/campaigns", tags=["campaigns"])
CampaignId = Annotated[str, PathParam(min_length=1, max_length=64)]
Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]


class WaveCounts(BaseModel):
    index: int
    size: int
    counts: dict[str, int]


class CampaignPublic(BaseModel):
    id: str
    name: str
    state: str
    wave: int
    waves: list[WaveCounts]
    regions: dict[str, dict[str, int]]
    errors: dict[str, int]
    counts_at: datetime = Field(
        description="when the counts were taken: a running campaign's at its last scheduler tick "
        "(every few seconds), any other's at the request"
    )
    paused_reason: str | None
    created_by: str
    approved_by: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict[str, Any]


class DecisionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    at: datetime
    kind: str
    actor: str
    message: str


class PauseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="paused by operator", min_length=1, max_length=1000)


class ApproveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    override_reason: str | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="Start without a passing bench report, and say why.",
    )


class CancelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    force: bool = False


def present(s: Session, c: Campaign, now: datetime, *, live: bool = False) -> CampaignPublic:
    """`live`: count now (after an operator's action), not the running campaign's last view."""
    body, counts_at = (service.count_view(s, c), now) if live else service.view(s, c, now)
    return CampaignPublic(
        id=c.id,
        name=c.name,
        state=c.state,
        wave=c.wave,
        waves=[WaveCounts(**w) for w in body["waves"]],
        regions=body["regions"],
        errors=body["errors"],
        counts_at=counts_at,
        paused_reason=c.paused_reason,
        created_by=c.created_by,
        approved_by=c.approved_by,
        created_at=c.created_at,
        started_at=c.started_at,
        finished_at=c.finished_at,
        spec=c.spec,
    )


def _act(
    request: Request,
    who: Principal,
    action: str,
    campaign_id: str | None,
    fn: Callable[[Session, datetime], Any],
) -> CampaignPublic:
    now = request.app.state.clock()
    out: list[Outgoing] = []
    try:
        with request.app.state.db.session() as s:
            result = fn(s, now)
            if isinstance(result, list):
                out = result
            cid = campaign_id or (result.id if isinstance(result, Campaign) else None)
            audit(s, actor=who.name, role=who.role.value, action=action, target=cid, outcome="ok", now=now)
            s.flush()
            answer = present(s, service.get(s, cid or ""), now, live=True)
    except service.CampaignNotFoundError:
        raise  # nothing to audit: there is no campaign (the error handler answers 404)
    except service.CampaignError as exc:
        with request.app.state.db.session() as s:
            audit(
                s,
                actor=who.name,
                role=who.role.value,
                action=action,
                target=campaign_id,
                outcome=f"refused: {exc}",
                now=now,
            )
        raise
    request.app.state.publish(out)
    return answer


@router.get(
    "",
    response_model=list[CampaignPublic],
    dependencies=[known_filters("state", "name", "created_by", "before", "limit")],
)
def list_campaigns(
    request: Request,
    who: Viewer,
    state: Annotated[str | None, Query(max_length=32)] = None,
    name: Annotated[str | None, Query(max_length=256, description="names containing this")] = None,
    created_by: Annotated[str | None, Query(max_length=128)] = None,
    before: Annotated[
        str | None, Query(max_length=64, description="cursor: the last campaign id seen")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> list[CampaignPublic]:
    """Campaigns, newest first, filtered; page with `before` (the last id of the previous page)."""
    with request.app.state.db.session() as s:
        q = select(Campaign).order_by(Campaign.created_at.desc(), Campaign.id.desc()).limit(limit)
        if state:
            q = q.where(Campaign.state == state)
        if name:
            q = q.where(Campaign.name.contains(name, autoescape=True))
        if created_by:
            q = q.where(Campaign.created_by == created_by)
        if before is not None:
            last = service.get(s, before)  # a 404 for a cursor that names no campaign
            q = q.where(
                (Campaign.created_at < last.created_at)
                | ((Campaign.created_at == last.created_at) & (Campaign.id < last.id))
            )
        now = request.app.state.clock()
        return [present(s, c, now) for c in s.scalars(q).all()]


@router.post("", response_model=CampaignPublic, status_code=201)
def create_campaign(request: Request, body: CampaignSpec, who: Operator) -> CampaignPublic:
    return _act(
        request,
        who,
        "campaign.create",
        None,
        lambda s, now: service.create(s, spec=body, actor=who.name, now=now),
    )


class PreviewPublic(BaseModel):
    cohort: int
    waves: list[int]  # devices per wave, in order


@router.post("/preview", response_model=PreviewPublic)
def preview(request: Request, body: CampaignSpec, who: Viewer) -> PreviewPublic:
    """What a spec would do before it is created: it validates as `POST` would, and answers
    how many devices the cohort holds now and how many each wave would notify."""
    with request.app.state.db.session() as s:
        members = service.cohort_things(s, body.cohort)
    bounds, start, sizes = wave_bounds(body, len(members)), 0, []
    for end in bounds:
        sizes.append(end - start)
        start = end
    return PreviewPublic(cohort=len(members), waves=sizes)


@router.get("/kpis")
def kpis(request: Request, who: Viewer) -> dict[str, Any]:
    """Time to mitigation and defect escape rate over every campaign the system stopped."""
    from fleet_server.campaigns.kpis import load
    from shared.kpis import summarise

    with request.app.state.db.session() as s:
        return summarise(load(s))


@router.get("/{campaign_id}", response_model=CampaignPublic)
def get_campaign(request: Request, campaign_id: CampaignId, who: Viewer) -> CampaignPublic:
    with request.app.state.db.session() as s:
        return present(s, service.get(s, campaign_id), request.app.state.clock())


@router.get("/{campaign_id}/drift", response_model=None)
def drift(
    request: Request,
    campaign_id: CampaignId,
    who: Viewer,
    format: Annotated[Literal["json", "html"], Query()] = "json",
) -> dict[str, Any] | HTMLResponse:
    """The campaign's score drift, updated devices against the rest of the cohort, overall and
    per region and SKU: what the drift watch pauses on (JSON, or the drift report's HTML page)."""
    from dataclasses import asdict

    from fleet_server.alerts.watch import DriftWatchConfig, campaign_report, score_groups
    from shared.drift.report import page

    config = getattr(request.app.state, "drift", None) or DriftWatchConfig()
    with request.app.state.db.session() as s:
        report = campaign_report(score_groups(s, service.get(s, campaign_id)), config)
    return HTMLResponse(page(report)) if format == "html" else asdict(report)


@router.get("/{campaign_id}/cohorts/{kind}")
def cohort(
    request: Request,
    campaign_id: CampaignId,
    kind: Literal["failure", "drift"],
    who: Viewer,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
) -> dict[str, Any]:
    """A feedback cohort for the next training loop: the members the campaign failed on, or
    the updated members of drifted slices, with descriptors, telemetry and the query that
    selects them again."""
    from fleet_server.alerts.cohorts import export
    from fleet_server.alerts.watch import DriftWatchConfig

    config = getattr(request.app.state, "drift", None) or DriftWatchConfig()
    with request.app.state.db.session() as s:
        return export(s, service.get(s, campaign_id), kind, config, limit)


class ProgressPoint(BaseModel):
    at: datetime
    wave: int
    region: str
    finished: int  # executions of this wave and region finished (any terminal status) by `at`
    succeeded: int


@router.get("/{campaign_id}/progress", response_model=list[ProgressPoint])
def progress(request: Request, campaign_id: CampaignId, who: Viewer) -> list[ProgressPoint]:
    """Per-wave and per-region progress over time (cumulative, one point per execution that
    finished, in order): what the dashboard charts."""
    from fleet_server.devices.models import Device

    terminal = ("SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "CANCELED", "REMOVED")
    with request.app.state.db.session() as s:
        service.get(s, campaign_id)  # a 404 if there is none
        rows = s.execute(
            select(JobExecution.last_updated_at, JobExecution.wave, Device.region, JobExecution.status)
            .join(Device, Device.thing_name == JobExecution.thing_name)
            .where(JobExecution.job_id == campaign_id, JobExecution.status.in_(terminal))
            .order_by(JobExecution.last_updated_at)
        ).all()
    done: Counter[tuple[int, str]] = Counter()
    ok: Counter[tuple[int, str]] = Counter()
    out = []
    for at, wave, region, status in rows:
        key = (wave or 0, region or "unknown")
        done[key] += 1
        ok[key] += status == "SUCCEEDED"
        out.append(ProgressPoint(at=at, wave=key[0], region=key[1], finished=done[key], succeeded=ok[key]))
    return out


@router.get("/{campaign_id}/decisions", response_model=list[DecisionPublic])
def decisions(request: Request, campaign_id: CampaignId, who: Viewer) -> list[CampaignDecision]:
    with request.app.state.db.session() as s:
        service.get(s, campaign_id)  # a 404 if there is none
        return list(
            s.scalars(
                select(CampaignDecision)
                .where(CampaignDecision.campaign_id == campaign_id)
                .order_by(CampaignDecision.id)
            ).all()
        )


@router.post("/{campaign_id}/submit", response_model=CampaignPublic)
def submit(request: Request, campaign_id: CampaignId, who: Operator) -> CampaignPublic:
    return _act(
        request,
        who,
        "campaign.submit",
        campaign_id,
        lambda s, now: service.submit(s, campaign_id=campaign_id, actor=who.name, now=now),
    )


@router.post("/{campaign_id}/approve", response_model=CampaignPublic)
def approve(
    request: Request, campaign_id: CampaignId, who: Admin, body: ApproveBody | None = None
) -> CampaignPublic:
    reason = (body or ApproveBody()).override_reason
    return _act(
        request,
        who,
        "campaign.approve",
        campaign_id,
        lambda s, now: service.approve(
            s, campaign_id=campaign_id, actor=who.name, now=now, override_reason=reason
        ),
    )


@router.post("/{campaign_id}/pause", response_model=CampaignPublic)
def pause(
    request: Request, campaign_id: CampaignId, who: Operator, body: PauseBody | None = None
) -> CampaignPublic:
    reason = (body or PauseBody()).reason
    return _act(
        request,
        who,
        "campaign.pause",
        campaign_id,
        lambda s, now: service.pause(s, campaign_id=campaign_id, actor=who.name, now=now, reason=reason),
    )


@router.post("/{campaign_id}/resume", response_model=CampaignPublic)
def resume(request: Request, campaign_id: CampaignId, who: Operator) -> CampaignPublic:
    return _act(
        request,
        who,
        "campaign.resume",
        campaign_id,
        lambda s, now: service.resume(s, campaign_id=campaign_id, actor=who.name, now=now),
    )


@router.post("/{campaign_id}/next-wave", response_model=CampaignPublic)
def next_wave(request: Request, campaign_id: CampaignId, who: Operator) -> CampaignPublic:
    return _act(
        request,
        who,
        "campaign.next_wave",
        campaign_id,
        lambda s, now: service.next_wave(s, campaign_id=campaign_id, actor=who.name, now=now),
    )


@router.post("/{campaign_id}/cancel", response_model=CampaignPublic)
def cancel(
    request: Request, campaign_id: CampaignId, who: Operator, body: CancelBody | None = None
) -> CampaignPublic:
    force = (body or CancelBody()).force
    return _act(
        request,
        who,
        "campaign.cancel",
        campaign_id,
        lambda s, now: service.cancel(s, campaign_id=campaign_id, actor=who.name, now=now, force=force),
    )


@router.post("/{campaign_id}/retry-failed", response_model=CampaignPublic, status_code=201)
def retry_failed(request: Request, campaign_id: CampaignId, who: Operator) -> CampaignPublic:
    """A new draft campaign over this campaign's failed devices (it needs approval like any)."""
    return _act(
        request,
        who,
        "campaign.retry_failed",
        None,
        lambda s, now: service.retry_failed(s, campaign_id=campaign_id, actor=who.name, now=now),
    )
