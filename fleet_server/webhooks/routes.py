"""/api/v1/webhooks — subscriptions (admin), their delivery log, and a test delivery."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from fleet_server.auth.deps import Principal, require
from fleet_server.auth.service import Role, audit
from fleet_server.webhooks import service
from fleet_server.webhooks.models import WebhookDelivery, WebhookSubscription

router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"])
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
SubId = Annotated[int, PathParam(ge=1, le=2**31 - 1)]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=2048)
    events: list[str] = Field(
        min_length=1, max_length=32, description=f"any of {', '.join(service.EVENTS)}, or *"
    )
    description: str = Field(default="", max_length=1024)


class WebhookPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    url: str
    events: list[str]
    description: str
    active: bool
    created_at: datetime
    created_by: str


class WebhookCreated(WebhookPublic):
    secret: str  # shown once: the receiver verifies signatures with it


class DeliveryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    msg_id: str
    event: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    payload: dict[str, Any]


@router.post("", response_model=WebhookCreated, status_code=201)
def create(request: Request, body: WebhookCreate, who: Admin) -> WebhookCreated:
    now = request.app.state.clock()
    with request.app.state.db.session() as s:
        sub = service.subscribe(
            s, url=body.url, events=body.events, actor=who.name, now=now, description=body.description
        )
        audit(
            s,
            actor=who.name,
            role=who.role.value,
            action="webhook.create",
            target=sub.url,
            outcome="ok",
            now=now,
        )
        return WebhookCreated(**WebhookPublic.model_validate(sub).model_dump(), secret=sub.secret)


@router.get("", response_model=list[WebhookPublic])
def list_webhooks(request: Request, who: Admin) -> list[WebhookSubscription]:
    with request.app.state.db.session() as s:
        return list(s.scalars(select(WebhookSubscription).order_by(WebhookSubscription.id)).all())


@router.delete("/{subscription_id}", status_code=204)
def remove(request: Request, subscription_id: SubId, who: Admin) -> None:
    """Stop a subscription; its pending deliveries are given up, its log kept."""
    now = request.app.state.clock()
    with request.app.state.db.session() as s:
        sub = service.get(s, subscription_id)
        sub.active = False
        audit(
            s,
            actor=who.name,
            role=who.role.value,
            action="webhook.remove",
            target=sub.url,
            outcome="ok",
            now=now,
        )


@router.get("/{subscription_id}/deliveries", response_model=list[DeliveryPublic])
def deliveries(
    request: Request,
    subscription_id: SubId,
    who: Admin,
    status: Annotated[str | None, Query(pattern="^(pending|delivered|failed)$")] = None,
    before_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[WebhookDelivery]:
    """The delivery log, newest first: every event, its attempts and the last error."""
    with request.app.state.db.session() as s:
        service.get(s, subscription_id)
        q = (
            select(WebhookDelivery)
            .where(WebhookDelivery.subscription_id == subscription_id)
            .order_by(WebhookDelivery.id.desc())
            .limit(limit)
        )
        if status:
            q = q.where(WebhookDelivery.status == status)
        if before_id:
            q = q.where(WebhookDelivery.id < before_id)
        return list(s.scalars(q).all())


@router.post("/{subscription_id}/test", response_model=DeliveryPublic, status_code=202)
def test_delivery(request: Request, subscription_id: SubId, who: Admin) -> WebhookDelivery:
    """Queue a `webhook.test` event for this subscription alone (delivered within seconds)."""
    now = request.app.state.clock()
    with request.app.state.db.session() as s:
        sub = service.get(s, subscription_id)
        if not sub.active:
            raise service.WebhookError(f"webhook subscription {subscription_id} was removed")
        d = service.queue(s, sub, "webhook.test", {"by": who.name}, now)
        s.flush()
        return d
