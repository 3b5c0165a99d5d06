"""The bench run: verify the bundle here, put it on the target, run each suite's probe
there, judge the figures, and keep a report that is written however the run ends (a
Ctrl-C or a lost target leaves a partial report marked incomplete, with the reason)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hil import judge
from hil.targets import Target, TargetError
from shared.bundle import BundleError, BundleManifest, verify_bundle
from shared.errors import TidegateError

SUITE_PLANS = {
    "smoke": ("contract", "latency", "memory", "determinism"),
    "full": ("contract", "latency", "memory", "determinism", "thermal", "install"),
}
# Each suite also accepts its own name, to rerun one on its own.
PLANS = {**SUITE_PLANS, **{name: (name,) for name in SUITE_PLANS["full"]}}


class HilError(TidegateError):
    """A bench run that cannot start: an unknown suite, a bundle that does not verify."""

    exit_code = 2  # 1 is a suite that failed


@dataclass
class SuiteResult:
    name: str
    status: str  # passed | failed | error | skipped
    reason: str
    duration_s: float
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    bundle: dict[str, Any]
    target: str
    suite: str
    sku: str
    started_at: str
    options: dict[str, Any]
    budgets: dict[str, float] = field(default_factory=dict)
    results: list[SuiteResult] = field(default_factory=list)
    finished_at: str | None = None
    complete: bool = False
    incomplete_reason: str | None = None

    @property
    def passed(self) -> bool:
        return self.complete and all(r.status in ("passed", "skipped") for r in self.results)

    def summary(self) -> dict[str, Any]:
        """What goes to the fleet server with the upload: verdicts and headline figures."""
        head: dict[str, Any] = {}
        for r in self.results:
            f = r.figures
            if r.name == "latency" and f:
                head.update(p50_ms=f["p50_ms"], p95_ms=f["p95_ms"], p99_ms=f["p99_ms"])
            if r.name == "memory" and f:
                head["peak_rss_mb"] = f["peak_rss_mb"]
            if r.name == "thermal" and f:
                head.update(max_temp_c=f["max_temp_c"], max_throttle_level=f["max_level"])
        return {
            "passed": self.passed,
            "complete": self.complete,
            "suite": self.suite,
            "target": self.target,
            "verdicts": {r.name: r.status for r in self.results},
            "figures": head,
        }

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "summary": self.summary()}


def budgets(manifest: BundleManifest, options: dict[str, Any]) -> judge.Budgets:
    return judge.Budgets(
        latency_p95_ms=float(options.get("latency_budget_ms") or manifest.self_test.latency_budget_ms),
        memory_ceiling_mb=float(options.get("memory_ceiling_mb") or manifest.self_test.memory_ceiling_mb),
        throttled_factor=float(options.get("throttled_factor", 2.0)),
        max_jitter_fraction=float(options.get("max_jitter_fraction", 0.5)),
    )


def start(bundle: Path, target: Target, suite: str, options: dict[str, Any]) -> tuple[Report, BundleManifest]:
    """Check what can be checked before touching the target."""
    if suite not in PLANS:
        raise HilError(f"no suite {suite!r}; suites: {', '.join(PLANS)}")
    try:
        manifest = verify_bundle(bundle)
    except BundleError as exc:
        raise HilError(f"{bundle}: bundle failed verification: {exc}") from None
    sku = options.get("sku") or manifest.skus[0]
    if sku not in manifest.skus:
        raise HilError(f"{bundle.name} is not built for SKU {sku} ({', '.join(manifest.skus)})")
    report = Report(
        bundle={
            "name": manifest.name,
            "version": manifest.version,
            "skus": manifest.skus,
            "file": bundle.name,
        },
        target=target.name,
        suite=suite,
        sku=sku,
        started_at=datetime.now(UTC).isoformat(),
        options=options,
    )
    return report, manifest


ProgressFn = Callable[[str], None]


async def run(
    report: Report,
    manifest: BundleManifest,
    bundle: Path,
    target: Target,
    *,
    progress: ProgressFn = lambda text: None,
    suite_timeout_s: float = 900.0,
) -> Report:
    """Run the plan, appending each suite's result to `report` as it finishes; the caller
    writes the report whatever happens (this marks it complete only at the very end)."""
    plan = PLANS[report.suite]
    limits = budgets(manifest, report.options)
    report.budgets = asdict(limits)
    try:
        await target.connect()
    except TargetError as exc:
        report.incomplete_reason = str(exc)
        raise
    try:
        remote = await target.put(bundle)
        for i, name in enumerate(plan, 1):
            progress(f"[{i}/{len(plan)}] {name} …")
            t0 = time.monotonic()
            if name == "install" and not report.options.get("repo"):
                result = SuiteResult(
                    name, "skipped", "no --repo given: the install cycle needs the repository", 0.0
                )
            else:
                result = await _suite(target, name, remote, report, limits, suite_timeout_s, progress)
            result.duration_s = round(time.monotonic() - t0, 3)
            report.results.append(result)
            progress(f"[{i}/{len(plan)}] {name}: {result.status}: {result.reason}")
    except asyncio.CancelledError:
        report.incomplete_reason = "interrupted (Ctrl-C) before every suite ran"
        raise
    except TargetError as exc:
        report.incomplete_reason = f"lost the target: {exc}"
        raise
    finally:
        await target.close()
        report.finished_at = datetime.now(UTC).isoformat()
    report.complete = True
    return report


async def _suite(
    target: Target,
    name: str,
    remote_bundle: str,
    report: Report,
    limits: judge.Budgets,
    timeout_s: float,
    progress: ProgressFn,
) -> SuiteResult:
    params = {**report.options.get(name, {}), "sku": report.sku}
    if name == "install":
        params.update(repo=report.options["repo"], trusted_root=report.options.get("trusted_root"))

    def relay(line: str) -> None:
        if line.startswith("progress: "):
            progress(f"    {line.removeprefix('progress: ')}")

    done = await target.run(
        ["{python}", "-m", "hil.probe", name, "--bundle", remote_bundle, "--params", json.dumps(params)],
        timeout_s=timeout_s,
        on_stderr=relay,
    )
    lines = done.stdout.strip().splitlines()
    try:
        figures = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        figures = None
    if not isinstance(figures, dict):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return SuiteResult(name, "error", f"the probe exited {done.returncode} without figures: {tail}", 0.0)
    if "error" in figures:
        return SuiteResult(name, "error", str(figures["error"]), 0.0)
    passed, reason = judge.JUDGES[name](figures, limits)
    return SuiteResult(name, "passed" if passed else "failed", reason, 0.0, figures)
