"""The install state machine, persisted on disk before every transition.

Pure parts (the allowed transitions and what a restart must do) are plain
functions of the state; `StateStore` is the only code that touches the file,
and it writes atomically (temp, fsync, rename, fsync dir).
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import CorruptStateError, IllegalTransitionError
from shared.fsutil import atomic_write_bytes

SLOTS = ("a", "b")


class Phase(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    WRITING = "writing"
    FLIPPED = "flipped"  # the new slot is active, on trial
    SELF_TESTING = "self_testing"
    ROLLING_BACK = "rolling_back"


PRE_FLIP = frozenset({Phase.DOWNLOADING, Phase.VERIFYING, Phase.WRITING})
ON_TRIAL = frozenset({Phase.FLIPPED, Phase.SELF_TESTING})

ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.DOWNLOADING, Phase.VERIFYING, Phase.ROLLING_BACK}),
    Phase.DOWNLOADING: frozenset({Phase.VERIFYING, Phase.IDLE}),
    Phase.VERIFYING: frozenset({Phase.WRITING, Phase.IDLE}),
    Phase.WRITING: frozenset({Phase.FLIPPED, Phase.IDLE}),
    Phase.FLIPPED: frozenset({Phase.SELF_TESTING, Phase.ROLLING_BACK}),
    Phase.SELF_TESTING: frozenset({Phase.IDLE, Phase.ROLLING_BACK, Phase.SELF_TESTING}),
    Phase.ROLLING_BACK: frozenset({Phase.IDLE}),
}


class SlotStatus(StrEnum):
    EMPTY = "empty"
    WRITING = "writing"
    TRIAL = "trial"
    GOOD = "good"  # committed and verified
    BAD = "bad"  # failed its trial
    INVALID = "invalid"  # partly written; never to be activated


class Outcome(StrEnum):
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BundleRef(_Model):
    name: str
    version: str
    sha256: str
    target: str


class SlotInfo(_Model):
    status: SlotStatus = SlotStatus.EMPTY
    bundle: BundleRef | None = None
    committed_at: datetime | None = None


class InstallRecord(_Model):
    id: str
    phase: Phase
    target: str
    bundle: BundleRef
    repository: str
    local_bundle: str | None = None
    from_slot: str | None
    to_slot: str
    started_at: datetime
    updated_at: datetime
    manual: bool = False  # an operator's rollback rather than an install
    reason: str | None = None  # why a rollback began, kept so a restart can finish it
    boots: int = 0  # restarts while on trial (the boot count of RAUC/Mender)
    transitions: int = 0  # every persisted transition (Mender's state loop counter)
    figures: dict[str, Any] = Field(default_factory=dict)


class LastResult(_Model):
    outcome: Outcome
    reason: str
    target: str | None = None
    version: str | None = None
    at: datetime
    figures: dict[str, Any] = Field(default_factory=dict)


class AgentState(_Model):
    format_version: int = 1
    slots: dict[str, SlotInfo] = Field(default_factory=lambda: {s: SlotInfo() for s in SLOTS})
    install: InstallRecord | None = None
    last_result: LastResult | None = None

    @property
    def phase(self) -> Phase:
        return self.install.phase if self.install is not None else Phase.IDLE


def check_transition(current: Phase, to: Phase) -> None:
    if to not in ALLOWED[current]:
        raise IllegalTransitionError(f"install state cannot go from {current} to {to}")


class RecoveryStep(StrEnum):
    NOTHING = "nothing"
    ABANDON = "abandon"  # interrupted before the flip: the active slot was never touched
    CONTINUE_TRIAL = "continue_trial"  # re-assert the flip and run the self-test again
    ROLLBACK = "rollback"


def recovery_step(state: AgentState, *, max_trial_boots: int, max_transitions: int) -> RecoveryStep:
    """What a restart must do with whatever an interrupted install left (pure).

    Called after the restart has been counted in `state`.
    """
    rec = state.install
    if rec is None:
        return RecoveryStep.NOTHING
    if rec.phase in PRE_FLIP:
        return RecoveryStep.ABANDON
    if rec.phase is Phase.ROLLING_BACK:
        return RecoveryStep.ROLLBACK
    if rec.boots > max_trial_boots or rec.transitions > max_transitions:
        return RecoveryStep.ROLLBACK
    return RecoveryStep.CONTINUE_TRIAL


class StateStore:
    """Reads and atomically writes ``state.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> AgentState:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError as exc:
            raise CorruptStateError(f"{self.path}: missing") from exc
        try:
            return AgentState.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as exc:
            raise CorruptStateError(f"{self.path}: unreadable state ({str(exc).splitlines()[0]})") from exc

    def save(self, state: AgentState) -> None:
        if state.install is not None:
            state.install.transitions += 1
        atomic_write_bytes(self.path, state.model_dump_json(indent=2).encode())
