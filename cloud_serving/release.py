"""One release operation at a time: the table of what an operator may do while a model is
shadowing, running a canary or an experiment.

Without it two operations write the same routing: a canary started during an experiment had
its weights overwritten when the experiment ended, and a rollback during a shadow changed
the reference the shadow was comparing against. Every operator call names its `Op`; `check`
refuses anything the table does not list with a `ReleaseError` (409) that names the running
operation. The gateway's own remediations (an alert's rollback or fallback) are safety
actions and are not subject to the table. Pure: no I/O, no clock.
"""

from __future__ import annotations

from enum import StrEnum

from cloud_serving.errors import ReleaseError


class Running(StrEnum):
    """What a model's release is doing now."""

    IDLE = "idle"
    SHADOW = "shadow"
    CANARY = "canary"
    EXPERIMENT = "experiment"


class Op(StrEnum):
    START_SHADOW = "start a shadow"
    STOP_SHADOW = "stop the shadow"
    START_CANARY = "start a canary"
    ROLL_THROUGH = "roll through"
    JUDGE_CANARY = "approve or reject the canary"
    START_EXPERIMENT = "start an experiment"
    SET_WEIGHTS = "set weights"
    SWITCH = "switch (blue/green)"
    ROLLBACK = "roll back"
    LOAD = "load a version"
    UNLOAD = "unload a version"
    CLEAR_FALLBACK = "clear the fallback"


_ALWAYS = frozenset({Op.LOAD, Op.UNLOAD, Op.CLEAR_FALLBACK})

ALLOWED: dict[Running, frozenset[Op]] = {
    Running.IDLE: _ALWAYS
    | {Op.START_SHADOW, Op.START_CANARY, Op.START_EXPERIMENT, Op.SET_WEIGHTS, Op.SWITCH, Op.ROLLBACK},
    Running.SHADOW: _ALWAYS | {Op.STOP_SHADOW},
    # Rollback during a canary ends the canary (production never changed).
    Running.CANARY: _ALWAYS | {Op.ROLL_THROUGH, Op.JUDGE_CANARY, Op.ROLLBACK},
    Running.EXPERIMENT: _ALWAYS,
}


def running(*, shadow: str | None, canary: str | None, experiment: str | None) -> tuple[Running, str]:
    """The operation in progress and what it is about (for the error), from the model's state.
    At most one is set when every change went through `check`."""
    if canary is not None:
        return Running.CANARY, f"a canary of {canary}"
    if experiment is not None:
        return Running.EXPERIMENT, f"an experiment ({experiment})"
    if shadow is not None:
        return Running.SHADOW, f"a shadow of {shadow}"
    return Running.IDLE, "nothing"


def check(model: str, op: Op, now: tuple[Running, str]) -> None:
    state, what = now
    if op in ALLOWED[state]:
        return
    allowed = ", ".join(sorted(o.value for o in ALLOWED[state] - _ALWAYS)) or "nothing but load/unload"
    raise ReleaseError(f"{model} is running {what}: cannot {op.value} now (allowed: {allowed})")
