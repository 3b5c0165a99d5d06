"""The A/B install engine: verify, write the inactive slot, flip, self-test, commit or roll back.

Each step persists the state *before* it acts, so that `recover` (run at
every start) can finish or undo whatever a crash or power cut interrupted:

    idle → downloading → verifying → writing → flipped → self_testing → idle (committed)
                │             │           │          │            └──────→ rolling_back → idle
                └─────────────┴───────────┴─→ idle (failed; active slot untouched)

Refusals and failures before the flip never touch the active slot.
"""

from __future__ import annotations

import resource
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent import faults
from agent.device import DeviceConfig, DeviceRoot
from agent.errors import (
    AgentError,
    AgentTooOldError,
    DowngradeError,
    InstallInProgressError,
    InstallRefusedError,
    KnownBadBundleError,
    NotEnoughDiskError,
    NothingToRollBackToError,
    PreconditionsUnmetError,
    SkuMismatchError,
)
from agent.hooks import HookDeferredError, Hooks
from agent.selftest import run_selftest
from agent.slots import other
from agent.state import (
    PRE_FLIP,
    AgentState,
    BundleRef,
    InstallRecord,
    LastResult,
    Outcome,
    Phase,
    RecoveryStep,
    SlotInfo,
    SlotStatus,
    check_transition,
    recovery_step,
)
from shared.bundle import MANIFEST_NAME, BundleManifest, read_bundle, read_manifest, sha256_file, verify_tree
from shared.errors import TidegateError
from shared.fsutil import atomic_write_bytes
from shared.semver import SemVer
from shared.trust import TargetInfo, TargetNotFoundError, TrustClient
from shared.trust.errors import FetchError
from shared.version import TIDEGATE_VERSION

