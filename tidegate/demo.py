"""`tidegate demo`: the story of what Tidegate can do so far, on one machine.

It grows with each capability; today: a real model packed into a bundle,
signed and published into a TUF repository, served over HTTP, verified and
fetched as a device would, keys rotated without stranding old clients, an A/B
device that installs, rolls a bad model back by itself and survives a power
cut mid-write, tampering refused, and a rollout plan advanced by the gate
engine.
"""

import json
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from shared.bundle import verify_bundle
from shared.bundle.manifest import BundleManifest
from shared.bundle.pack import pack_directory
from shared.errors import TidegateError
from shared.gates import Comparator, Condition, Gate, RolloutPlan, Sample, Step, decide, start
from shared.gates.plan import Action
from shared.trust import HashMismatchError, TrustClient, UpdateRepository
from shared.trust.http import RepoHTTPServer

app = typer.Typer(help="Run the end-to-end demonstration on this machine.")


def _say(step: str, text: str) -> None:
    typer.echo(f"[{step}] {text}")


def _pack(payload: Path, out: Path, *, name: str, version: str, sku: str) -> BundleManifest:
    return pack_directory(
        payload,
        out,
        compression="zstd",
        name=name,
        version=version,
        skus=[sku],
        latency_budget_ms=20.0,
        memory_ceiling_mb=256.0,
    )


def _agent_story(workdir: Path, repo: UpdateRepository, payload: Path, url: str) -> None:
    """A device with A/B slots: install, upgrade, a bad model that rolls itself back, a power cut."""
    import os
    import signal

    import numpy as np

    from agent.device import DeviceConfig, DeviceRoot
    from agent.engine import Agent
    from agent.faults import ENV

    good = workdir / "payload-1.1.0"
    shutil.copytree(payload, good)
    bad = workdir / "payload-1.2.0-bad"
    shutil.copytree(payload, bad)
    golden = bad / "selftest" / "outputs.npz"
    with np.load(golden) as f:
        shifted = {k: f[k] + 0.25 for k in f.files}
    with golden.open("wb") as fh:
        np.savez(fh, **shifted)
    for version, src in (("1.1.0", good), ("1.2.0", bad), ("1.3.0", good)):
        out = workdir / "bundles" / f"classifier-{version}-edge-cpu-x86.bundle"
        _pack(src, out, name="classifier", version=version, sku="edge-cpu-x86")
        repo.add_bundle(out)
    _say("repo", "published classifier 1.1.0, 1.2.0 (golden outputs do not match its model) and 1.3.0")

    root = workdir / "vehicle-1"
    DeviceRoot.provision(
        root,
        DeviceConfig(device_id="vehicle-1", sku="edge-cpu-x86"),
        (repo.metadata_dir / "1.root.json").read_bytes(),
    )
    _say("agent", f"provisioned vehicle-1 (edge-cpu-x86) with A/B slots in {root}")
    for version in ("1.0.0", "1.1.0"):
        r = Agent(root).install(repository=url, target=f"classifier/{version}/edge-cpu-x86.bundle")
        st = r.figures.get("self_test", {})
        _say(
            "agent",
            f"{r.outcome.value}: {r.reason} (self-test p95 {st.get('p95_ms', 0):.2f} ms, "
            f"peak {st.get('peak_rss_mb', 0):.0f} MB)",
        )
    r = Agent(root).install(repository=url, target="classifier/1.2.0/edge-cpu-x86.bundle")
    _say("agent", f"{r.outcome.value}: {r.reason}")

    pid = os.fork()
    if pid == 0:  # a power cut in the middle of writing 1.3.0 into the inactive slot
        os.environ[ENV] = "after:writing"
        try:
            Agent(root).install(repository=url, target="classifier/1.3.0/edge-cpu-x86.bundle")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    rec = Agent(root).recover()
    assert rec is not None
    _say("agent", f"power cut while writing 1.3.0; on boot, recover: {rec.reason}")
    r = Agent(root).install(repository=url, target="classifier")
    _say("agent", f"the job retried: {r.outcome.value}: {r.reason}")
    now_running = Agent(root).status()
    slots = ", ".join(
        f"{k}={v['status']} {v['bundle']['version'] if v['bundle'] else ''}".strip()
        for k, v in now_running["slots"].items()
    )
    _say(
        "agent",
        f"vehicle-1 runs {now_running['active_version']} from slot {now_running['active_slot']} ({slots})",
    )


