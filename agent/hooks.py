"""Device hooks: scripts the device owner installs, run at four points of an install.

A hook is an executable file in the hooks directory (`hooks_dir` in device.json, e.g.
``/etc/tidegate/hooks.d``) whose name starts with its stage: ``before-download``,
``before-install``, ``after-commit`` or ``on-rollback`` (``before-install.10-park-check``);
a stage's hooks run in name order, each with `hook_timeout_s` (then its process group is
killed). Exit codes, as Mender's state scripts have them: 0 goes on; 21 defers ("retry
later": the install stops before anything changed and is tried again later); any other
refuses the install with the hook's last line of output as the reason. The after-commit and
on-rollback hooks cannot change what happened: their failures are logged. Every line a hook
prints goes to the agent's log. The hook gets the stage and the install in its environment
(``TIDEGATE_HOOK_STAGE``, ``TIDEGATE_HOOK_TARGET``, ``TIDEGATE_HOOK_VERSION``,
``TIDEGATE_HOOK_SLOT``).
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from agent.errors import AgentError, InstallRefusedError

log = logging.getLogger("tidegate.agent.hooks")

STAGES = ("before-download", "before-install", "after-commit", "on-rollback")
RETRY_LATER = 21
MAX_OUTPUT = 16 * 1024


class HookRefusedError(InstallRefusedError):
    """A before-* hook said no (or could not run: not executable, timed out)."""


class HookDeferredError(AgentError):
    """A before-* hook asked to retry later (exit 21)."""


class Verdict(StrEnum):
    CONTINUE = "continue"
    DEFER = "defer"
    REFUSE = "refuse"


@dataclass(frozen=True)
class HookResult:
    verdict: Verdict
    reason: str = ""


class Hooks:
    def __init__(self, directory: Path | None, timeout_s: float = 30.0) -> None:
        self.directory, self.timeout_s = directory, timeout_s

    def scripts(self, stage: str) -> list[Path]:
        """This stage's hooks, in name order; a file that cannot run is an error naming it."""
        assert stage in STAGES, stage
        if self.directory is None or not self.directory.is_dir():
            return []
        found = sorted(
            p for p in self.directory.iterdir() if p.name == stage or p.name.startswith(stage + ".")
        )
        for p in found:
            mode = p.stat().st_mode
            if not stat.S_ISREG(mode) or not os.access(p, os.X_OK):
                raise HookRefusedError(f"hook {p} is not an executable file (chmod +x it, or remove it)")
        return found

    def check(self) -> list[str]:
        """Every problem with the hooks directory (the daemon refuses to start on one)."""
        problems = []
        for stage in STAGES:
            try:
                self.scripts(stage)
            except HookRefusedError as exc:
                problems.append(str(exc))
        return problems

    def run(self, stage: str, env: dict[str, str]) -> HookResult:
        for script in self.scripts(stage):
            result = self._run_one(script, stage, env)
            if result.verdict is not Verdict.CONTINUE:
                return result
        return HookResult(Verdict.CONTINUE)

    def _run_one(self, script: Path, stage: str, env: dict[str, str]) -> HookResult:
        full_env = {**os.environ, **env, "TIDEGATE_HOOK_STAGE": stage}
        proc = subprocess.Popen(
            [str(script)],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: a timeout kills what it started too
        )
        try:
            out, _ = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            log.error("hook %s (%s) killed after %.0f s", script.name, stage, self.timeout_s)
            return HookResult(Verdict.REFUSE, f"hook {script.name} timed out after {self.timeout_s:g} s")
        lines = out[:MAX_OUTPUT].decode(errors="replace").splitlines()
        for line in lines:
            log.info("hook %s: %s", script.name, line)
        last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
        if proc.returncode == 0:
            return HookResult(Verdict.CONTINUE)
        if proc.returncode == RETRY_LATER:
            return HookResult(
                Verdict.DEFER, f"hook {script.name} asked to retry later" + (f": {last}" if last else "")
            )
        return HookResult(
            Verdict.REFUSE,
            f"hook {script.name} refused (exit {proc.returncode})" + (f": {last}" if last else ""),
        )

    def gate(self, stage: str, env: dict[str, str]) -> None:
        """Run a before-* stage: raise to stop the install (deferred or refused)."""
        result = self.run(stage, env)
        if result.verdict is Verdict.DEFER:
            raise HookDeferredError(result.reason)
        if result.verdict is Verdict.REFUSE:
            raise HookRefusedError(result.reason)

    def notify(self, stage: str, env: dict[str, str]) -> None:
        """Run an after-the-fact stage: what it says is logged, never acted on."""
        try:
            result = self.run(stage, env)
        except HookRefusedError as exc:
            log.error("%s", exc)
            return
        if result.verdict is not Verdict.CONTINUE:
            log.warning("%s hook: %s (the install's outcome stands)", stage, result.reason)
