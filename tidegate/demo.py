"""`tidegate demo`: Tidegate's main job, end to end on one machine, in seven steps.

1. build: a real ONNX classifier through `tidegate build` into fp32 and int8 bundles for two
   SKUs (golden self-test data, SBOM, OCI archive, Greengrass recipe), signed and published
   into a TUF repository; and a defective hotfix whose self-test will fail on the device;
2. bench: the HIL suites on this machine (contract, latency, memory, determinism, a thermal
   soak, the install cycle) with JSON, JUnit and HTML reports;
3. fleet: the fleet server on an embedded Mosquitto, three real agent daemons and a
   simulated fleet; the release registered and its bench report uploaded;
4. rollout: a campaign in gated waves with preconditions (a driving vehicle waits until it
   parks, a blackout window in one vehicle's local time, flat batteries);
5. bad release: the hotfix's campaign, stopped by the gates while the one device that got
   it rolls back by itself; and a tampered bundle refused;
6. cloud: `tidegate serve`: the hotfix refused at the shadow gate (per-class, per-slice
   budgets), a retrain through shadow → canary on gates relative to production → production,
   an A/B test that decides, an alert that switches a failing model to its fallback, and the
   drift job;
7. summary: where every report, receipt and summary is.

Everything runs in `--workdir` (wiped first); Ctrl-C stops every process it started.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from shared.errors import TidegateError

app = typer.Typer(help="Run the end-to-end demonstration on this machine.")
STEPS = 7


def _say(step: str, text: str) -> None:
    typer.echo(f"[{step}] {text}")


@contextmanager
def _step(n: int, title: str, timings: dict[str, float]) -> Iterator[None]:
    typer.secho(f"\n== {n}/{STEPS} {title}", bold=True)
    t0 = time.monotonic()
    yield
    timings[title] = round(time.monotonic() - t0, 1)


def _build(workdir: Path, repo_dir: Path) -> dict[str, Path]:
    """Classifier 1.0.0 for an x86 SKU (fp32, optimised graph) and an arm64 SKU (int8 from
    calibration data), published; and 1.1.0, the hotfix whose golden outputs were exported
    from a different model than the one it ships (its self-test fails on the device)."""
    import numpy as np

    from builder.build import BuildRequest, build
    from builder.catalogue import load_catalogue
    from builder.samples import make_classifier
    from shared.bundle.reader import read_bundle
    from shared.bundle.writer import describe_files, write_bundle
    from shared.trust import UpdateRepository

    src = workdir / "model"
    model = make_classifier(src / "classifier.onnx", seed=0)
    calibration = src / "calibration.npz"
    np.savez(calibration, input=np.random.default_rng(5).standard_normal((256, 16)).astype(np.float32))
    _say("build", f"a trained classifier ({model}) and 256 calibration samples")
    catalogue = load_catalogue()
    result = build(
        BuildRequest(
            model=model,
            name="classifier",
            version="1.0.0",
            skus=["edge-cpu-x86", "edge-cpu-arm64-int8"],
            out=workdir / "build" / "1.0.0",
            calibration=calibration,
            scores_output="probabilities",
            repo=repo_dir,
            lineage={"training_run": "demo-run-1"},
        ),
        catalogue,
    )
    for r in result.skus:
        if r.status != "built" or not r.agreement:
            raise TidegateError(f"classifier 1.0.0 for {r.sku} was refused: {r.reason}")
        kind = "int8 (quantised from the calibration data)" if "int8" in r.sku else "fp32 (optimised graph)"
        _say(
            "build",
            f"classifier 1.0.0 for {r.sku}: {kind}, {r.bundle_size or 0:,} bytes; max |Δ| vs fp32 "
            f"{r.agreement['max_abs_error']:.3g}, top-1 agreement {r.agreement['top1_agreement']:.3f}; "
            "golden self-test data, CycloneDX SBOM, OCI archive, Greengrass recipe",
        )
    for path in result.published:
        _say("repo", f"signed and published {path}")
    hotfix = build(
        BuildRequest(
            model=model,
            name="classifier",
            version="1.1.0",
            skus=["edge-cpu-x86"],
            out=workdir / "build" / "1.1.0",
            calibration=calibration,
            scores_output="probabilities",
        ),
        catalogue,
    )
    built = workdir / "build" / "1.1.0" / "edge-cpu-x86" / str(hotfix.skus[0].bundle)
    staging = workdir / "build" / "1.1.0-hotfix"
    manifest = read_bundle(built, staging)
    golden = staging / manifest.self_test.outputs
    with np.load(golden) as f:
        shifted = {k: f[k] + 0.3 for k in f.files}  # outputs of some other model
    with golden.open("wb") as fh:
        np.savez(fh, **shifted)
    sources = {f.path: staging / f.path for f in manifest.files}
    bad = workdir / "build" / "classifier-1.1.0-edge-cpu-x86.bundle"
    write_bundle(
        bad, manifest.model_copy(update={"files": describe_files(sources)}), sources, compression="zstd"
    )
    UpdateRepository(repo_dir).add_bundle(bad)
    _say("repo", "signed and published classifier 1.1.0 for edge-cpu-x86: a hotfix whose self-test will fail")
    good = workdir / "build" / "1.0.0" / "edge-cpu-x86" / str(result.skus[0].bundle)
    return {"good": good, "bad": bad, "sbom": good.parent / "sbom.cdx.json", "oci": good.parent}


def _bench(workdir: Path, bundle: Path, repo_dir: Path) -> dict[str, Any]:
    """The HIL bench on this machine (the local target; a simulated thermal zone)."""
    import asyncio

    from hil import runner
    from hil.report import write_all
    from hil.targets import LocalTarget
    from shared.benchreport import generate, key_id, load_private, public_text

    key_path = workdir / "bench-host.key"
    public = generate(key_path)
    _say("hil", f"a bench host key (ed25519, id {key_id(public)}; the fleet server is told its public half)")
    target = LocalTarget()
    options = {
        "repo": str(repo_dir),
        "sku": "edge-cpu-x86",
        "latency": {"runs": 100},
        "thermal": {"soak_s": 6.0},
    }
    report, manifest = runner.start(bundle, target, "full", options)
    asyncio.run(runner.run(report, manifest, bundle, target))
    for c in report.preflight["checks"]:
        _say("hil", f"pre-flight {c['name']}: {'ok' if c['passed'] else 'FAILED'}: {c['detail']}")
    write_all(report, workdir / "hil-report", load_private(key_path))
    for r in report.results:
        _say("hil", f"{r.name}: {r.status}: {r.reason}")
    if not report.passed:
        raise TidegateError("the bench failed on this machine; see hil-report/report.html")
    _say(
        "hil",
        f"every suite passed; reports in {workdir / 'hil-report'} (report.json, junit.xml, report.html)",
    )
    signed: dict[str, Any] = json.loads((workdir / "hil-report" / "report.json").read_text())
    signed["_public_key"] = public_text(public)
    return signed


def _tamper(workdir: Path, repo_dir: Path) -> None:
    """A byte flipped in a published bundle on a mirror: the device-side client refuses it."""
    from shared.trust import HashMismatchError, TrustClient

    tampered = workdir / "tampered-mirror"
    shutil.copytree(repo_dir, tampered, ignore=shutil.ignore_patterns("keys"))
    victim = next((tampered / "targets").rglob("*.bundle"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    client = TrustClient(
        repository=tampered,
        trusted_root=(repo_dir / "metadata" / "1.root.json").read_bytes(),
        cache_dir=workdir / "tamper-cache",
    )
    info = next(t for t in client.targets() if victim.name.startswith(t.sha256))
    try:
        client.download(info, workdir / "tamper-cache" / "got.bundle")
    except HashMismatchError as exc:
        _say("tamper", f"a byte flipped in {info.path} on a mirror: refused ({type(exc).__name__})")
        return
    raise TidegateError("a tampered bundle was accepted: this is a bug")


def _run(workdir: Path, keep_running: bool) -> dict[str, Any]:
    from fleet_server.broker import EmbeddedBroker
    from hil.report import attach
    from shared.trust import UpdateRepository
    from tidegate import demo_fleet, demo_serving

    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"workdir": str(workdir.resolve()), "timings_s": timings}
    with _step(1, "build, sign and publish", timings):
        repo_dir = workdir / "repository"
        offline = workdir / "offline-keys"
        repo = UpdateRepository.init(repo_dir, offline_dir=offline, root_keys=3, root_threshold=2)
        repo = UpdateRepository(repo_dir)  # from here on, only what the fleet server holds
        _say(
            "repo",
            f"a TUF repository: root (3 keys, threshold 2) and targets offline in {offline.name}/; "
            f"the server holds snapshot, timestamp and the delegated role 'release' ({repo_dir.name}/keys)",
        )
        bundles = _build(workdir, repo_dir)
    with _step(2, "bench the release on this machine (HIL)", timings):
        report = _bench(workdir, bundles["good"], repo_dir)
    try:
        EmbeddedBroker(workdir / "probe")
    except TidegateError as exc:
        raise TidegateError(f"the fleet needs Mosquitto: {exc}") from exc
    public = report.pop("_public_key")
    with demo_fleet.running_fleet(workdir, repo, _say, bench_keys={"demo-bench": public}) as fleet:
        with _step(3, "fleet server, real agents and a simulated fleet", timings):
            demo_fleet.announce(fleet, _say)
            good = demo_fleet.register_release(fleet, bundles["good"], _say)
            attached = attach(fleet.http, report)
            _say(
                "hil", f"bench report {attached['id']} attached to classifier 1.0.0: the campaign gate opens"
            )
            demo_fleet.start_devices(fleet, repo, _say, simulated=200)
        with _step(4, "a campaign in gated waves with preconditions", timings):
            rollout = demo_fleet.rollout(fleet, good, _say)
        with _step(5, "a bad release, stopped by the gates and rolled back on the device", timings):
            bad = demo_fleet.register_release(fleet, bundles["bad"], _say)
            stopped = demo_fleet.bad_release(fleet, bad, good["version"], _say)
            _tamper(workdir, repo_dir)
        records = demo_fleet.export_records(fleet, workdir / "records")
        with _step(6, "the cloud gateway: shadow gate, canary, A/B, alerts, drift", timings):
            cloud = demo_serving.release_story(workdir / "serving", _say)
            drift = demo_serving.drift_story(workdir, workdir / "serving" / "1.0.0.onnx", _say)
        with _step(7, "summary", timings):
            summary.update(
                rollout={"campaign": rollout["id"], "state": rollout["state"], "waves": rollout["waves"]},
                bad_release={"campaign": stopped["id"], "paused_reason": stopped["paused_reason"]},
                gateway={
                    "production": cloud["production"],
                    "ab_decision": cloud["decision"],
                    "shadow_refused": cloud["shadow_refused"],
                },
                files={
                    "bundles and SBOM, OCI archive, Greengrass recipe": str(bundles["oci"]),
                    "update repository (TUF)": str(repo_dir),
                    "HIL report": str(workdir / "hil-report" / "report.html"),
                    **{k: str(v) for k, v in records.items()},
                    "gateway failure bundles and captures": str(workdir / "serving" / "failures"),
                    "ab_summary.json": str(cloud["ab_summary"]),
                    "drift report": str(drift),
                    "dashboard": fleet.dashboard,
                },
            )
            for what, where in summary["files"].items():
                _say("summary", f"{what}: {where}")
            (workdir / "demo-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            _say("summary", f"this summary as JSON: {workdir / 'demo-summary.json'}")
        if keep_running:
            _say("fleet", f"the fleet server and its dashboard stay up: {fleet.dashboard}  (Ctrl-C to stop)")
            while True:
                time.sleep(3600)
    return summary


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.callback(invoke_without_command=True)
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes everything (wiped first).")] = Path(
        ".demo"
    ),
    keep_running: Annotated[
        bool, typer.Option(help="Leave the fleet server and dashboard up at the end.")
    ] = False,
) -> None:
    """Build, bench, publish; roll a release out to a fleet in gated waves; stop a bad one;
    release a model through the cloud gateway. Ctrl-C stops everything."""
    t0 = time.monotonic()
    workdir = workdir.resolve()  # the gateway and the agents run with other working directories
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    # The services log warnings as JSON lines in production; here the story is the output.
    # Quiet on the console (a handler on the root means Python's last-resort printer is never
    # used), while the agents' own log tails still see their lines for their receipts.
    logging.getLogger().addHandler(logging.NullHandler())
    logging.getLogger("tidegate").setLevel(logging.INFO)
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop: the same clean exit
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background by a shell
        signal.signal(signal.SIGINT, _interrupt)
    try:
        _run(workdir, keep_running)
    except KeyboardInterrupt as exc:
        typer.echo("\n[demo] interrupted: every process the demo started has been stopped", err=True)
        raise typer.Exit(130) from exc
    _say("done", f"finished in {time.monotonic() - t0:.0f} s; everything is under {workdir.resolve()}")
