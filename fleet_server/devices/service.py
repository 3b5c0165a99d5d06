"""Device registration and inventory. Keyword-only functions that run inside the caller's
transaction (the caller owns commit and rollback)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from fleet_server.devices.models import Device, DeviceGroup, GroupMember
from fleet_server.errors import FleetError, NotFoundError
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
    """Register a device, or update the inventory of one already registered (fields left
    None keep their value)."""
    inventory = {
        "thing_name": thing_name,
        "sku": sku,
        "region": region,
        "customer": customer,
        "regulatory_domain": regulatory_domain,
        "firmware": firmware,
        "agent_version": agent_version,
        "attributes": attributes,
    }
    return register_devices(session, [inventory], now=now)[0]


INVENTORY = ("region", "customer", "regulatory_domain", "firmware", "agent_version")


def register_devices(session: Session, devices: list[dict[str, Any]], *, now: datetime) -> list[Device]:
    """Register or update many devices (an inventory import; each dict holds
    `register_device`'s fields) with one query for the ones already known, not one each."""
    for d in devices:
        if not valid_thing_name(d["thing_name"]):
            raise DeviceError(f"invalid thing name {d['thing_name']!r}: 1-128 of [a-zA-Z0-9:_-]")
    known = {
        dev.thing_name: dev
        for dev in session.scalars(
            select(Device).where(Device.thing_name.in_([d["thing_name"] for d in devices]))
        )
    }
    out = []
    for d in devices:
        device = known.get(d["thing_name"])
        if device is None:
            device = Device(thing_name=d["thing_name"], sku=d["sku"], registered_at=now, attributes={})
            session.add(device)
        device.sku = d["sku"]
        # An update changes what it names and nothing else: re-posting a device must not wipe
        # what the device reported (its agent version) or what another import set.
        for field in INVENTORY:
            if d.get(field) is not None:
                setattr(device, field, d[field])
        if d.get("attributes") is not None:
            device.attributes = {**(device.attributes or {}), **d["attributes"]}
        out.append(device)
    return out


class DeviceError(FleetError):
    pass


class GroupError(FleetError):
    """A group operation that names something that does not exist, or that exists already."""


class UnknownGroupError(GroupError, NotFoundError):
    http_status = NotFoundError.http_status


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
