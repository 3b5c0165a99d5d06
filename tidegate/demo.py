"""`tidegate demo`: the story of what Tidegate can do so far, on one machine.

It grows with each capability; today: a real model packed into a bundle,
signed and published into a TUF repository, served over HTTP, verified and
fetched as a device would, keys rotated without stranding old clients,
tampering refused, and a rollout plan advanced by the gate engine.
"""

import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from builder.samples import make_sample_payload
from shared.bundle import verify_bundle
from shared.bundle.cli import collect_payload
from shared.bundle.manifest import BundleManifest
from shared.bundle.writer import describe_files, write_bundle
from shared.errors import TidegateError
from shared.gates import Comparator, Condition, Gate, RolloutPlan, Sample, Step, decide, start
from shared.gates.plan import Action
from shared.trust import HashMismatchError, TrustClient, UpdateRepository
from shared.trust.http import RepoHTTPServer
from shared.version import TIDEGATE_VERSION

app = typer.Typer(help="Run the end-to-end demonstration on this machine.")


def _say(step: str, text: str) -> None:
    typer.echo(f"[{step}] {text}")


def _pack(payload: Path, out: Path, *, name: str, version: str, sku: str) -> BundleManifest:
    sources = collect_payload(payload)
    manifest = BundleManifest.from_obj(
        {
            "name": name,
            "version": version,
            "skus": [sku],
            "runtime": "onnxruntime",
            "entry_model": "model.onnx",
            "inference_config": "inference_config.json",
            "self_test": {
                "inputs": "selftest/inputs.npz",
                "outputs": "selftest/outputs.npz",
                "latency_budget_ms": 20.0,
                "memory_ceiling_mb": 256.0,
            },
            "files": [f.model_dump() for f in describe_files(sources)],
            "provenance": {"builder_version": TIDEGATE_VERSION, "created": "2026-01-01T00:00:00Z"},
        }
    )
    write_bundle(out, manifest, sources, compression="zstd")
    return manifest


@app.callback(invoke_without_command=True)
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes everything (wiped first).")] = Path(
        ".demo"
    ),
) -> None:
    """Build, sign, publish, serve and verify a bundle; rotate keys; refuse tampering; gate a rollout."""
    t0 = time.monotonic()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
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

    tampered = workdir / "tampered-repository"
    shutil.copytree(repo_dir, tampered, ignore=shutil.ignore_patterns("keys"))
    victim = next((tampered / "targets").rglob("*.bundle"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    evil = TrustClient(
        repository=tampered, trusted_root=trusted_root, cache_dir=workdir / "device" / "trust2"
    )
    info = next(t for t in evil.targets() if victim.name.endswith(t.path.rpartition("/")[2]))
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
