from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.db import Base, UTCDateTime


class JobExecution(Base):
    """One device's execution of one job, with AWS IoT Jobs' states and version numbers."""

    __tablename__ = "job_executions"
    __table_args__ = (
        UniqueConstraint("job_id", "thing_name", name="uq_execution_job_thing"),
        Index("ix_execution_thing_status", "thing_name", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    thing_name: Mapped[str] = mapped_column(String(128), ForeignKey("devices.thing_name"))
    campaign_id: Mapped[str | None] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16))
    status_details: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    version_number: Mapped[int] = mapped_column(Integer, default=1)
    execution_number: Mapped[int] = mapped_column(Integer, default=1)
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    step_timeout_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    in_progress_timeout_min: Mapped[int | None] = mapped_column(Integer)
    last_notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    wave: Mapped[int | None] = mapped_column(Integer)  # the campaign wave that queued it

    # Optimistic concurrency in the database too: an UPDATE that finds another writer moved
    # the version on (the sweeper timing it out while a batch of device updates ran) fails
    # with StaleDataError and is redone, instead of silently overwriting that transition.
    __mapper_args__ = {  # noqa: RUF012 (SQLAlchemy reads it once, at class creation)
        "version_id_col": version_number,
        "version_id_generator": False,
    }


class ExecutionEvent(Base):
    """Every transition of every execution, in order: the audit trail campaigns are judged on."""

    __tablename__ = "execution_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    execution_id: Mapped[int] = mapped_column(ForeignKey("job_executions.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    details: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)


class JobsPartition(Base):
    """Which fleet-server replica handles the device traffic of one slice of the things
    (`fleet_server.jobs.partitions`): every replica hears every message, the owner of the
    thing's partition handles it. Rows are made by the migration, one per partition."""

    __tablename__ = "jobs_partitions"

    partition: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    owner: Mapped[str | None] = mapped_column(String(200))  # "<replica id>/<nonce>"
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class FleetReplica(Base):
    """A running fleet-server replica's heartbeat: the live count the partitions are shared by,
    and the check that refuses a second process with the same MQTT client id."""

    __tablename__ = "fleet_replicas"

    replica_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(32))
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The share of the last few seconds its jobs bridge spent handling messages (0..1).
    jobs_load: Mapped[float] = mapped_column(Float, server_default="0")
