"""A/B slots behind one interface.

`SlotBackend` is what the install state machine needs from "the thing that
decides what runs": which slot is active, how to make another one active
atomically, and where a slot's files live. `DirectorySlotBackend` keeps two
directories and a symlink replaced with `os.replace` (then the directory is
fsynced). A bootloader backend (GRUB env through ``grub-editenv``, U-Boot
through ``fw_setenv``) implements the same three calls, setting the boot
order and attempt counters instead of a symlink, without touching the state
machine.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Protocol

from agent.state import SLOTS
from shared.fsutil import fsync_dir


class SlotBackend(Protocol):
    def active(self) -> str | None:
        """The slot that runs now, or None before the first install."""

    def activate(self, slot: str | None) -> None:
        """Atomically make `slot` the active one (None: no model active)."""

    def slot_dir(self, slot: str) -> Path:
        """Where a slot's files live."""

    def clear(self, slot: str) -> Path:
        """Empty an inactive slot for writing; returns its directory."""


class DirectorySlotBackend:
    POINTER = "current"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.slots_dir = root / "slots"

    def create(self) -> None:
        for s in SLOTS:
            (self.slots_dir / s).mkdir(parents=True, exist_ok=True)
        fsync_dir(self.slots_dir)

    def active(self) -> str | None:
        try:
            target = os.readlink(self.root / self.POINTER)
        except FileNotFoundError:
            return None
        name = Path(target).name
        return name if name in SLOTS else None

    def activate(self, slot: str | None) -> None:
        pointer = self.root / self.POINTER
        if slot is None:
            pointer.unlink(missing_ok=True)
        else:
            if slot not in SLOTS:
                raise ValueError(f"unknown slot {slot!r}")
            tmp = self.root / f".{self.POINTER}.tmp"
            tmp.unlink(missing_ok=True)
            os.symlink(f"slots/{slot}", tmp)
            os.replace(tmp, pointer)
        fsync_dir(self.root)

    def slot_dir(self, slot: str) -> Path:
        return self.slots_dir / slot

    def clear(self, slot: str) -> Path:
        if slot == self.active():
            raise ValueError(f"refusing to clear the active slot {slot!r}")
        d = self.slot_dir(slot)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        fsync_dir(self.slots_dir)
        return d


def other(slot: str | None) -> str:
    """The inactive slot to write into."""
    return "b" if slot == "a" else "a"