def _build_story(workdir: Path, repo_dir: Path) -> None:
    """`tidegate build`: a two-output detector to three SKUs; the TensorRT one needs a GPU."""
    import numpy as np

    from builder.build import BuildRequest, build
    from builder.catalogue import load_catalogue
    from builder.samples import make_detector

    model = make_detector(workdir / "detector" / "detector.onnx")
    cal = workdir / "detector" / "calibration.npz"
    np.savez(cal, image_features=np.random.default_rng(5).standard_normal((128, 32)).astype(np.float32))
    result = build(
        BuildRequest(
            model=model,
            name="detector",
            version="1.0.0",
            skus=["edge-cpu-x86", "edge-cpu-arm64-int8", "jetson-orin-fp16"],
            out=workdir / "detector" / "build",
            calibration=cal,
            scores_output="scores",
            repo=repo_dir,
            allow_partial_publish=True,
            lineage={"training_run": "demo-run-1"},
        ),
        load_catalogue(),
    )
    for r in result.skus:
        if r.status == "built" and r.agreement:
            _say(
                "build",
                f"detector 1.0.0 for {r.sku}: {r.bundle_size or 0:,} bytes, max |Δ| vs fp32 "
                f"{r.agreement['max_abs_error']:.2g}, top-1 agreement {r.agreement['top1_agreement']:.3f}; "
                "golden self-test data, SBOM (CycloneDX 1.6), OCI archive, Greengrass recipe",
            )
        else:
            _say("build", f"detector 1.0.0 for {r.sku}: refused — {r.reason}")
    for path in result.published:
        _say("build", f"published {path} into the update repository")


def _serving_story(workdir: Path) -> None:
    """The cloud gateway: shadow, a bad canary rolled back by the gates, an A/B test that
    promotes the better version; all in process, with an injected clock for the bake times."""
    import asyncio
    import random

    import numpy as np

    from builder.samples import make_classifier, make_nan_classifier
    from cloud_serving.canary import CanarySpec
    from cloud_serving.config import ServingConfig
    from cloud_serving.experiments import ExperimentSpec
    from cloud_serving.gateway import Gateway
    from cloud_serving.shadow import ShadowBudget

    d = workdir / "serving"
    make_classifier(d / "v1.onnx", seed=0)
    make_classifier(d / "v2.onnx", seed=1)
    bad = make_nan_classifier(d / "v3-bad.onnx")  # loads fine, answers NaN: a broken export
    config = ServingConfig.model_validate(
        {
            "gateway": {"failure_dir": str(d / "failures")},
            "models": {
                "classifier": {
                    "production": "1.0.0",
                    "versions": {
                        v: {"path": str(d / f)}
                        for v, f in (("1.0.0", "v1.onnx"), ("1.1.0", "v2.onnx"), ("1.2.0-bad", bad.name))
                    },
                }
            },
        }
    )
    now = [datetime(2026, 11, 24, 12, 0, tzinfo=UTC)]
    x = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)

    async def main() -> None:
        gw = await Gateway(config, clock=lambda: now[0], seed=0).start(tick=False)
        try:
            gw.start_shadow(
                "classifier", "1.1.0", share=1.0, budget=ShadowBudget(max_diff_rate=1.0, min_samples=10**9)
            )
            for i in range(300):
                await gw.infer("classifier", x[i], key=f"car-{i}")
            shadow = gw.model("classifier").shadow
            for _ in range(300):  # the mirror's process starts in the background
                if shadow is None or shadow.stats.compared >= 300:
                    break
                await asyncio.sleep(0.05)
            k = await gw.stop_shadow("classifier")
            _say(
                "gateway",
                f"shadow of 1.1.0 on 100 % of traffic (its own low-priority process): "
                f"{k['compared']} compared, argmax agreement {k['argmax_agreement'] or 0:.2f}, "
                f"max |Δ| {k['max_abs_diff']:.2f}; callers only ever got 1.0.0",
            )
            gw.start_canary(
                "classifier", "1.2.0-bad", CanarySpec(steps=(5, 25, 100), bake_s=60, min_requests=10)
            )
            for i in range(400):
                answer = await gw.infer("classifier", x[i], key=f"car-{i}")
                assert answer.version == "1.0.0"
            now[0] += timedelta(seconds=5)
            for _model, verdict, bundle in gw.tick():
                _say("gateway", f"canary 1.2.0-bad {verdict} by the gates; failure bundle {bundle}")
            rng = random.Random(1)
            gw.start_experiment(
                "classifier", ExperimentSpec(control="1.0.0", treatment="1.1.0", baseline_rate=0.2, mde=0.1)
            )
            for i in range(5000):
                a = await gw.infer("classifier", x[i % 500], key=f"user-{i}")
                if a.request_id:
                    gw.feedback(
                        "classifier",
                        a.request_id,
                        float(rng.random() < (0.4 if a.version == "1.1.0" else 0.2)),
                    )
                if i % 250 == 249 and (ended := gw.tick()):
                    summary = json.loads(ended[0][2].read_text())  # type: ignore[union-attr]
                    lo, hi = summary["confidence_interval"]
                    _say(
                        "gateway",
                        f"A/B 1.0.0 vs 1.1.0 after {i + 1} requests: {summary['decision']}, effect "
                        f"{summary['effect']:+.3f} (always-valid 95 % interval {lo:+.3f}..{hi:+.3f}); "
                        f"production is now {gw.model('classifier').production}",
                    )
                    break
        finally:
            await gw.stop()

    asyncio.run(main())


