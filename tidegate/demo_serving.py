"""The cloud part of `tidegate demo` (step 6): `tidegate serve` as its own process, driven
over HTTP with synthetic traffic: a shadow of the new model, its canary promoted by the
gates, an A/B test that reaches a decision (`ab_summary.json`); then the drift job on the
classifier's inputs and an alert that moves a failing model to its fallback."""

from __future__ import annotations

import json
import os
import random
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from shared.errors import TidegateError
from shared.net import free_port
from shared.procs import stop_process

Say = Callable[[str, str], None]
MODEL = "classifier"
CLASSES = ["pedestrian", "car", "cyclist", "truck"]
# The shadow's budgets: overall agreement, and per class and slice (the seed's example).
BUDGETS = [
    {
        "metric": "recall_delta",
        "class": "pedestrian",
        "slice": "time=night",
        "bound": 0.015,
        "min_samples": 50,
    },
    {"metric": "recall_delta", "class": "pedestrian", "bound": 0.03, "min_samples": 100},
]


@contextmanager
def running_gateway(d: Path, say: Say) -> Iterator[tuple[httpx.Client, httpx.Client, Path]]:
    """The gateway process on a free port; (caller client, admin client, failure dir)."""
    from builder.samples import make_classifier, make_nan_classifier
    from cloud_serving.app import keygen

    d.mkdir(parents=True, exist_ok=True)
    for seed, version in ((0, "1.0.0"), (1, "1.1.0"), (2, "1.2.0")):
        make_classifier(d / f"{version}.onnx", seed=seed)
    make_classifier(d / "1.0.1.onnx", seed=0, jitter=0.003)  # a retrain that agrees with 1.0.0
    make_nan_classifier(d / "broken.onnx")
    key, key_hash = keygen()
    admin, admin_hash = keygen()
    failures = d / "failures"
    # Shadows run on a shadow worker, a process of their own (in production: other capacity);
    # the key the gateway and the worker share is made for this run.
    worker_port = free_port()
    env = {**os.environ, "TIDEGATE_SHADOW_AUTHKEY": secrets.token_hex(24)}
    (d / "serving.toml").write_text(
        f"""[gateway]
api_keys_sha256 = ["{key_hash}"]
admin_keys_sha256 = ["{admin_hash}"]
failure_dir = "{failures}"
tick_s = 0.25
shadow_worker = "127.0.0.1:{worker_port}"

[models.{MODEL}]
production = "1.0.0"
scores_output = "probabilities"
task = {{ classes = {json.dumps(CLASSES)} }}
versions."1.0.0".path = "1.0.0.onnx"
versions."1.0.1".path = "1.0.1.onnx"
versions."1.1.0".path = "1.1.0.onnx"
versions."1.2.0".path = "1.2.0.onnx"

[models.guarded]
production = "broken"
versions.broken.path = "broken.onnx"
fallback = {{ outputs = {{ probabilities = [0.25, 0.25, 0.25, 0.25] }} }}

[[models.guarded.alerts]]
name = "model-errors"
window_s = 60
short_window_s = 10
min_samples = 20
action = "fallback"
"""
    )
    port = free_port()
    log = (d / "gateway.log").open("wb")
    worker_log = (d / "shadow-worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "tidegate", "serve", "shadow-worker", "--port", str(worker_port)],
        cwd=d,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidegate", "serve", "--config", str(d / "serving.toml"), "--port", str(port)],
        cwd=d,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    caller = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    operator = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise TidegateError(f"the gateway exited with {proc.returncode}; see {d / 'gateway.log'}")
            try:
                if caller.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TidegateError("the gateway did not answer /healthz within 60 s")
            time.sleep(0.1)
        while "shadow worker on" not in (d / "shadow-worker.log").read_text():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise TidegateError(f"the shadow worker did not start; see {d / 'shadow-worker.log'}")
            time.sleep(0.1)
        say(
            "gateway",
            f"tidegate serve up at {url} (pid {proc.pid}): {MODEL} 1.0.0 in production; shadows run "
            f"on tidegate serve shadow-worker (pid {worker.pid}), off the gateway's process",
        )
        yield caller, operator, failures
    finally:
        caller.close()
        operator.close()
        stop_process(proc, grace_s=15)
        stop_process(worker, grace_s=5)
        log.close()
        worker_log.close()


def _infer(
    caller: httpx.Client, x: np.ndarray[Any, Any], key: str, metadata: dict[str, str] | None = None
) -> dict[str, Any]:
    r = caller.post(
        f"/v1/models/{MODEL}/infer", json={"inputs": x.tolist(), "key": key, "metadata": metadata or {}}
    )
    if r.status_code != 200:
        raise TidegateError(f"inference: HTTP {r.status_code}: {r.text[:200]}")
    body: dict[str, Any] = r.json()
    return body


def _status(operator: httpx.Client) -> dict[str, Any]:
    body: dict[str, Any] = operator.get(f"/v1/admin/models/{MODEL}").json()
    return body


def _admin(operator: httpx.Client, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    r = operator.post(f"/v1/admin/models/{MODEL}/{path}", json=body)
    if r.status_code >= 400:
        raise TidegateError(f"{path}: HTTP {r.status_code}: {r.text[:300]}")
    out: dict[str, Any] = r.json()
    return out


def _scenes(n: int, seed: int) -> tuple[np.ndarray[Any, Any], list[dict[str, str]]]:
    """Inputs with their request metadata: half at night (feature 0, the scene's brightness,
    low), two regions."""
    x = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    night = np.arange(n) % 2 == 0
    x[:, 0] = np.where(night, -np.abs(x[:, 0]) - 0.5, np.abs(x[:, 0]))
    meta = [{"time": "night" if k else "day", "region": "eu" if i % 3 else "us"} for i, k in enumerate(night)]
    return x, meta


def _shadow(
    caller: httpx.Client,
    operator: httpx.Client,
    version: str,
    x: np.ndarray[Any, Any],
    meta: list[dict[str, str]],
) -> dict[str, Any]:
    """A shadow of `version` on 100 % of traffic until every request is compared; its verdict."""
    _admin(operator, "shadow", {"version": version, "share": 1.0, "max_diff_rate": 0.05, "budgets": BUDGETS})
    for i in range(len(x)):
        assert _infer(caller, x[i], f"car-{i}", meta[i])["version"] == "1.0.0"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        shadow = _status(operator)["shadow"] or {}
        if shadow.get("kpis", {}).get("compared", 0) >= len(x) or not shadow.get("active", True):
            break
        time.sleep(0.2)
    r = operator.delete(f"/v1/admin/models/{MODEL}/shadow")
    out: dict[str, Any] = r.json()
    return out


def _class_table(kpis: dict[str, Any]) -> list[str]:
    """Per class: recall delta overall, by day and by night (from the shadow's KPI rows)."""
    rows = {(r["metric"], r["class"], r["slice"]): r["value"] for r in kpis["rows"]}
    lines = [f"{'class':<11}{'Δ recall':>10}{'day':>9}{'night':>9}"]
    for c in CLASSES:
        cells = [rows.get(("recall_delta", c, s)) for s in (None, "time=day", "time=night")]
        lines.append(f"{c:<11}" + "".join(f"{v:>+9.1%} " if v is not None else f"{'-':>9} " for v in cells))
    return lines


def release_story(d: Path, say: Say) -> dict[str, Any]:
    """Shadow gate (a hotfix refused, a retrain passed) → canary on relative gates → promote →
    A/B with a decision; returns what the summary reports."""
    x, meta = _scenes(600, 0)
    found: dict[str, Any] = {}
    with running_gateway(d, say) as (caller, operator, failures):
        bad = _shadow(caller, operator, "1.1.0", x[:300], meta[:300])
        verdict = bad["verdict"]
        say(
            "gateway",
            f"shadow of hotfix 1.1.0 on 100 % of traffic, on the shadow worker: {bad['compared']} "
            f"compared, argmax agreement {bad['argmax_agreement'] or 0:.2f}; every caller got 1.0.0; "
            f"verdict {verdict['verdict'].upper()}",
        )
        for line in _class_table(bad):
            say("gateway", "  " + line)
        for c in verdict["conditions"]:
            if c["verdict"] == "fail":
                say("gateway", f"  budget failed: {c['reason']}")
        r = operator.post(f"/v1/admin/models/{MODEL}/canary", json={"candidate": "1.1.0"})
        if r.status_code != 409:
            raise TidegateError(f"a canary of the failed hotfix was not refused: HTTP {r.status_code}")
        say("gateway", f"canary of 1.1.0 refused (HTTP 409): {r.json()['detail'][:160]}")
        found["shadow_refused"] = verdict["reason"]

        good = _shadow(caller, operator, "1.0.1", x, meta)
        if good["verdict"]["verdict"] != "pass":
            raise TidegateError(f"the retrain's shadow did not pass: {good['verdict']['reason']}")
        say(
            "gateway",
            f"shadow of retrain 1.0.1: {good['compared']} compared, agreement "
            f"{good['argmax_agreement']:.3f}, pedestrian recall at night within 1.5 %: verdict PASS",
        )
        _admin(
            operator,
            "canary",
            {
                "candidate": "1.0.1",
                "steps": [10, 50, 100],
                "bake_s": 1,
                "min_requests": 20,
                "min_success_rate": 0.99,
                "slo_p95_ms": 250,
                "slo_p99_ms": 500,
                "window_s": 30,
                "max_error_increase": 0.01,
                "max_latency_increase": 1.0,
            },
        )
        say(
            "gateway",
            "canary 1.0.1: 10 % → 50 % → 100 %, each step judged against 1.0.0 over the same window "
            "(error rate: two-proportion test; latency: Mann-Whitney U) and p95 ≤ 250 ms",
        )
        i = 0
        deadline = time.monotonic() + 90
        while _status(operator)["production"] != "1.0.1":
            for _ in range(25):
                _infer(caller, x[i % 600], f"user-{i}", meta[i % 600])
                i += 1
            if time.monotonic() > deadline:
                raise TidegateError(
                    f"the canary of 1.0.1 did not complete within 90 s: {_status(operator)['events'][-2:]}"
                )
        events = [e for e in _status(operator)["events"] if "canary" in e or "advanc" in e]
        for e in events[-3:]:
            say("gateway", e.split(" ", 1)[1][:220])  # without its timestamp
        say("gateway", f"canary promoted after {i} requests: production is 1.0.1")
        _admin(
            operator,
            "experiment",
            {"control": "1.0.1", "treatment": "1.2.0", "baseline_rate": 0.2, "mde": 0.1},
        )
        say("gateway", "A/B test 1.0.1 vs 1.2.0 on a 0-1 reward callers report back (mSPRT, always valid)")
        rng = random.Random(1)
        n = 0
        deadline = time.monotonic() + 120
        while _status(operator)["experiment"] is not None:
            for _ in range(50):
                a = _infer(caller, x[n % 600], f"user-{n}")
                n += 1
                if "arm" in a:
                    reward = float(rng.random() < (0.4 if a["version"] == "1.2.0" else 0.2))
                    caller.post(
                        f"/v1/models/{MODEL}/feedback", json={"request_id": a["request_id"], "reward": reward}
                    )
            if time.monotonic() > deadline:
                raise TidegateError("the A/B test reached no decision within 120 s")
        summary_path = next(failures.parent.glob(f"experiments/{MODEL}-*/ab_summary.json"))
        summary = json.loads(summary_path.read_text())
        lo, hi = summary["confidence_interval"]
        production = _status(operator)["production"]
        say(
            "gateway",
            f"A/B decided after {n} requests: {summary['decision']}, effect {summary['effect']:+.3f} "
            f"(95 % interval {lo:+.3f}..{hi:+.3f}); production is now {production}; {summary_path}",
        )
        found.update(ab_summary=summary_path, production=production, decision=summary["decision"])
        # An alert on a model that fails every request: the gateway moves it to its fallback.
        for j in range(30):
            caller.post("/v1/models/guarded/infer", json={"inputs": x[j].tolist()})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            g = operator.get("/v1/admin/models/guarded").json()
            if g["forced_fallback"]:
                alert = next(e for e in g["events"] if "alert model-errors firing" in e)
                say("alerts", alert.split(" ", 1)[1])
                break
            time.sleep(0.25)
        found["metrics"] = caller.get("/metrics").text.count("\n")
        kpis = operator.get("/v1/admin/kpis").json()
        found["gateway_kpis"] = kpis
    return found


def drift_story(workdir: Path, model: Path, say: Say) -> Path:
    """The drift job on the classifier's inputs: one feature shifted, per region, with the
    labels that arrived (concept drift) and the confidences (calibration)."""
    import onnxruntime as ort

    from shared.drift.job import DriftConfig, run_drift
    from shared.drift.report import write_report

    rng = np.random.default_rng(7)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def table(n: int, shift: float) -> dict[str, np.ndarray[Any, Any]]:
        x = rng.standard_normal((n, 16)).astype(np.float32)
        x[:, 3] += shift
        p = sess.run(None, {"input": x})[0]
        label = np.where(rng.random(n) < 0.8, p.argmax(1), rng.integers(0, 4, n))
        return {
            **{f"f{i}": x[:, i] for i in range(16)},
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
    say(
        "drift",
        f"{'DRIFT' if report.alarm else 'no drift'} over 16 features x 2 regions ({report.tests} tests, "
        f"alpha 0.01 for the job): {report.reasons[0] if report.reasons else '-'}; ECE "
        f"{(report.calibration or {}).get('ece', 0):.3f}; report {paths[1]}",
    )
    return paths[1]
