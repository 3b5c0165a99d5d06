"""The bench run: verify the bundle here, put it on the target, run each suite's probe
there, judge the figures, and keep a report that is written however the run ends (a
Ctrl-C or a lost target leaves a partial report marked incomplete, with the reason)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from builder.catalogue import DEFAULT_CATALOGUE, Sku, load_catalogue
from builder.errors import CatalogueError
from hil import judge, rig
from hil.targets import Target, TargetError, TargetTimeoutError
from shared.bundle import BundleError, BundleManifest, verify_bundle
from shared.errors import TidegateError
from shared.version import TIDEGATE_VERSION

SUITE_PLANS = {
    "smoke": ("contract", "latency", "memory", "determinism"),
    "full": ("contract", "latency", "memory", "determinism", "thermal", "install"),
}
# Each suite also accepts its own name, to rerun one on its own.
PLANS = {**SUITE_PLANS, **{name: (name,) for name in SUITE_PLANS["full"]}}


class HilError(TidegateError):
    """A bench run that cannot start: an unknown suite, a bundle that does not verify."""

    exit_code = 2  # 1 is a suite that failed


class PreflightError(HilError):
    """The rig is not fit to bench this bundle (wrong architecture, no Tidegate, no thermal
    zones to read, …): the run never started. The report says which checks failed."""


@dataclass
class SuiteResult:
    name: str
    status: str  # passed | failed | error | not_run | skipped
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
    started: bool = False  # the pre-flight passed and suites began
    rig: dict[str, Any] = field(default_factory=dict)  # what the probe saw of the target
    preflight: dict[str, Any] = field(default_factory=lambda: {"verdict": "not run", "checks": []})
    bench_host: dict[str, Any] = field(default_factory=dict)
    workdir: str = ""  # the run's scratch space on the target, removed when it ends
    probe: list[str] = field(default_factory=lambda: ["-m", "hil.probe"])  # how the rig runs it

    @property
    def passed(self) -> bool:
        """Every planned suite ran and passed: a skipped or not-run suite is not a pass."""
        plan = PLANS.get(self.suite, ())
        done = {r.name: r.status for r in self.results}
        return self.complete and self.started and all(done.get(name) == "passed" for name in plan)

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
            "rig": {k: self.rig.get(k) for k in ("machine", "os", "cpu_model", "thermal_source")},
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
    """Check what can be checked before touching the target (the rig's own pre-flight comes
    first in `run`)."""
    if suite not in PLANS:
        raise HilError(f"no suite {suite!r}; suites: {', '.join(PLANS)}")
    try:
        manifest = verify_bundle(bundle)
    except BundleError as exc:
        raise HilError(f"{bundle}: bundle failed verification: {exc}") from exc
    sku = options.get("sku") or manifest.skus[0]
    if sku not in manifest.skus:
        raise HilError(f"{bundle.name} is not built for SKU {sku} ({', '.join(manifest.skus)})")
    report = Report(
        bundle={
            "name": manifest.name,
            "version": manifest.version,
            "skus": manifest.skus,
            "file": bundle.name,
            "sha256": _sha256(bundle),
        },
        target=target.name,
        suite=suite,
        sku=sku,
        started_at=datetime.now(UTC).isoformat(),
        options=options,
        bench_host={"tidegate": TIDEGATE_VERSION, "hostname": platform.node()},
    )
    return report, manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sku(name: str, catalogue: Path | None) -> Sku | None:
    try:
        return load_catalogue(catalogue or DEFAULT_CATALOGUE).skus.get(name)
    except CatalogueError as exc:
        raise HilError(f"the SKU catalogue cannot be read: {exc}") from exc


ProgressFn = Callable[[str], None]


async def preflight(report: Report, target: Target, *, catalogue: Path | None = None) -> bool:
    """Ask the rig what it is and judge that against the SKU and the plan: fills
    `report.rig` and `report.preflight`; True when every check passed. The target must be
    connected."""
    done = None
    probe_error = None
    try:
        done = await target.run(
            ["{python}", *report.probe, "preflight", "--params", json.dumps(report.options)],
            timeout_s=PREFLIGHT_TIMEOUT_S,
        )
    except TargetTimeoutError as exc:
        probe_error = str(exc)
    facts = _last_json(done.stdout) if done is not None else None
    if done is not None and (facts is None or "error" in facts):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        probe_error = str(facts["error"]) if facts else f"exit {done.returncode}: {tail[:300]}"
        facts = None
    report.rig = facts or {}
    found = rig.checks(
        facts,
        probe_error=probe_error,
        sku_name=report.sku,
        sku=_sku(report.sku, catalogue),
        plan=PLANS[report.suite],
        options=report.options,
        bench_version=TIDEGATE_VERSION,
    )
    report.preflight = rig.verdict(found)
    return all(c.passed for c in found)


PREFLIGHT_TIMEOUT_S = 60.0


def _last_json(stdout: str) -> dict[str, Any] | None:
    lines = stdout.strip().splitlines()
    try:
        value = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


async def run(
    report: Report,
    manifest: BundleManifest,
    bundle: Path,
    target: Target,
    *,
    progress: ProgressFn = lambda text: None,
    suite_timeout_s: float = 900.0,
    catalogue: Path | None = None,
    probe: Path | None = None,
) -> Report:
    """Pre-flight, then the plan, appending each suite's result to `report` as it finishes;
    the caller writes the report whatever happens (this marks it complete only at the very
    end). A failed pre-flight raises `PreflightError` before any suite; a suite that hangs is
    killed at `suite_timeout_s` and fails alone; whatever did not run is listed as not run.
    `probe` is a self-contained probe (`hil.package`) to copy to the rig and run suites from,
    instead of the rig's installed Tidegate."""
    plan = PLANS[report.suite]
    limits = budgets(manifest, report.options)
    report.budgets = asdict(limits)
    try:
        await target.connect()
    except TargetError as exc:
        report.incomplete_reason = str(exc)
        raise
    report.workdir = target.workdir
    try:
        if probe is not None:
            report.probe = [await target.put(probe)]
        progress("pre-flight: what the rig is, against the SKU and the plan …")
        if not await preflight(report, target, catalogue=catalogue):
            failed = [c for c in report.preflight["checks"] if not c["passed"]]
            report.incomplete_reason = "pre-flight failed: " + "; ".join(
                f"{c['name']}: {c['detail']}" for c in failed
            )
            raise PreflightError(f"{target.name}: {report.incomplete_reason}")
        report.started = True
        remote = await target.put(bundle)
        for i, name in enumerate(plan, 1):
            progress(f"[{i}/{len(plan)}] {name} …")
            t0 = time.monotonic()
            result = await _suite(target, name, remote, report, limits, suite_timeout_s, progress)
            result.duration_s = round(time.monotonic() - t0, 3)
            report.results.append(result)
            progress(f"[{i}/{len(plan)}] {name}: {result.status}: {result.reason}")
    except asyncio.CancelledError:
        report.incomplete_reason = "interrupted (Ctrl-C) before every suite ran"
        raise
    except PreflightError:
        raise
    except TargetError as exc:
        report.incomplete_reason = f"lost the target: {exc}"
        raise
    finally:
        ran = {r.name for r in report.results}
        why = "the run did not start" if not report.started else "the run stopped before it"
        report.results += [SuiteResult(n, "not_run", why, 0.0) for n in plan if n not in ran]
        await asyncio.shield(_close(target))
        report.finished_at = datetime.now(UTC).isoformat()
    report.complete = True
    return report


async def _close(target: Target) -> None:
    with contextlib.suppress(Exception):  # a target already gone: nothing left to clean there
        await target.close()


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

    argv = ["{python}", *report.probe, name, "--bundle", remote_bundle, "--params", json.dumps(params)]
    try:
        done = await target.run([*argv, "--workdir", target.workdir], timeout_s=timeout_s, on_stderr=relay)
    except TargetTimeoutError:
        return SuiteResult(
            name,
            "error",
            f"the probe did not finish within {timeout_s:g} s and was killed (a hung model?)",
            0.0,
        )
    figures = _last_json(done.stdout)
    if not isinstance(figures, dict):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return SuiteResult(name, "error", f"the probe exited {done.returncode} without figures: {tail}", 0.0)
    if "error" in figures:
        return SuiteResult(name, "error", str(figures["error"]), 0.0)
    passed, reason = judge.JUDGES[name](figures, limits)
    return SuiteResult(name, "passed" if passed else "failed", reason, 0.0, figures)