def _observability_story(workdir: Path) -> None:
    """Drift on the classifier's inputs (a shifted feature, per region, with calibration) and
    an alert that switches a failing model to its fallback, notified in the decision log."""
    import asyncio

    import numpy as np
    import onnxruntime as ort

    from cloud_serving.config import ServingConfig
    from cloud_serving.gateway import Gateway
    from shared.drift.job import DriftConfig, run_drift
    from shared.drift.report import write_report

    d = workdir / "serving"
    rng = np.random.default_rng(7)
    sess = ort.InferenceSession(str(d / "v1.onnx"), providers=["CPUExecutionProvider"])

    def table(n: int, shift: float) -> dict[str, np.ndarray]:
        x = rng.standard_normal((n, 16)).astype(np.float32)
        x[:, 3] += shift
        p = sess.run(None, {"input": x})[0]
        label = np.where(rng.random(n) < 0.8, p.argmax(1), rng.integers(0, 4, n))
        cols = {f"f{i}": x[:, i] for i in range(16)}
        return {
            **cols,
            "region": rng.choice(np.array(["eu", "us"]), n),
            "prediction": p.argmax(1),
            "label": label,
            "confidence": p.max(1),
        }

    report = run_drift(
        table(4000, 0.0),
        table(4000, 0.6),
        DriftConfig(slice_by="region", label="label", prediction="prediction", confidence="confidence"),
    )
    paths = write_report(report, workdir / "drift")
    _say(
        "drift",
        f"{'DRIFT' if report.alarm else 'no drift'} over 16 features x 2 regions ({report.tests} tests, "
        f"alpha 0.01 for the job): {report.reasons[0] if report.reasons else '-'}; ECE "
        f"{(report.calibration or {}).get('ece', 0):.3f}; report {paths[1]}",
    )

    config = ServingConfig.model_validate(
        {
            "gateway": {"failure_dir": str(d / "failures")},
            "models": {
                "guarded": {
                    "production": "1.2.0-bad",
                    "versions": {"1.2.0-bad": {"path": str(d / "v3-bad.onnx")}},
                    "fallback": {"outputs": {"probabilities": [0.25, 0.25, 0.25, 0.25]}},
                    "alerts": [
                        {
                            "name": "model-errors",
                            "window_s": 60,
                            "short_window_s": 10,
                            "min_samples": 20,
                            "action": "fallback",
                        }
                    ],
                }
            },
        }
    )

    async def main() -> None:
        gw = await Gateway(config, seed=0).start(tick=False)
        try:
            x = rng.standard_normal((30, 16)).astype(np.float32)
            for i in range(30):
                await gw.infer("guarded", x[i])
            gw.tick()
            alert = next(e for e in gw.status("guarded")["events"] if "alert model-errors firing" in e)
            _say("alerts", alert.split(" ", 1)[1])
        finally:
            await gw.stop()

    asyncio.run(main())


def _fleet_story(workdir: Path, repo: UpdateRepository, keep_running: bool) -> None:
    from fleet_server.broker import EmbeddedBroker
    from tidegate.demo_fleet import run_fleet

    try:
        EmbeddedBroker(workdir / "probe")  # is there a Mosquitto to embed?
    except TidegateError as exc:
        _say("fleet", f"skipped: {exc}")
        return
    bundle = workdir / "bundles" / "classifier-1.3.0-edge-cpu-x86.bundle"
    run_fleet(workdir, repo, bundle, _say, keep_running=keep_running)


