from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.db import Base, UTCDateTime


class TelemetryRecord(Base):
    """One beacon or receipt. (thing, kind, seq) is unique, so QoS 1 redeliveries store once."""

    __tablename__ = "telemetry"
    __table_args__ = (UniqueConstraint("thing_name", "kind", "seq", name="uq_telemetry_thing_kind_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    thing_name: Mapped[str] = mapped_column(String(128), ForeignKey("devices.thing_name"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    seq: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
