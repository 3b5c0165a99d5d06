"""Fault injection for the kill tests, in the manner of Mender's ``Killed_in_<State>``.

When ``TIDEGATE_FAULT_KILL_AT`` is set, the agent sends itself SIGKILL at the
named checkpoint (e.g. ``after:writing``) or once ``bytes:N`` payload bytes
have been written. Unset (always, in production), every check is one
comparison against None.
"""

from __future__ import annotations

import os
import signal

ENV = "TIDEGATE_FAULT_KILL_AT"


def _target() -> str | None:
    return os.environ.get(ENV) or None


def checkpoint(name: str) -> None:
    if _target() == name:
        os.kill(os.getpid(), signal.SIGKILL)


def byte_checkpoint(written: int) -> None:
    target = _target()
    if target is not None and target.startswith("bytes:") and written >= int(target[6:]):
        os.kill(os.getpid(), signal.SIGKILL)