@app.callback(invoke_without_command=True)
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes everything (wiped first).")] = Path(
        ".demo"
    ),
    keep_running: Annotated[
        bool, typer.Option(help="Leave the fleet server and dashboard up at the end.")
    ] = False,
) -> None:
    """Build, sign, publish, serve and verify bundles; install them on an A/B device (a bad one rolls
    itself back, a power cut is recovered); rotate keys; refuse tampering; gate a rollout."""
    t0 = time.monotonic()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    from builder.samples import make_sample_payload  # ONNX loads only for the demo

    payload = make_sample_payload(workdir / "payload")
    _say("build", f"made a real ONNX classifier and golden self-test data in {payload}")

    bundles = []
    for sku in ("edge-cpu-x86", "edge-cpu-arm"):
        out = workdir / "bundles" / f"classifier-1.0.0-{sku}.bundle"
        out.parent.mkdir(parents=True, exist_ok=True)
        m = _pack(payload, out, name="classifier", version="1.0.0", sku=sku)
        bundles.append(out)
        _say(
            "bundle",
            f"packed {m.name} {m.version} for {sku}: {len(m.files)} files, "
            f"{out.stat().st_size} bytes (zstd) -> {out}",
        )

    repo_dir = workdir / "repository"
    repo = UpdateRepository.init(repo_dir, root_keys=3, root_threshold=2)
    trusted_root = (repo_dir / "metadata" / "1.root.json").read_bytes()
    _say("repo", f"initialised a TUF repository (3 root keys, threshold 2) in {repo_dir}")
    for b in bundles:
        t = repo.add_bundle(b)
        _say("repo", f"signed and published {t.path} (sha256 {t.sha256[:12]}…)")
    _build_story(workdir, repo_dir)

    with RepoHTTPServer(repo_dir) as server:
        _say("serve", f"repository served at {server.url} (metadata/ and targets/ only)")
        client = TrustClient(
            repository=server.url, trusted_root=trusted_root, cache_dir=workdir / "device" / "trust"
        )
        target = client.get_target("classifier/1.0.0/edge-cpu-x86.bundle")
        got = client.download(target, workdir / "device" / "download.bundle")
        m = verify_bundle(got)
        _say(
            "device",
            f"verified metadata over HTTP, fetched {target.path} "
            f"({target.length} bytes, hash ok), every file in the bundle checked: {m.name} {m.version}",
        )

        repo.rotate("targets")
        repo.rotate("root")
        repo.refresh()
        client = TrustClient(
            repository=server.url, trusted_root=trusted_root, cache_dir=workdir / "device" / "trust"
        )
        client.refresh()
        _say(
            "rotate",
            f"rotated targets and root keys (root now v{repo.root().version}); a device "
            "holding only root v1 still updated through the root chain",
        )
        _agent_story(workdir, repo, payload, server.url)
    _fleet_story(workdir, repo, keep_running)
    _serving_story(workdir)
    _observability_story(workdir)

    tampered = workdir / "tampered-repository"
    shutil.copytree(repo_dir, tampered, ignore=shutil.ignore_patterns("keys"))
    victim = next((tampered / "targets").rglob("*.bundle"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    evil = TrustClient(
        repository=tampered, trusted_root=trusted_root, cache_dir=workdir / "device" / "trust2"
    )
    info = next(t for t in evil.targets() if victim.name.startswith(t.sha256))
    try:
        evil.download(info, workdir / "device" / "evil.bundle")
        raise TidegateError("tampered target was accepted: this is a bug")
    except HashMismatchError as exc:
        _say("tamper", f"a flipped byte in a published bundle was refused: {type(exc).__name__}")

    now = datetime(2026, 1, 1, tzinfo=UTC)
    gate = Gate(
        (
            Condition("success_rate", Comparator.GE, 0.98, min_samples=50),
            Condition("failure_rate", Comparator.LE, 0.05, min_samples=20),
        ),
        name="wave",
    )
    plan = RolloutPlan(
        tuple(Step(percent=p, bake=timedelta(minutes=30)) for p in (1, 10, 50, 100)), gate=gate
    )
    counts = plan.cumulative_counts(10_000)
    state = start(now)
    _say("gates", f"plan for 10,000 devices: cumulative waves {counts}, 30 min bake each")
    for minute in range(0, 181, 15):
        tick = now + timedelta(minutes=minute)
        executed = min(counts[state.step], 40 + minute * 20)
        snap = {
            "success_rate": [Sample(tick, 0.99, executed)],
            "failure_rate": [Sample(tick, 0.01, executed)],
        }
        d = decide(plan, state, snap, tick)
        if d.action is not Action.HOLD or minute % 60 == 0:
            _say("gates", f"t+{minute:>3} min: {d.action.value:<8} {d.reason}")
        state = d.state
    _say("done", f"finished in {time.monotonic() - t0:.1f}s; everything is under {workdir.resolve()}")
