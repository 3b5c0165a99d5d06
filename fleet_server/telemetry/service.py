"""Store what devices report. Invalid or spoofed messages (a payload naming another device
than its topic) are refused with a reason, never stored."""

from __future__ import annotations

import json
from datetime import datetime

from pydantic import ValidationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from fleet_server.devices.models import Device
from fleet_server.telemetry.models import TelemetryRecord
from shared.telemetry import DeviceLog, HealthBeacon, InstallReceipt

HISTORY = 200  # beacons kept per device; receipts are all kept


class TelemetryRejectedError(ValueError):
    pass


MODELS: dict[str, type[HealthBeacon] | type[InstallReceipt] | type[DeviceLog]] = {
    "beacon": HealthBeacon,
    "receipt": InstallReceipt,
    "log": DeviceLog,  # uploaded for a tidegate.log-pull job
}


def ingest(session: Session, topic: str, payload: bytes, now: datetime) -> str:
    """Store one message from ``tidegate/things/<thing>/<beacon|receipt|log>``; returns what was done."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "tidegate" or parts[1] != "things" or parts[3] not in MODELS:
        raise TelemetryRejectedError(f"not a telemetry topic: {topic}")
    thing, kind = parts[2], parts[3]
    try:
        raw = json.loads(payload)
        msg: HealthBeacon | InstallReceipt | DeviceLog = MODELS[kind].model_validate(raw)
    except (ValueError, ValidationError) as exc:
        raise TelemetryRejectedError(f"{kind} from {thing}: {str(exc).splitlines()[0]}") from exc
    if msg.device_id != thing:
        raise TelemetryRejectedError(f"{kind} on {thing}'s topic names device {msg.device_id}")
    device = session.get(Device, thing)
    if device is None:
        raise TelemetryRejectedError(f"{kind} from unregistered device {thing}")
    exists = session.scalars(
        select(TelemetryRecord.id).where(
            TelemetryRecord.thing_name == thing, TelemetryRecord.kind == kind, TelemetryRecord.seq == msg.seq
        )
    ).first()
    if exists is not None:
        return "duplicate"
    session.add(
        TelemetryRecord(
            thing_name=thing,
            kind=kind,
            seq=msg.seq,
            at=msg.at,
            received_at=now,
            payload=msg.model_dump(mode="json"),
        )
    )
    device.last_seen_at = now
    if isinstance(msg, HealthBeacon):
        device.last_beacon = msg.model_dump(mode="json")
        device.active_version = msg.active_version
        device.agent_version = msg.agent_version
        session.flush()
        keep = (
            select(TelemetryRecord.id)
            .where(TelemetryRecord.thing_name == thing, TelemetryRecord.kind == "beacon")
            .order_by(TelemetryRecord.seq.desc())
            .limit(HISTORY)
        )
        session.execute(
            delete(TelemetryRecord).where(
                TelemetryRecord.thing_name == thing,
                TelemetryRecord.kind == "beacon",
                TelemetryRecord.id.not_in(keep.scalar_subquery()),
            )
        )
    return "stored"
