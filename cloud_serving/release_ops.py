"""Release operations: shadow, canary, blue/green, weights, rollback and experiments, each
allowed only as the table in `cloud_serving.release` says; `tick` carries out the gates'
decisions (advance, pause, promote, roll back) and ends experiments."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cloud_serving.canary import Canary, CanarySpec
from cloud_serving.config import BatchingConfig
from cloud_serving.core import GatewayCore, onnx_backend
from cloud_serving.errors import (
    InvalidReleaseError,
    ReleaseError,
)
from cloud_serving.experiments import Experiment, ExperimentSpec
from cloud_serving.flags import UNSET
from cloud_serving.model_state import Answer, ModelState
from cloud_serving.release import Op
from cloud_serving.routing import normalise
from cloud_serving.shadow import ShadowBudget, ShadowMirror, ShadowVerdict
from shared.fsutil import atomic_write_bytes
from shared.gates import Action, Decision

log = logging.getLogger("tidegate.serving")


class ShadowGateError(ReleaseError):
    """A canary asked for a candidate without a passing shadow verdict (409, with the
    verdict's conditions in the answer)."""

    def __init__(self, message: str, verdict: ShadowVerdict | None) -> None:
        super().__init__(message)
        self.verdict = verdict


class ReleaseOperations(GatewayCore):
    if TYPE_CHECKING:  # in the other parts of the gateway

        async def _run(self, st: ModelState, version: str, sample: np.ndarray[Any, Any]) -> Answer: ...

        def _mitigated(
            self, st: ModelState, by: str, reason: str, now: datetime, version: str | None = None
        ) -> None: ...

        def _alerts(
            self, st: ModelState, now: datetime, done: list[tuple[str, str, Path | None]]
        ) -> None: ...

        def _judge(self, st: ModelState, now: datetime) -> Decision | None: ...

        def _analyse(self, st: ModelState) -> str | None: ...

        def _shadow_decide(self, st: ModelState) -> None: ...

    def start_experiment(self, name: str, spec: ExperimentSpec) -> Experiment:
        st = self.model(name)
        for arm in (spec.control, spec.treatment):
            for version in spec.ensemble_of(arm) or [spec.version_of(arm)]:
                self._known(st, version)
        if spec.control == spec.treatment:
            raise ReleaseError("an experiment needs two differently named arms")
        arms = [
            (spec.version_of(a), spec.threshold_of(a), spec.ensemble_of(a))
            for a in (spec.control, spec.treatment)
        ]
        if arms[0] == arms[1]:
            raise ReleaseError("the two arms are the same version with the same post-processing")
        st.allow(Op.START_EXPERIMENT)
        if spec.flags and self.flags is None:
            raise InvalidReleaseError(
                f"{name}: the experiment sets flags, but this gateway has no flag store ([gateway.registry])"
            )
        st.experiment = Experiment(spec, self.clock().isoformat())
        if spec.flags and self.flags is not None:
            before = self.flags.known()
            st.flag_restore = {k: before.get(k, UNSET) for k in spec.flags}
            why = f"experiment {spec.control} vs {spec.treatment} on {name}"
            self._flag_writes.extend((k, v, why) for k, v in spec.flags.items())
            self._note(st, f"experiment set flags {', '.join(f'{k}={v!r}' for k, v in spec.flags.items())}")
        st.assigned.clear()
        self._note(st, f"experiment {spec.mode}: {spec.control} vs {spec.treatment}")
        return st.experiment

    def _conclude(self, st: ModelState, decision: str) -> Path:
        exp = st.experiment
        assert exp is not None
        exp.decision = decision
        if decision == "treatment_wins":
            winner = exp.spec.version_of(exp.spec.treatment)
            if winner != st.production:
                st.history.append(st.production)
            st.production, st.weights = winner, {winner: 1.0}
            st.production_since = self.clock()
            if (threshold := exp.spec.threshold_of(exp.spec.treatment)) is not None:
                st.threshold = threshold
            st.ensemble = exp.spec.ensemble_of(exp.spec.treatment)  # after production: it clears it
            self._promoted(st.name, winner, "experiment", exp.summary())
        else:
            st.weights = {st.production: 1.0}  # everyone back on production
        if st.flag_restore:
            if decision == "treatment_wins":
                self._note(st, f"experiment flags kept: {', '.join(st.flag_restore)}")
            else:
                why = f"experiment on {st.name} ended: {decision}"
                self._flag_writes.extend((k, v, why) for k, v in st.flag_restore.items())
                undone = ", ".join(
                    f"{k} (removed)" if v is UNSET else f"{k}={v!r}" for k, v in st.flag_restore.items()
                )
                self._note(st, f"experiment {decision}: reverted the flags it set: {undone}")
            st.flag_restore = {}
        out = self.config.gateway.failure_dir.parent / "experiments" / f"{st.name}-{exp.spec.treatment}"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "ab_summary.json", json.dumps(exp.summary(), indent=2).encode())
        st.experiment = None
        self._note(
            st,
            f"experiment ended: {decision}"
            + (f"; {st.production} promoted" if decision == "treatment_wins" else ""),
        )
        return out / "ab_summary.json"

    async def load_version(
        self, name: str, version: str, path: Path, batching: BatchingConfig | None = None
    ) -> None:
        st = self.model(name)
        st.allow(Op.LOAD)
        if version in st.versions:
            raise ReleaseError(f"{name} {version} is loaded already")
        backend = onnx_backend(version, path, batching or BatchingConfig(), self.pool)
        await backend.start()
        st.versions[version] = backend
        self._note(st, f"loaded {version} from {path}")

    async def unload_version(self, name: str, version: str) -> None:
        st = self.model(name)
        st.allow(Op.UNLOAD)
        self._known(st, version)
        busy = {st.production, *st.weights, *([st.canary.candidate] if st.canary else [])}
        if st.shadow is not None and st.shadow.active:
            busy.add(st.shadow.version)
        if version in busy:
            raise ReleaseError(f"{name} {version} is serving traffic; route it away first")
        backend = st.versions.pop(version)
        await backend.stop()
        self._note(st, f"unloaded {version}")

    def set_weights(self, name: str, weights: dict[str, float]) -> None:
        """All at once or by weight; the largest share becomes production."""
        st = self.model(name)
        for v in weights:
            self._known(st, v)
        st.allow(Op.SET_WEIGHTS)
        split = normalise(weights)
        st.weights = split
        top = max(split, key=lambda v: split[v])
        if top != st.production:
            st.history.append(st.production)
            st.production = top
            st.production_since = self.clock()
        self._note(st, f"weights {split}")

    async def switch(self, name: str, version: str) -> None:
        """Blue/green: check the other stack answers, then move all traffic at once."""
        st = self.model(name)
        self._known(st, version)
        st.allow(Op.SWITCH)
        probe = np.zeros(
            [d or 1 for d in getattr(st.versions[version], "sample_shape", ())], dtype=np.float32
        )
        try:
            await self._run(st, version, probe)
        except Exception as exc:
            raise ReleaseError(f"{name} {version} failed its pre-switch check: {exc}") from exc
        st.allow(Op.SWITCH)  # again: the probe awaited, and another operation may have begun
        if version != st.production:
            st.history.append(st.production)
        st.production, st.weights = version, {version: 1.0}
        st.production_since = self.clock()
        self._note(st, f"switched all traffic to {version}")

    async def rollback(self, name: str, reason: str = "operator rollback") -> str:
        """Back to the previous production version (or, with a canary running, end it)."""
        st = self.model(name)
        st.allow(Op.ROLLBACK)
        if st.canary is not None:
            self._end_canary(st, promoted=False, reason=reason)
            return st.production
        if not st.history:
            raise ReleaseError(f"{name} has no previous version to roll back to")
        previous = st.history.pop()
        st.production, st.weights = previous, {previous: 1.0}
        st.production_since = self.clock()
        self._note(st, f"rolled back to {previous}: {reason}")
        return previous

    def start_shadow(
        self, name: str, version: str, *, share: float, budget: ShadowBudget, queue_max: int = 4096
    ) -> None:
        st = self.model(name)
        self._known(st, version)
        st.allow(Op.START_SHADOW)
        if version == st.production:
            raise ReleaseError(f"{version} is production; shadow a candidate")
        mirror = self._mirror(st, version, share, budget, queue_max)
        if st.shadow is not None:  # an earlier shadow that stopped on its budget: end its process
            self._background(st.shadow.stop())
        st.shadow = mirror
        st.verdicts.pop(version, None)  # a new shadow, a new verdict
        st.shadow.start()
        self._note(st, f"shadowing {share:.0%} of traffic to {version}")

    def _mirror(
        self,
        st: ModelState,
        version: str,
        share: float,
        budget: ShadowBudget,
        queue_max: int,
        shadow_id: str | None = None,
    ) -> ShadowMirror:
        """A mirror of `version` (not started). The mirror runs its own copy of the candidate
        in a low-priority process or on the shadow worker: callers' requests keep the CPU and
        the event loop, and the shadow takes what is left. Among replicas (`shadow_id` given
        when another replica started it) the leader, not the mirror, ends a failing shadow."""
        path = getattr(st.versions[version], "model_path", None)
        if path is None:
            raise ReleaseError(f"{st.name} {version} is not an in-process model; it cannot be shadowed")
        return ShadowMirror(
            version,
            path,
            share=share,
            budget=budget,
            spec=st.task_spec(),
            queue_max=queue_max,
            clock=self.clock,
            worker=self.shadow_worker,
            shadow_id=shadow_id,
            decides=self.config.gateway.replication is None,
        )  # checks the budgets (BudgetError, 422) before any process starts

    async def stop_shadow(self, name: str) -> dict[str, Any]:
        """End the shadow: its verdict on its last summary becomes final, and is what a canary
        of that version is allowed on."""
        st = self.model(name)
        if st.shadow is None:
            raise ReleaseError(f"{name} has no shadow")
        shadow = st.shadow
        verdict = await shadow.stop()
        st.verdicts[shadow.version] = verdict
        if not shadow.noted:
            self._note(st, f"shadow of {shadow.version} ended: {verdict.verdict}: {verdict.reason}")
        shadow.noted = True
        st.shadow = None
        return {**shadow.stats.kpis(), "verdict": verdict.as_dict()}

    def _shadow_ended(self, st: ModelState) -> None:
        """A shadow that stopped itself (its verdict failed): the verdict is kept as final."""
        shadow = st.shadow
        if shadow is not None and shadow.stopped_reason and not shadow.noted:
            shadow.noted = True
            st.verdicts[shadow.version] = replace(shadow.verdict, final=True)
            self._note(st, f"shadow of {shadow.version} stopped: {shadow.stopped_reason}")

    def _shadow_gate(
        self, st: ModelState, candidate: str, override_reason: str | None
    ) -> ShadowVerdict | None:
        """The canary's entry condition: the candidate's shadow ended with a pass. Without one,
        a `ShadowGateError` (409, with the verdict), unless an `override_reason` is given: then
        it is noted in the events and queued for the model card."""
        self._shadow_ended(st)
        verdict = st.verdicts.get(candidate)
        if verdict is not None and verdict.verdict == "pass":
            return verdict
        why = (
            f"no shadow of {candidate} has ended"
            if verdict is None
            else f"its shadow verdict is {verdict.verdict}: {verdict.reason}"
        )
        if not override_reason:
            raise ShadowGateError(
                f"{st.name}: no canary of {candidate}: {why}; shadow it first, or give an override_reason",
                verdict,
            )
        self._note(st, f"shadow gate overridden for {candidate} ({why}): {override_reason}")
        content = {
            "gate": "shadow",
            "reason": override_reason,
            "verdict": verdict.as_dict() if verdict is not None else None,
        }
        self._promoted(st.name, candidate, "override", content, stage=False)
        return None

    def start_canary(
        self, name: str, candidate: str, spec: CanarySpec, *, override_reason: str | None = None
    ) -> Canary:
        """A canary of `candidate`, allowed only after a shadow of it ended with a passing
        verdict, or with a recorded `override_reason` (the API lets only admins give one)."""
        st = self.model(name)
        self._known(st, candidate)
        st.allow(Op.START_CANARY)
        if candidate == st.production:
            raise ReleaseError(f"{candidate} is production already")
        return self._begin_canary(st, candidate, spec, override_reason)

    def _begin_canary(
        self, st: ModelState, candidate: str, spec: CanarySpec, override_reason: str | None
    ) -> Canary:
        try:
            spec.plan()  # steps, manual steps and bounds, before anything changes
        except ValueError as exc:  # GateDefinitionError
            raise InvalidReleaseError(f"{st.name} canary: {exc}") from exc
        verdict = self._shadow_gate(st, candidate, override_reason)
        if st.canary is not None:
            self._end_canary(st, promoted=False, reason=f"rolled through to {candidate}")
        st.canary = Canary.begin(st.name, st.production, candidate, spec, self.clock())
        st.canary.redactor = self.redactor
        st.canary.shadow_agreement = verdict.agreement if verdict is not None else None
        st.salt = f"{st.name}:{candidate}"  # a new release reshuffles who is in the first 1 %
        self._apply_canary_weight(st)
        cohort = f", cohort {dict(spec.cohort)}" if spec.cohort else ""
        self._note(st, f"canary {candidate}: {list(spec.steps)} %, bake {spec.bake_s:g} s{cohort}")
        return st.canary

    def roll_through(
        self, name: str, candidate: str, spec: CanarySpec, *, override_reason: str | None = None
    ) -> Canary:
        """Replace a failing (or superseded) canary with the next candidate: the old one is
        rolled back and the new one starts from the first step, through the same shadow gate
        (checked before the old canary ends, so a refusal changes nothing)."""
        st = self.model(name)
        self._known(st, candidate)
        if st.canary is None:
            raise ReleaseError(f"{name} has no canary to roll through")
        st.allow(Op.ROLL_THROUGH)
        if candidate in (st.canary.candidate, st.production):
            raise ReleaseError(f"roll through to a new candidate, not {candidate}")
        return self._begin_canary(st, candidate, spec, override_reason)

    def judge_canary(self, name: str, *, approve: bool, by: str = "an operator") -> dict[str, Any]:
        """A person's call on a canary that waits (a manual step, or gates that could not
        decide): approval moves it to the next step (or promotes it), rejection rolls it back."""
        st = self.model(name)
        if st.canary is None:
            raise ReleaseError(f"{name} has no canary")
        st.allow(Op.JUDGE_CANARY)
        try:
            decision = st.canary.judge(self.clock(), approve=approve, by=by)
        except ValueError as exc:  # not paused
            raise ReleaseError(f"{name} canary of {st.canary.candidate}: {exc}") from exc
        self._apply(st, decision, self.clock(), [])
        return {"action": decision.action.value, "reason": decision.reason}

    def _apply_canary_weight(self, st: ModelState) -> None:
        assert st.canary is not None
        w = st.canary.weight
        st.weights = {st.production: 1 - w, st.canary.candidate: w} if w < 1 else {st.canary.candidate: 1.0}

    def _end_canary(self, st: ModelState, *, promoted: bool, reason: str) -> None:
        assert st.canary is not None
        candidate = st.canary.candidate
        if promoted:
            st.history.append(st.production)
            st.production = candidate
            st.production_since = self.clock()
            verdict = st.verdicts.get(candidate)
            if verdict is not None:
                self._promoted(st.name, candidate, "shadow", verdict.as_dict(), stage=False)
            self._promoted(
                st.name, candidate, "canary", {"steps": list(st.canary.spec.steps), "log": st.canary.log}
            )
        st.weights = {st.production: 1.0}
        st.canary = None
        self._note(st, f"canary {candidate} {'promoted' if promoted else 'rolled back'}: {reason}")

    def _apply(
        self, st: ModelState, decision: Decision, now: datetime, done: list[tuple[str, str, Path | None]]
    ) -> None:
        """Carry out a canary decision (a tick's or a person's)."""
        assert st.canary is not None
        if decision.action is Action.ADVANCE:
            self._apply_canary_weight(st)
            self._note(st, decision.reason)
        elif decision.action is Action.PAUSE:
            self._note(st, f"canary {st.canary.candidate} paused: {decision.reason}")
        elif decision.action is Action.COMPLETE:
            self._end_canary(st, promoted=True, reason=decision.reason)
            done.append((st.name, "promoted", None))
        elif decision.action is Action.ABORT:
            self._mitigated(st, "gates", decision.reason, now)
            bundle = st.canary.write_failure_bundle(self.config.gateway.failure_dir, now, decision)
            self._end_canary(st, promoted=False, reason=decision.reason)
            done.append((st.name, "rolled back", bundle))
        elif "inconclusive" in decision.reason:
            self._note(st, decision.reason)

    def tick(self) -> list[tuple[str, str, Path | None]]:
        """Advance every canary, check every shadow's budget and every alert rule: (model,
        what, failure bundle)."""
        now = self.clock()
        done: list[tuple[str, str, Path | None]] = []
        for st in self.models.values():
            self._alerts(st, now, done)
            self._shadow_decide(st)
            self._shadow_ended(st)
            if st.experiment is not None and (verdict := self._analyse(st)) is not None:
                done.append((st.name, verdict, self._conclude(st, verdict)))
            if st.canary is not None and (decision := self._judge(st, now)) is not None:
                self._apply(st, decision, now, done)
        return done
