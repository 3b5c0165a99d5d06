from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.db import Base, UTCDateTime


class Device(Base):
    __tablename__ = "devices"

    thing_name: Mapped[str] = mapped_column(String(128), primary_key=True)
    sku: Mapped[str] = mapped_column(String(64), index=True)
    region: Mapped[str | None] = mapped_column(String(64), index=True)
    customer: Mapped[str | None] = mapped_column(String(128))
    regulatory_domain: Mapped[str | None] = mapped_column(String(64))
    firmware: Mapped[str | None] = mapped_column(String(64))
    agent_version: Mapped[str | None] = mapped_column(String(64))
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    active_version: Mapped[str | None] = mapped_column(String(64))
    last_beacon: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class DeviceGroup(Base):
    """A static group: a named list of devices an operator maintains by hand (AWS thing groups,
    hawkBit target tags), as opposed to a cohort, which is a filter evaluated when used."""

    __tablename__ = "device_groups"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    description: Mapped[str] = mapped_column(String(1024), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class GroupMember(Base):
    __tablename__ = "device_group_members"

    group_name: Mapped[str] = mapped_column(
        ForeignKey("device_groups.name", ondelete="CASCADE"), primary_key=True
    )
    thing_name: Mapped[str] = mapped_column(ForeignKey("devices.thing_name"), primary_key=True, index=True)