ProgressFn = Callable[[str, int, int], None]
"""Called with (phase, bytes done, bytes total)."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class InstallReport:
    outcome: Outcome
    reason: str
    version: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    refused: bool = False  # the job does not fit this device (SKU, agent version, downgrade, unknown)
    deferred: bool = False  # stopped before the flip because preconditions no longer hold; retry later
    retry_later: bool = False  # deferred by a device hook: try again after a while, not at once

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.COMMITTED


def _is_refusal(exc: BaseException) -> bool:
    """Refusals say the job does not fit this device (AWS IoT Jobs: REJECTED), not that it broke."""
    return isinstance(exc, InstallRefusedError | TargetNotFoundError) and not isinstance(
        exc, NotEnoughDiskError
    )


class Agent:
    """Installs bundles into one device root. One instance per operation is fine."""

    def __init__(
        self,
        root: Path,
        *,
        clock: Callable[[], datetime] = _utcnow,
        on_progress: ProgressFn | None = None,
        agent_version: str = TIDEGATE_VERSION,
        before_flip: Callable[[], str | None] | None = None,
    ) -> None:
        self.dev = DeviceRoot(root)
        self.clock = clock
        self.on_progress = on_progress
        self.agent_version = agent_version
        self.before_flip = before_flip

    # ---- persistence ------------------------------------------------------------------------

    def _enter(self, state: AgentState, phase: Phase) -> None:
        """Persist the move to `phase`, then let the fault injector strike."""
        assert state.install is not None
        check_transition(state.install.phase, phase)
        state.install.phase = phase
        state.install.updated_at = self.clock()
        self.dev.state.save(state)
        faults.checkpoint(f"after:{phase}")
        if self.on_progress is not None:
            self.on_progress(phase.value, 0, 0)

    def _finish(
        self,
        state: AgentState,
        outcome: Outcome,
        reason: str,
        figures: dict[str, Any],
        *,
        refused: bool = False,
        deferred: bool = False,
        retry_later: bool = False,
    ) -> InstallReport:
        rec = state.install
        version = rec.bundle.version if rec is not None else None
        state.last_result = LastResult(
            outcome=outcome,
            reason=reason,
            target=rec.target if rec is not None else None,
            version=version,
            at=self.clock(),
            figures=figures,
        )
        state.install = None
        self.dev.state.save(state)
        faults.checkpoint(f"after:{outcome}")
        return InstallReport(
            outcome, reason, version, figures, refused=refused, deferred=deferred, retry_later=retry_later
        )

    @staticmethod
    def _hooks(cfg: DeviceConfig) -> Hooks:
        return Hooks(Path(cfg.hooks_dir) if cfg.hooks_dir else None, cfg.hook_timeout_s)

    @staticmethod
    def _hook_env(rec: InstallRecord | None) -> dict[str, str]:
        """What a hook is told about the install (taken before the install record is cleared)."""
        if rec is None:
            return {}
        return {
            "TIDEGATE_HOOK_TARGET": rec.target,
            "TIDEGATE_HOOK_VERSION": rec.bundle.version,
            "TIDEGATE_HOOK_SLOT": rec.to_slot,
        }

    def _refuse(self, state: AgentState, target: str | None, exc: TidegateError) -> InstallReport:
        reason = str(exc)
        state.last_result = LastResult(outcome=Outcome.FAILED, reason=reason, target=target, at=self.clock())
        self.dev.state.save(state)
        return InstallReport(Outcome.FAILED, reason, refused=_is_refusal(exc))

    # ---- install ------------------------------------------------------------------------------

    def install(
        self, *, repository: str, target: str | None = None, bundle: Path | None = None
    ) -> InstallReport:
        """Install a target (by path or bundle name) or a bundle file at hand, verified against
        the repository's signed metadata. Returns the outcome; raises only when the device
        cannot be worked on at all (not provisioned, busy, mid-install)."""
        if target is None and bundle is None:
            raise AgentError("name a --target or a --bundle to install")
        with self.dev.locked():
            cfg = self.dev.load_config()
            state = self.dev.state.load()
            if state.install is not None:
                raise InstallInProgressError(
                    f"an install of {state.install.target} was interrupted in {state.install.phase}; "
                    "run 'tidegate agent recover' first"
                )
            try:
                client = self.dev.trust_client(repository)
                client.refresh()
                info = self._resolve(client, cfg, target, bundle)
                active = self.dev.slots.active()
                already = self._precheck(cfg, state, active, info)
            except TidegateError as exc:
                return self._refuse(state, target, exc)
            if already is not None:
                return already
            now = self.clock()
            ref = BundleRef(
                name=info.tidegate.get("name", ""),
                version=info.tidegate.get("version", ""),
                sha256=info.sha256,
                target=info.path,
            )
            state.install = InstallRecord(
                id=uuid.uuid4().hex,
                phase=Phase.IDLE,
                target=info.path,
                bundle=ref,
                repository=repository,
                local_bundle=str(bundle.resolve()) if bundle is not None else None,
                from_slot=active,
                to_slot=other(active),
                started_at=now,
                updated_at=now,
            )
            figures: dict[str, Any] = {}
            hooks, env = self._hooks(cfg), self._hook_env(state.install)
            try:
                hooks.gate("before-download", env)
                path = self._download(state, client, info, bundle, cfg, figures)
                manifest = self._verify(state, path, info, cfg, figures)
                hooks.gate("before-install", env)
                self._write(state, path, manifest, figures)
                why = self.before_flip() if self.before_flip is not None else None
                if why is not None:
                    raise PreconditionsUnmetError(f"not flipping: {why}")
            except (TidegateError, OSError) as exc:
                deferred = isinstance(exc, PreconditionsUnmetError | HookDeferredError)
                return self._abandon(
                    state,
                    f"{type(exc).__name__}: {exc}",
                    figures,
                    keep_download=deferred or isinstance(exc, FetchError),
                    refused=_is_refusal(exc),
                    deferred=deferred,
                    retry_later=isinstance(exc, HookDeferredError),
                )
            if bundle is None:
                path.unlink(missing_ok=True)  # the slot now holds the verified payload
            return self._flip_and_trial(state, cfg, figures)

    def _resolve(
        self, client: TrustClient, cfg: DeviceConfig, target: str | None, bundle: Path | None
    ) -> TargetInfo:
        if bundle is None and target is not None:
            # A path resolves through the delegation walk itself, so a role that fails
            # verification is refused with its reason, not reported as a missing target.
            try:
                return client.get_target(target)
            except TargetNotFoundError:
                pass
        targets = client.targets()
        if bundle is not None:
            try:
                digest, _ = sha256_file(bundle)
            except OSError as exc:
                raise AgentError(f"{bundle}: cannot read bundle ({exc.strerror})") from exc
            matches = [t for t in targets if t.sha256 == digest and (target is None or t.path == target)]
            if not matches:
                raise InstallRefusedError(
                    f"{bundle.name} is not a target signed in the repository (sha256 {digest[:16]}…)"
                )
            return matches[0]
        assert target is not None
        named = [t for t in targets if t.tidegate.get("name") == target]
        if not named:
            raise TargetNotFoundError(f"no target or bundle named {target!r} in the repository")
        for_sku = [t for t in named if cfg.sku in t.tidegate.get("skus", [])]
        if not for_sku:
            skus = sorted({s for t in named for s in t.tidegate.get("skus", [])})
            raise SkuMismatchError(
                f"{target!r} has no bundle for SKU {cfg.sku} (built for {', '.join(skus)})"
            )
        ours = SemVer.parse(self.agent_version)
        usable = [
            t for t in for_sku if SemVer.parse(str(t.tidegate.get("min_agent_version", "0.0.0"))) <= ours
        ]
        if not usable:
            raise AgentTooOldError(f"every {target!r} bundle for {cfg.sku} needs a newer agent than {ours}")
        return max(usable, key=lambda t: SemVer.parse(str(t.tidegate.get("version", "0.0.0"))))

    def _precheck(
        self, cfg: DeviceConfig, state: AgentState, active: str | None, info: TargetInfo
    ) -> InstallReport | None:
        meta = info.tidegate
        skus = meta.get("skus", [])
        if cfg.sku not in skus:
            raise SkuMismatchError(
                f"{info.path} is built for {', '.join(skus) or 'no SKU'}, this device is {cfg.sku}"
            )
        needed = SemVer.parse(str(meta.get("min_agent_version", "0.0.0")))
        if needed > SemVer.parse(self.agent_version):
            raise AgentTooOldError(f"{info.path} needs agent {needed}, this agent is {self.agent_version}")
        for name, slot in state.slots.items():
            if (
                slot.status is SlotStatus.BAD
                and slot.bundle is not None
                and slot.bundle.sha256 == info.sha256
            ):
                raise KnownBadBundleError(
                    f"{info.path} already failed its trial on this device (slot {name})"
                )
        if active is None:
            return None
        current = state.slots[active]
        if current.bundle is None:
            return None
        if current.bundle.sha256 == info.sha256 and current.status is SlotStatus.GOOD:
            damage = self._damage(active)
            if damage is None:
                return InstallReport(
                    Outcome.COMMITTED,
                    f"{info.path} is already installed and committed",
                    current.bundle.version,
                )
            current.status = SlotStatus.INVALID  # damaged at rest: install it again, into the other slot
            self.dev.state.save(state)
            return None
        if current.bundle.sha256 == info.sha256 and current.status is SlotStatus.INVALID:
            return None  # the same signed bytes again, over a slot found damaged: not a downgrade
        if current.bundle.name == meta.get("name"):
            new, old = SemVer.parse(str(meta.get("version"))), SemVer.parse(current.bundle.version)
            if new <= old and not meta.get("allow_rollback", False):
                raise DowngradeError(
                    f"{info.path} is version {new}, not newer than the installed {old}, and the "
                    "repository does not sign it as an allowed rollback"
                )
        return None

    def _disk_check(self, need: int, cfg: DeviceConfig, what: str) -> None:
        free = shutil.disk_usage(self.dev.root).free
        reserve = int(cfg.reserve_mb * (1 << 20))
        if free < need + reserve:
            raise NotEnoughDiskError(
                f"{what} needs {need / (1 << 20):.1f} MiB plus a {cfg.reserve_mb:g} MiB reserve; "
                f"{free / (1 << 20):.1f} MiB free"
            )

    def _progress(self, phase: str) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            if phase == "writing":
                faults.byte_checkpoint(done)
            if self.on_progress is not None:
                self.on_progress(phase, done, total)

        return report

    def _download(
        self,
        state: AgentState,
        client: TrustClient,
        info: TargetInfo,
        bundle: Path | None,
        cfg: DeviceConfig,
        figures: dict[str, Any],
    ) -> Path:
        if bundle is not None:
            return bundle  # already matched by hash against the signed target
        self._enter(state, Phase.DOWNLOADING)
        t0 = time.monotonic()
        dest = self.dev.downloads / f"{info.sha256}.bundle"
        if dest.exists() and sha256_file(dest)[0] == info.sha256:
            return dest
        part = dest.with_name(dest.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        self._disk_check(info.length - have, cfg, "the download")
        client.download(info, dest, on_progress=self._progress("downloading"))
        figures["download_s"] = time.monotonic() - t0
        figures["download_bytes"] = info.length
        return dest

    def _verify(
        self, state: AgentState, path: Path, info: TargetInfo, cfg: DeviceConfig, figures: dict[str, Any]
    ) -> BundleManifest:
        self._enter(state, Phase.VERIFYING)
        t0 = time.monotonic()
        # The file's SHA-256 matched the signed target; every member is hashed again as
        # it is written, so here the manifest alone is read and checked.
        manifest = read_manifest(path)
        meta = info.tidegate
        claimed = (meta.get("name"), meta.get("version"), sorted(meta.get("skus", [])))
        if claimed != (manifest.name, manifest.version, sorted(manifest.skus)):
            raise InstallRefusedError(
                f"bundle.json says {manifest.name} {manifest.version} {manifest.skus}, the signed "
                f"target says {claimed[0]} {claimed[1]} {claimed[2]}"
            )
        if cfg.sku not in manifest.skus:
            raise SkuMismatchError(
                f"bundle is built for {', '.join(manifest.skus)}, this device is {cfg.sku}"
            )
        if SemVer.parse(manifest.min_agent_version) > SemVer.parse(self.agent_version):
            raise AgentTooOldError(
                f"bundle needs agent {manifest.min_agent_version}, this is {self.agent_version}"
            )
        self._disk_check(manifest.total_size, cfg, "writing the slot")
        figures["verify_s"] = time.monotonic() - t0
        return manifest

    def _write(
        self, state: AgentState, path: Path, manifest: BundleManifest, figures: dict[str, Any]
    ) -> None:
        rec = state.install
        assert rec is not None
        state.slots[rec.to_slot] = SlotInfo(status=SlotStatus.WRITING)
        self._enter(state, Phase.WRITING)
        t0 = time.monotonic()
        slot = self.dev.slots.clear(rec.to_slot)
        read_bundle(path, slot, fsync=True, on_progress=self._progress("writing"))
        atomic_write_bytes(slot / MANIFEST_NAME, manifest.to_json_bytes())
        verify_tree(slot, manifest, check_hashes=False)  # every byte was hashed as it was written
        figures["write_s"] = time.monotonic() - t0
        figures["write_bytes"] = manifest.total_size

    def _abandon(
        self,
        state: AgentState,
        reason: str,
        figures: dict[str, Any],
        *,
        keep_download: bool,
        refused: bool = False,
        deferred: bool = False,
        retry_later: bool = False,
    ) -> InstallReport:
        """Undo an install that failed (or was interrupted) before the flip."""
        rec = state.install
        assert rec is not None and rec.phase in PRE_FLIP | {Phase.IDLE}
        if state.slots[rec.to_slot].status is SlotStatus.WRITING:
            state.slots[rec.to_slot] = SlotInfo(status=SlotStatus.INVALID)
        if not keep_download and rec.local_bundle is None:
            (self.dev.downloads / f"{rec.bundle.sha256}.bundle").unlink(missing_ok=True)
        return self._finish(
            state,
            Outcome.FAILED,
            reason,
            figures,
            refused=refused,
            deferred=deferred,
            retry_later=retry_later,
        )

    # ---- flip, trial, commit, rollback -----------------------------------------------------------

    def _flip_and_trial(self, state: AgentState, cfg: DeviceConfig, figures: dict[str, Any]) -> InstallReport:
        rec = state.install
        assert rec is not None
        state.slots[rec.to_slot] = SlotInfo(status=SlotStatus.TRIAL, bundle=rec.bundle)
        rec.figures = figures
        self._enter(state, Phase.FLIPPED)
        self.dev.slots.activate(rec.to_slot)
        faults.checkpoint("after:pointer")
        return self._trial(state, cfg)

    def _trial(self, state: AgentState, cfg: DeviceConfig) -> InstallReport:
        rec = state.install
        assert rec is not None
        t0 = time.monotonic()
        self._enter(state, Phase.SELF_TESTING)
        result = run_selftest(self.dev.slots.slot_dir(rec.to_slot), timeout_s=cfg.self_test_timeout_s)
        faults.checkpoint("after:selftest-run")
        figures = dict(rec.figures)
        figures["self_test"] = result.figures()
        if not result.passed:
            return self._rollback(state, f"self-test failed: {result.reason}", figures)
        state.slots[rec.to_slot] = SlotInfo(
            status=SlotStatus.GOOD, bundle=rec.bundle, committed_at=self.clock()
        )
        figures["flip_to_commit_s"] = time.monotonic() - t0
        figures["agent_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        env = self._hook_env(rec)
        report = self._finish(
            state, Outcome.COMMITTED, f"{rec.bundle.name} {rec.bundle.version} committed", figures
        )
        self._hooks(cfg).notify("after-commit", env)  # committed whatever it says
        return report

    def _rollback(self, state: AgentState, reason: str, figures: dict[str, Any]) -> InstallReport:
        rec = state.install
        assert rec is not None
        rec.reason = reason
        rec.figures = figures
        self._enter(state, Phase.ROLLING_BACK)
        return self._finish_rollback(state)

    def _finish_rollback(self, state: AgentState) -> InstallReport:
        rec = state.install
        assert rec is not None
        self.dev.slots.activate(rec.from_slot)
        faults.checkpoint("after:pointer-back")
        if not rec.manual:
            state.slots[rec.to_slot] = SlotInfo(status=SlotStatus.BAD, bundle=rec.bundle)
        prev = state.slots[rec.from_slot] if rec.from_slot else None
        back = prev.bundle if prev else None
        where = f"back on {back.name} {back.version}" if back else "no model active"
        env = self._hook_env(rec)
        if prev is not None and back is not None and prev.status is not SlotStatus.GOOD:
            where += f", whose slot is {prev.status.value}: nothing is served until a reinstall commits"
        report = self._finish(state, Outcome.ROLLED_BACK, f"{rec.reason} ({where})", rec.figures)
        why = {"TIDEGATE_HOOK_REASON": rec.reason or ""}
        self._hooks(self.dev.load_config()).notify("on-rollback", {**env, **why})
        return report

    # ---- recover and rollback ----------------------------------------------------------------------

    def recover(self) -> InstallReport | None:
        """What a boot runs: finish or undo whatever an interrupted install left."""
        with self.dev.locked():
            cfg = self.dev.load_config()
            state = self.dev.state.load()
            rec = state.install
            if rec is None:
                return None
            if rec.phase in (Phase.FLIPPED, Phase.SELF_TESTING):
                rec.boots += 1
            self.dev.state.save(state)  # count this restart before acting on it
            step = recovery_step(
                state, max_trial_boots=cfg.max_trial_boots, max_transitions=cfg.max_transitions
            )
            if step is RecoveryStep.ABANDON:
                return self._abandon(
                    state,
                    f"interrupted while {rec.phase.value}; the active slot was not touched",
                    rec.figures,
                    keep_download=True,
                )
            if step is RecoveryStep.ROLLBACK:
                if rec.phase is Phase.ROLLING_BACK:
                    return self._finish_rollback(state)
                why = (
                    f"trial interrupted {rec.boots} times (limit {cfg.max_trial_boots})"
                    if rec.boots > cfg.max_trial_boots
                    else f"state loop: {rec.transitions} transitions (limit {cfg.max_transitions})"
                )
                return self._rollback(state, why, rec.figures)
            try:  # the slot was written by an earlier boot: check every byte again
                slot = self.dev.slots.slot_dir(rec.to_slot)
                verify_tree(slot, BundleManifest.from_json_bytes((slot / MANIFEST_NAME).read_bytes()))
            except (TidegateError, OSError) as exc:
                return self._rollback(state, f"slot {rec.to_slot} damaged after the flip: {exc}", rec.figures)
            self.dev.slots.activate(rec.to_slot)  # re-assert a flip that may not have landed
            return self._trial(state, cfg)

    def _damage(self, slot: str) -> str | None:
        """Why a committed slot no longer matches its signed manifest (None: every byte does)."""
        path = self.dev.slots.slot_dir(slot)
        try:
            verify_tree(path, BundleManifest.from_json_bytes((path / MANIFEST_NAME).read_bytes()))
        except (TidegateError, OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def verify(self, *, repair: bool = False) -> dict[str, Any]:
        """Check the active slot at rest against its signed manifest (every file's size and
        SHA-256). Damage marks the slot invalid; with `repair`, a good other slot that also
        verifies becomes active. What cannot be repaired here says what to reinstall."""
        with self.dev.locked():
            state = self.dev.state.load()
            active = self.dev.slots.active()
            if active is None or state.slots[active].bundle is None:
                return {"active_slot": active, "ok": True, "reason": "no model installed", "repaired": None}
            info = state.slots[active]
            assert info.bundle is not None
            damage = self._damage(active)
            out: dict[str, Any] = {
                "active_slot": active,
                "version": info.bundle.version,
                "ok": damage is None,
                "reason": damage or "every file matches the signed manifest",
                "repaired": None,
            }
            if damage is None:
                return out
            info.status = SlotStatus.INVALID
            self.dev.state.save(state)
            back = other(active)
            prev = state.slots[back]
            if (
                repair
                and prev.status is SlotStatus.GOOD
                and prev.bundle is not None
                and self._damage(back) is None
            ):
                self.dev.slots.activate(back)
                out["repaired"] = f"switched to slot {back} ({prev.bundle.name} {prev.bundle.version})"
                out["active_slot"], out["version"] = back, prev.bundle.version
            else:
                out["repaired"] = None
                out["reinstall"] = info.bundle.target
            return out

    def rollback(self) -> InstallReport:
        """Go back to the other committed slot (an operator's decision)."""
        with self.dev.locked():
            state = self.dev.state.load()
            if state.install is not None:
                raise InstallInProgressError("an install is in progress; run 'tidegate agent recover' first")
            active = self.dev.slots.active()
            back = other(active)
            prev = state.slots[back]
            if active is None or prev.status is not SlotStatus.GOOD or prev.bundle is None:
                raise NothingToRollBackToError(f"slot {back} holds no committed version to go back to")
            now = self.clock()
            state.install = InstallRecord(
                id=uuid.uuid4().hex,
                phase=Phase.IDLE,
                target=prev.bundle.target,
                bundle=prev.bundle,
                repository="",
                from_slot=back,
                to_slot=active,
                started_at=now,
                updated_at=now,
                manual=True,
                reason="rolled back by operator",
            )
            self._enter(state, Phase.ROLLING_BACK)
            return self._finish_rollback(state)

    def status(self) -> dict[str, Any]:
        cfg = self.dev.load_config()
        state = self.dev.state.load()
        active = self.dev.slots.active()
        bundle = state.slots[active].bundle if active else None
        return {
            "device_id": cfg.device_id,
            "sku": cfg.sku,
            "agent_version": self.agent_version,
            "active_slot": active,
            "active_version": bundle.version if bundle else None,
            "state": state.phase.value,
            "slots": {k: v.model_dump(mode="json") for k, v in state.slots.items()},
            "install": state.install.model_dump(mode="json") if state.install else None,
            "last_result": state.last_result.model_dump(mode="json") if state.last_result else None,
        }
