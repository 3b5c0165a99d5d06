"""Device registration and inventory. Keyword-only functions that run inside the caller's
transaction (the caller owns commit and rollback)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from fleet_server.devices.models import Device
from shared.iotjobs import valid_thing_name


def register_device(
    session: Session,
    *,
    thing_name: str,
    sku: str,
    now: datetime,
    region: str | None = None,
    customer: str | None = None,
    regulatory_domain: str | None = None,
    firmware: str | None = None,
    agent_version: str | None = None,
    attributes: dict[str, Any] | None = None,
) -> Device:
    """Register a device, or update the inventory of one already registered."""
    if not valid_thing_name(thing_name):
        raise ValueError(f"invalid thing name {thing_name!r}: 1-128 of [a-zA-Z0-9:_-]")
    device = session.get(Device, thing_name)
    if device is None:
        device = Device(thing_name=thing_name, sku=sku, registered_at=now, attributes={})
        session.add(device)
    device.sku = sku
    device.region, device.customer, device.regulatory_domain = region, customer, regulatory_domain
    device.firmware, device.agent_version = firmware, agent_version
    device.attributes = dict(attributes or {})
    return device
