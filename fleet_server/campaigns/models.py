from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.db import Base, UTCDateTime


class Campaign(Base):
    __tablename__ = "campaigns"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(32), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Seeded order, recorded at start. Deferred: tens of thousands of names that only the
    # scheduler's tick reads; the API's campaign view and lists do not load them.
    members: Mapped[list[str]] = mapped_column(JSON, default=list, deferred=True)
    wave: Mapped[int] = mapped_column(Integer, default=0)
    wave_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    advance_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    paused_reason: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(128))
    approved_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class CampaignDecision(Base):
    """The decision log: every planner action and operator action, with why."""

    __tablename__ = "campaign_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(128))
    message: Mapped[str] = mapped_column(Text)


class CampaignView(Base):
    """A running campaign's counts (per wave, per region, top errors) as its last tick took
    them (`service.refresh_view`): what the API and the dashboard read while it runs, so a
    poll costs one row instead of a count over every execution."""

    __tablename__ = "campaign_views"

    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id"), primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
