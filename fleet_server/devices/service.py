"""Device registration and inventory. Keyword-only functions that run inside the caller's
transaction (the caller owns commit and rollback)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from fleet_server.devices.models import Device, DeviceGroup, GroupMember
from shared.errors import TidegateError
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
    return _apply(
        session,
        session.get(Device, thing_name),
        thing_name=thing_name,
        sku=sku,
        now=now,
        region=region,
        customer=customer,
        regulatory_domain=regulatory_domain,
        firmware=firmware,
        agent_version=agent_version,
        attributes=attributes,
    )


def register_devices(session: Session, devices: list[dict[str, Any]], *, now: datetime) -> int:
    """Register or update many devices (an inventory import) with one query for the ones
    already known, instead of one per device."""
    for d in devices:
        if not valid_thing_name(d["thing_name"]):
            raise ValueError(f"invalid thing name {d['thing_name']!r}: 1-128 of [a-zA-Z0-9:_-]")
    known = {
        dev.thing_name: dev
        for dev in session.scalars(
            select(Device).where(Device.thing_name.in_([d["thing_name"] for d in devices]))
        )
    }
    for d in devices:
        _apply(session, known.get(d["thing_name"]), now=now, **d)
    return len(devices)


def _apply(
    session: Session,
    device: Device | None,
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
    if device is None:
        device = Device(thing_name=thing_name, sku=sku, registered_at=now, attributes={})
        session.add(device)
    device.sku = sku
    device.region, device.customer, device.regulatory_domain = region, customer, regulatory_domain
    device.firmware, device.agent_version = firmware, agent_version
    device.attributes = dict(attributes or {})
    return device


class GroupError(TidegateError):
    """A group operation that names something that does not exist, or that exists already."""


class UnknownGroupError(GroupError):
    pass


def create_group(
    session: Session, *, name: str, description: str, things: list[str], now: datetime
) -> DeviceGroup:
    if session.get(DeviceGroup, name) is not None:
        raise GroupError(f"group {name!r} exists already")
    group = DeviceGroup(name=name, description=description, created_at=now)
    session.add(group)
    session.flush()
    change_members(session, name=name, add=things, remove=[])
    return group


def change_members(session: Session, *, name: str, add: list[str], remove: list[str]) -> list[str]:
    """Add and remove members in one step; every thing named must be a registered device, or
    nothing changes. Returns the members afterwards."""
    if session.get(DeviceGroup, name) is None:
        raise UnknownGroupError(f"no group {name!r}")
    named = set(add) | set(remove)
    known = set(session.scalars(select(Device.thing_name).where(Device.thing_name.in_(named))).all())
    if unknown := sorted(named - known):
        raise GroupError(
            f"unknown device(s): {', '.join(unknown[:10])}" + (" …" if len(unknown) > 10 else "")
        )
    current = set(group_members(session, name))
    for thing in sorted(set(add) - current):
        session.add(GroupMember(group_name=name, thing_name=thing))
    if gone := set(remove) & current:
        session.execute(
            delete(GroupMember).where(GroupMember.group_name == name, GroupMember.thing_name.in_(gone))
        )
    session.flush()
    return group_members(session, name)


def group_members(session: Session, name: str) -> list[str]:
    return list(
        session.scalars(
            select(GroupMember.thing_name)
            .where(GroupMember.group_name == name)
            .order_by(GroupMember.thing_name)
        ).all()
    )


def delete_group(session: Session, *, name: str) -> None:
    if session.get(DeviceGroup, name) is None:
        raise UnknownGroupError(f"no group {name!r}")
    session.execute(delete(GroupMember).where(GroupMember.group_name == name))
    session.execute(delete(DeviceGroup).where(DeviceGroup.name == name))
