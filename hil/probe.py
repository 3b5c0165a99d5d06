"""The measuring side of a bench suite: runs on the target, in its own process.

``python -m hil.probe SUITE --bundle FILE [--params JSON]`` verifies and unpacks the
bundle, measures, and prints one JSON object on its last stdout line: figures only, no
verdicts (the bench runner judges them against the bundle's budgets, so a rig needs no
policy). Progress goes to stderr as ``progress: ...`` lines. A failure to measure (a bundle
that does not verify, a model that does not load) is ``{"error": "..."}`` with exit 2.

One process per suite: the memory figure is this process's own peak, and a model that
crashes takes only its suite down.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shared.bundle import MANIFEST_NAME, BundleError, BundleManifest, read_bundle
from shared.errors import TidegateError

SUITES = ("contract", "latency", "memory", "determinism", "thermal", "install")
RIG_FILE = Path("/etc/tidegate/rig.toml")  # or $TIDEGATE_RIG_FILE: what a rig declares it stands for


class ProbeError(TidegateError):
    """The suite could not measure (not a failed verdict: no figures at all)."""


def progress(text: str) -> None:
    print(f"progress: {text}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class Model:
    """The bundle's model in ONNX Runtime (one thread: a rig's figure, not a server's)."""

    def __init__(self, payload: Path, manifest: BundleManifest) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        try:
            self.sess = ort.InferenceSession(
                str(payload / manifest.entry_model), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # the runtime's own load errors
            raise ProbeError(f"model failed to load: {str(exc).splitlines()[0][:300]}") from exc
        self.output_names = [o.name for o in self.sess.get_outputs()]
        with np.load(payload / manifest.self_test.inputs) as f:
            self.feeds = {k: f[k] for k in f.files}
        with np.load(payload / manifest.self_test.outputs) as f:
            self.golden = {k: f[k] for k in f.files}

    def run(self, feeds: dict[str, np.ndarray[Any, Any]] | None = None) -> dict[str, np.ndarray[Any, Any]]:
        outs = self.sess.run(self.output_names, feeds if feeds is not None else self.feeds)
        return dict(zip(self.output_names, outs, strict=True))

    def timed(self) -> float:
        t0 = time.perf_counter()
        self.run()
        return (time.perf_counter() - t0) * 1000


def unpack(bundle: Path, dest: Path) -> BundleManifest:
    """Verify and extract, laid out as an agent's slot (payload and `bundle.json`)."""
    try:
        manifest = read_bundle(bundle, dest)
    except BundleError as exc:
        raise ProbeError(f"bundle failed verification: {exc}") from exc
    (dest / MANIFEST_NAME).write_bytes(manifest.to_json_bytes())
    return manifest


# ---- suites ------------------------------------------------------------------------------------

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _dims(shape: list[Any]) -> list[Any]:
    """Symbolic and unknown dimensions compare as "dynamic"."""
    return [d if isinstance(d, int) and d > 0 else "dynamic" for d in shape]


def contract(payload: Path, manifest: BundleManifest, params: dict[str, Any]) -> dict[str, Any]:
    from agent.selftest import selftest_in_process

    declared = json.loads((payload / manifest.inference_config).read_text())
    model = Model(payload, manifest)
    actual = {
        "inputs": [
            {"name": t.name, "dtype": _ORT_TYPES.get(t.type, t.type), "shape": _dims(t.shape)}
            for t in model.sess.get_inputs()
        ],
        "outputs": [
            {"name": t.name, "dtype": _ORT_TYPES.get(t.type, t.type), "shape": _dims(t.shape)}
            for t in model.sess.get_outputs()
        ],
    }
    mismatches: list[str] = []
    for kind in ("inputs", "outputs"):
        want = [{**t, "shape": _dims(t["shape"])} for t in declared.get(kind, [])]
        if [t["name"] for t in want] != [t["name"] for t in actual[kind]]:
            mismatches.append(
                f"{kind}: inference_config names {[t['name'] for t in want]}, "
                f"model {[t['name'] for t in actual[kind]]}"
            )
            continue
        for w, a in zip(want, actual[kind], strict=True):
            if w["dtype"] != a["dtype"]:
                mismatches.append(f"{kind[:-1]} {w['name']!r}: dtype {a['dtype']}, declared {w['dtype']}")
            if w["shape"] != a["shape"]:
                mismatches.append(f"{kind[:-1]} {w['name']!r}: shape {a['shape']}, declared {w['shape']}")
    progress("contract: golden self-test")
    selftest = selftest_in_process(payload)
    # Bad inputs the runtime must refuse rather than answer.
    first = model.sess.get_inputs()[0].name
    good = model.feeds[first]
    bad_inputs: dict[str, dict[str, np.ndarray[Any, Any]]] = {
        "wrong dtype": {first: good.astype(np.float64 if good.dtype != np.float64 else np.float32)},
        "wrong rank": {first: good[..., None]},
        "wrong name": {f"{first}_not_an_input": good},
        "missing input": {},
    }
    refused: dict[str, str | None] = {}
    for label, feeds in bad_inputs.items():
        try:
            model.run(feeds)
            refused[label] = None
        except Exception as exc:  # what we want: the runtime's own refusal
            refused[label] = str(exc).splitlines()[0][:160]
    return {
        "declared": {k: declared.get(k, []) for k in ("inputs", "outputs")},
        "actual": actual,
        "mismatches": mismatches,
        "selftest": {
            "passed": selftest.passed,
            "reason": selftest.reason,
            "max_abs_error": selftest.max_abs_error,
        },
        "bad_inputs_refused": refused,
    }


def latency(payload: Path, manifest: BundleManifest, params: dict[str, Any]) -> dict[str, Any]:
    model = Model(payload, manifest)
    warmup, runs = int(params.get("warmup", 20)), int(params.get("runs", 200))
    for _ in range(warmup):
        model.run()
    times = []
    for i in range(runs):
        times.append(model.timed())
        if i % 100 == 99:
            progress(f"latency: {i + 1}/{runs} runs")
    return {
        "warmup": warmup,
        "runs": runs,
        "p50_ms": percentile(times, 0.50),
        "p95_ms": percentile(times, 0.95),
        "p99_ms": percentile(times, 0.99),
        "max_ms": max(times),
        "latencies_ms": [round(t, 4) for t in times],
    }


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise ProbeError("no VmHWM in /proc/self/status: peak memory cannot be measured here")


def memory(payload: Path, manifest: BundleManifest, params: dict[str, Any]) -> dict[str, Any]:
    before = _peak_rss_mb()
    model = Model(payload, manifest)
    loaded = _peak_rss_mb()
    for _ in range(int(params.get("runs", 50))):
        model.run()
    return {"baseline_mb": before, "after_load_mb": loaded, "peak_rss_mb": _peak_rss_mb()}


def determinism(payload: Path, manifest: BundleManifest, params: dict[str, Any]) -> dict[str, Any]:
    """Identical outputs for identical inputs over repeated runs (fixed seed inputs too), and
    the spread of latency while throttled (paced as the agent paces at level 2)."""
    model = Model(payload, manifest)
    repeats = int(params.get("repeats", 20))
    reference = model.run()
    differing = 0
    rng = np.random.default_rng(int(params.get("seed", 0)))
    first = model.sess.get_inputs()[0].name
    seeded = {first: rng.standard_normal(model.feeds[first].shape).astype(model.feeds[first].dtype)}
    seeded_reference = model.run(seeded)
    for _ in range(repeats):
        got, got_seeded = model.run(), model.run(seeded)
        if any(not np.array_equal(got[k], reference[k]) for k in reference) or any(
            not np.array_equal(got_seeded[k], seeded_reference[k]) for k in seeded_reference
        ):
            differing += 1
    from agent.thermal import PACING_MS

    pacing = PACING_MS[int(params.get("throttle_level", 2))] / 1000
    throttled = []
    for _ in range(int(params.get("throttled_runs", 60))):
        throttled.append(model.timed())
        time.sleep(pacing)
    return {
        "repeats": repeats,
        "differing_runs": differing,
        "throttled_runs": len(throttled),
        "throttled_p50_ms": percentile(throttled, 0.5),
        "throttled_p99_ms": percentile(throttled, 0.99),
        "throttled_jitter_ms": percentile(throttled, 0.99) - percentile(throttled, 0.5),
    }


class SimulatedZone:
    """A fake `/sys/class/thermal/thermal_zone0` warmed by load: a first-order thermal model,
    dT/dt = heat·load − (T − ambient)/tau, written where `SysfsThermal` reads it."""

    def __init__(
        self, root: Path, *, ambient_c: float = 45.0, heat_c_per_s: float = 15.0, tau_s: float = 4.0
    ) -> None:
        self.zone = root / "thermal_zone0"
        self.zone.mkdir(parents=True, exist_ok=True)
        (self.zone / "type").write_text("soc-sim\n")
        self.temp_c, self.ambient_c, self.heat, self.tau = ambient_c, ambient_c, heat_c_per_s, tau_s
        self._write()

    def _write(self) -> None:
        tmp = self.zone / "temp.tmp"
        tmp.write_text(f"{round(self.temp_c * 1000)}\n")
        tmp.replace(self.zone / "temp")

    def step(self, dt_s: float, load: float) -> None:
        self.temp_c += dt_s * (self.heat * load - (self.temp_c - self.ambient_c) / self.tau)
        self._write()


def thermal(payload: Path, manifest: BundleManifest, params: dict[str, Any]) -> dict[str, Any]:
    """Sustained load for `soak_s` under the agent's own throttle policy, sampling the
    hottest zone and the throttle level: the trace shows when throttling engaged."""
    from agent.thermal import SysfsThermal, ThermalPolicy, next_level, throttle_for

    model = Model(payload, manifest)
    soak_s = float(params.get("soak_s", 20.0))
    policy = ThermalPolicy(thresholds_c=tuple(params.get("thresholds_c", (70.0, 80.0, 90.0))))
    sim: SimulatedZone | None = None
    if params.get("thermal_root"):
        root = Path(params["thermal_root"])
    else:  # no sysfs to read on this rig: the simulated zone, warmed by our own load
        root = payload.parent / "simulated-thermal"
        sim = SimulatedZone(root, **params.get("simulation", {}))
    sensor = SysfsThermal(root)
    level = 0
    trace: list[dict[str, Any]] = []
    times_by_level: dict[int, list[float]] = {}
    start = last = time.monotonic()
    idle = 0.0  # seconds spent paced (asleep) since the last model step: the rest is load
    next_sample = start
    while (now := time.monotonic()) - start < soak_s:
        temps = sensor.read()
        hottest = max(temps.values()) if temps else None
        changed = (new := next_level(level, hottest, policy)) != level
        level = new
        limits = throttle_for(level, hottest, policy, base_batch=8, base_concurrency=1)
        times_by_level.setdefault(level, []).append(model.timed())
        if limits.pacing_ms:
            time.sleep(limits.pacing_ms / 1000)
            idle += limits.pacing_ms / 1000
        now = time.monotonic()
        if sim is not None and now - last >= 0.05:
            sim.step(now - last, max(0.0, 1.0 - idle / (now - last)))
            idle, last = 0.0, now
        if now >= next_sample or changed:  # every level change is in the trace, with its reading
            trace.append({"t_s": round(now - start, 3), "temp_c": hottest, "level": level})
            next_sample = now + float(params.get("sample_s", 0.25))
            if len(trace) % 20 == 0:
                progress(f"thermal: {now - start:.0f}/{soak_s:.0f} s, {hottest} °C, throttle level {level}")
    throttled = [t for lvl, ts in times_by_level.items() if lvl > 0 for t in ts]
    seen: list[float] = [p["temp_c"] for p in trace if p["temp_c"] is not None]
    return {
        "soak_s": soak_s,
        "simulated": sim is not None,
        "thresholds_c": list(policy.thresholds_c),
        "max_temp_c": max(seen, default=None),
        "max_level": max((p["level"] for p in trace), default=0),
        "runs_by_level": {str(k): len(v) for k, v in sorted(times_by_level.items())},
        "unthrottled_p95_ms": percentile(times_by_level[0], 0.95) if times_by_level.get(0) else None,
        "throttled_p95_ms": percentile(throttled, 0.95) if throttled else None,
        "trace": trace,
    }


def install(payload: Path, manifest: BundleManifest, params: dict[str, Any], bundle: Path) -> dict[str, Any]:
    """Through the agent, on a scratch device root: install the previous version when the
    repository has one, install this bundle (self-test, commit), roll back, re-install."""
    from agent.device import DeviceConfig, DeviceRoot
    from agent.engine import Agent
    from shared.semver import SemVer
    from shared.trust import TrustClient

    repo = params.get("repo")
    if not repo:
        raise ProbeError("the install cycle needs the update repository (--repo) holding the bundle")
    root_json = Path(params.get("trusted_root") or Path(repo) / "metadata" / "1.root.json")
    try:
        anchor = root_json.read_bytes()
    except OSError as exc:
        raise ProbeError(f"{root_json}: cannot read the trusted root ({exc.strerror})") from exc
    sku = params.get("sku") or manifest.skus[0]
    steps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tidegate-hil-device-", dir=payload.parent) as tmp:
        dev = Path(tmp) / "device"
        DeviceRoot.provision(dev, DeviceConfig(device_id="hil-scratch", sku=sku), anchor)
        agent = Agent(dev)
        client = TrustClient(repository=repo, trusted_root=anchor, cache_dir=Path(tmp) / "cache")
        ours = SemVer.parse(manifest.version)
        older = [
            t
            for t in client.targets()
            if t.tidegate.get("name") == manifest.name
            and sku in t.tidegate.get("skus", [])
            and SemVer.parse(str(t.tidegate.get("version", "0.0.0"))) < ours
        ]
        older.sort(key=lambda t: SemVer.parse(str(t.tidegate["version"])), reverse=True)

        def step(name: str, expect: str | None, action: Callable[[], Any]) -> dict[str, Any]:
            progress(f"install cycle: {name}")
            try:
                report = action()
                outcome, reason = getattr(report, "outcome", None), getattr(report, "reason", "")
                outcome = getattr(outcome, "value", outcome)
            except TidegateError as exc:
                outcome, reason = "error", str(exc)
            st = agent.status()
            return {
                "step": name,
                "outcome": outcome,
                "reason": reason,
                "active_version": st["active_version"],
                "expected_version": expect,
                "as_expected": st["active_version"] == expect and outcome != "error",
                "figures": (st.get("last_result") or {}).get("figures"),
            }

        # The baseline to roll back to: the newest earlier version that commits on this rig
        # (an earlier release that fails its own self-test is noted, not held against this one).
        previous: str | None = None
        skipped: list[dict[str, Any]] = []
        for t in older:
            version, path = str(t.tidegate["version"]), t.path
            got = step(
                "install previous", version, functools.partial(agent.install, repository=repo, target=path)
            )
            if got["as_expected"]:
                steps.append(got)
                previous = version
                break
            skipped.append(got)
        steps.append(
            step("install bundle", manifest.version, lambda: agent.install(repository=repo, bundle=bundle))
        )
        if previous is not None:
            steps.append(step("roll back", previous, agent.rollback))
            steps.append(
                step(
                    "re-install bundle",
                    manifest.version,
                    lambda: agent.install(repository=repo, bundle=bundle),
                )
            )
    return {"sku": sku, "previous_version": previous, "baselines_that_failed": skipped, "steps": steps}


def preflight(params: dict[str, Any]) -> dict[str, Any]:
    """What this rig is, for the bench host's pre-flight (`hil.rig`): no bundle needed."""
    import os
    import platform

    from shared.version import TIDEGATE_VERSION

    facts: dict[str, Any] = {
        "machine": platform.machine(),
        "kernel": platform.release(),
        "os": _os_name(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_mb": _meminfo_mb(),
        **_cgroup_limits(),
        "python": platform.python_version(),
        "tidegate": TIDEGATE_VERSION,
        "onnxruntime": None,
        "onnxruntime_providers": [],
        "tensorrt": None,
    }
    try:
        import onnxruntime as ort

        facts["onnxruntime"], facts["onnxruntime_providers"] = ort.__version__, ort.get_available_providers()
    except ImportError:
        pass
    try:
        import tensorrt

        facts["tensorrt"] = str(tensorrt.__version__)
    except ImportError:
        pass
    root = (params.get("thermal") or {}).get("thermal_root")
    if root:
        from agent.thermal import SysfsThermal

        facts["thermal_zones"] = sorted(SysfsThermal(Path(root)).read())
    facts["thermal_source"] = "thermal zones" if root else "simulated"
    rig = Path(os.environ.get("TIDEGATE_RIG_FILE") or RIG_FILE)
    if rig.is_file():
        import tomllib

        try:
            declared = tomllib.loads(rig.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ProbeError(f"{rig}: not a readable rig file ({exc})") from exc
        facts["rig_name"] = declared.get("name")
        facts["rig_skus"] = [str(s) for s in declared.get("skus", [])]
    return facts


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    import platform

    return platform.platform()


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Model"):
                return value.strip()
    except OSError:
        pass
    return None


def _cgroup_limits(root: Path = Path("/sys/fs/cgroup")) -> dict[str, Any]:
    """The CPU quota and memory limit this process runs under (cgroup v2, else v1), as
    `cpu_limit` and `memory_limit_mb`, None where there is none. In a container rig these are
    the SoC's stand-in figures; /proc/meminfo and os.cpu_count() show the host's."""
    cpu: float | None = None
    mem: float | None = None

    def read(*names: str) -> str | None:
        for name in names:
            with contextlib.suppress(OSError):
                return (root / name).read_text().strip()
        return None

    cpu_max = read("cpu.max")
    if cpu_max is not None:
        quota, _, period = cpu_max.partition(" ")
        if quota.isdigit() and period.isdigit() and int(period):
            cpu = int(quota) / int(period)
    else:
        v1_quota = read("cpu/cpu.cfs_quota_us", "cpu,cpuacct/cpu.cfs_quota_us")
        v1_period = read("cpu/cpu.cfs_period_us", "cpu,cpuacct/cpu.cfs_period_us")
        if v1_quota and v1_period and v1_quota.isdigit() and v1_period.isdigit() and int(v1_period):
            cpu = int(v1_quota) / int(v1_period)  # -1 (no quota) is not digits
    limit = read("memory.max", "memory/memory.limit_in_bytes")
    if limit is not None and limit.isdigit() and int(limit) < 1 << 60:  # v1 says "none" with ~2^63
        mem = round(int(limit) / (1024 * 1024), 1)
    return {"cpu_limit": round(cpu, 3) if cpu else None, "memory_limit_mb": mem}


def _meminfo_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def measure(
    suite: str, bundle: Path | None, params: dict[str, Any], workdir: Path | None = None
) -> dict[str, Any]:
    if suite == "preflight":
        return preflight(params)
    if suite not in SUITES:
        raise ProbeError(f"no suite {suite!r}; suites: {', '.join(SUITES)}")
    if bundle is None:
        raise ProbeError(f"suite {suite} needs --bundle")
    # Under the target's work directory when one is given: a probe killed at its timeout
    # leaves nothing behind that the target's clean-up does not remove.
    with tempfile.TemporaryDirectory(prefix=f"probe-{suite}-", dir=workdir) as tmp:
        payload = Path(tmp) / "payload"
        payload.mkdir()
        manifest = unpack(bundle, payload)
        if suite == "install":
            return install(payload, manifest, params, bundle)
        fn = {"contract": contract, "latency": latency, "memory": memory, "determinism": determinism}.get(
            suite, thermal
        )
        return fn(payload, manifest, params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil.probe")
    parser.add_argument("suite")
    parser.add_argument("--bundle", type=Path, help="the bundle (every suite but preflight)")
    parser.add_argument("--params", default="{}", help="JSON object of suite parameters")
    parser.add_argument("--workdir", type=Path, help="scratch space (default: the system's temp)")
    args = parser.parse_args(argv)
    try:
        result = measure(args.suite, args.bundle, json.loads(args.params), args.workdir)
    except (TidegateError, json.JSONDecodeError) as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
