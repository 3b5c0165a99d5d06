"""Releases judged on the model: shadow verdicts with per-class, per-slice budgets, the canary's
shadow gate, relative canary gates against production, manual judgement, cohort canaries and
one release operation at a time. Seeded defects, each stopped at the right stage with the
reason naming it, on real ONNX models through the real gateway."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from builder.samples import (
    make_classifier,
    make_multibox_detector,
    make_nan_classifier,
    make_trajectory_model,
)
from cloud_serving.app import _hash
from cloud_serving.canary import Canary, CanarySpec
from cloud_serving.config import load_config
from cloud_serving.diffs import (
    SlicedDiff,
    Task,
    TaskSpec,
    displacement,
    greedy_match,
    iou_matrix,
    match_boxes,
)
from cloud_serving.errors import InvalidReleaseError
from cloud_serving.experiments import ExperimentSpec
from cloud_serving.gateway import Gateway
from cloud_serving.release import ALLOWED, Op, ReleaseError, Running, check
from shared.gates import Action
from tests.helpers import ADMIN, KEY, caller
from tests.test_cloud_serving import Clock, serve

CLASSES = ["pedestrian", "car", "cyclist", "truck"]
PEDESTRIAN = 0


@pytest.fixture(scope="module")
def quality_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("quality")
    make_classifier(d / "prod.onnx", seed=0)
    make_classifier(d / "good.onnx", seed=0, jitter=0.003)
    make_classifier(d / "night.onnx", seed=0, dark_penalty=(PEDESTRIAN, 0.15))
    make_classifier(d / "retrained.onnx", seed=0, jitter=0.03)
    make_classifier(d / "slow.onnx", seed=0, extra_work=150_000)
    make_nan_classifier(d / "broken.onnx")
    (d / "detector").mkdir()
    make_multibox_detector(d / "detector" / "prod.onnx", seed=0)
    (d / "detector" / "inference_config.json").write_text(
        json.dumps({"task": "detection", "classes": ["car", "pedestrian", "cyclist"]})
    )
    make_multibox_detector(d / "drift.onnx", seed=0, drift=0.08)
    make_multibox_detector(d / "det_good.onnx", seed=0, jitter=0.002)
    make_trajectory_model(d / "traj.onnx", seed=0)
    make_trajectory_model(d / "traj_long.onnx", seed=0, scale=1.4)
    make_trajectory_model(d / "traj_good.onnx", seed=0, jitter=0.002)
    (d / "serving.toml").write_text(
        f"""
[gateway]
api_keys_sha256 = ["{_hash(KEY)}"]
admin_keys_sha256 = ["{_hash(ADMIN)}"]
failure_dir = "failures"
registry = {{ file = "registry.json" }}

[models.classifier]
production = "1.0.0"
scores_output = "probabilities"
task = {{ classes = {json.dumps(CLASSES)} }}
versions."1.0.0".path = "prod.onnx"
versions."1.0.1".path = "good.onnx"
versions."1.1.0-night".path = "night.onnx"
versions."1.2.0-retrained".path = "retrained.onnx"
versions."1.3.0-slow".path = "slow.onnx"
versions."9.9.9-bad".path = "broken.onnx"

[models.detector]
production = "1.0.0"
scores_output = "scores"
versions."1.0.0".path = "detector/prod.onnx"
versions."1.1.0-drift".path = "drift.onnx"
versions."1.0.1".path = "det_good.onnx"

[models.trajectory]
production = "1.0.0"
task = {{ kind = "trajectory", trajectory_output = "trajectory" }}
versions."1.0.0".path = "traj.onnx"
versions."1.1.0-long".path = "traj_long.onnx"
versions."1.0.1".path = "traj_good.onnx"
"""
    )
    return d


def _scene(i: int, rng: np.random.Generator) -> tuple[np.ndarray[Any, Any], dict[str, str]]:
    """Inputs for the classifier: feature 0 is the scene's brightness, low at night."""
    x = rng.standard_normal(16).astype(np.float32)
    night = i % 2 == 0
    x[0] = -abs(x[0]) - 0.5 if night else abs(x[0])
    return x, {"time": "night" if night else "day", "region": "eu" if i % 3 else "us"}


async def _shadow(
    gw: Gateway,
    client: httpx.AsyncClient,
    model: str,
    version: str,
    body: dict[str, Any],
    inputs: list[tuple[np.ndarray[Any, Any], dict[str, str]]],
) -> dict[str, Any]:
    """Start a shadow, send `inputs`, wait for the mirror to compare them, end it: its KPIs
    and final verdict."""
    r = await client.post(
        f"/v1/admin/models/{model}/shadow",
        json={"version": version, "share": 1.0, **body},
        headers=caller(ADMIN),
    )
    assert r.status_code == 200, r.text
    for i, (x, meta) in enumerate(inputs):
        r = await client.post(
            f"/v1/models/{model}/infer",
            json={"inputs": x.tolist(), "key": f"c{i}", "metadata": meta},
            headers=caller(),
        )
        assert r.status_code == 200 and r.json()["version"] == gw.model(model).production
        if i % 50 == 0:
            await asyncio.sleep(0.01)
    shadow = gw.model(model).shadow
    assert shadow is not None
    for _ in range(1500):
        if shadow.stats.compared + int(shadow.stats.summary["errors"]) >= len(inputs) or not shadow.active:
            break
        await asyncio.sleep(0.02)
    metrics = (await client.get("/metrics")).text
    r = await client.delete(f"/v1/admin/models/{model}/shadow", headers=caller(ADMIN))
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    out["metrics"] = metrics
    return out


NIGHT_BUDGETS = [
    {
        "metric": "recall_delta",
        "class": "pedestrian",
        "slice": "time=night",
        "bound": 0.015,
        "min_samples": 150,
    },
    {"metric": "recall_delta", "class": "pedestrian", "bound": 0.04, "min_samples": 300},
]


def test_a_candidate_fine_overall_but_losing_pedestrians_at_night_fails_its_shadow_and_gets_no_canary(
    quality_models: Path,
) -> None:
    config = load_config(quality_models / "serving.toml")
    rng = np.random.default_rng(3)
    inputs = [_scene(i, rng) for i in range(2000)]

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        out = await _shadow(
            gw, client, "classifier", "1.1.0-night", {"max_diff_rate": 0.05, "budgets": NIGHT_BUDGETS}, inputs
        )
        verdict = out["verdict"]
        assert out["argmax_agreement"] > 0.98  # fine overall
        assert verdict["verdict"] == "fail" and verdict["final"]
        failed = [c for c in verdict["conditions"] if c["verdict"] == "fail"]
        assert len(failed) == 1 and "abs(recall_delta[pedestrian, slice time=night])" in failed[0]["reason"]
        assert failed[0]["observed"] > 0.015
        rows = {(r["metric"], r["class"], r["slice"]): r for r in out["rows"]}
        night = rows[("recall_delta", "pedestrian", "time=night")]
        day = rows[("recall_delta", "pedestrian", "time=day")]
        assert night["value"] < -0.015 and day["value"] == 0.0  # only the night lost pedestrians
        assert (
            'tidegate_shadow_kpi{class="pedestrian",metric="recall_delta",model="classifier",'
            in out["metrics"]
        )
        assert 'slice="time=night",version="1.1.0-night"}' in out["metrics"]
        # no canary without a passing verdict: 409 with the verdict's reasons
        r = await client.post(
            "/v1/admin/models/classifier/canary", json={"candidate": "1.1.0-night"}, headers=caller(ADMIN)
        )
        assert r.status_code == 409
        assert "shadow verdict is fail" in r.json()["detail"] and "time=night" in r.json()["detail"]
        assert r.json()["verdict"]["verdict"] == "fail"
        assert gw.model("classifier").canary is None
        r = await client.post(
            "/v1/admin/models/classifier/canary", json={"candidate": "1.0.1"}, headers=caller(ADMIN)
        )
        assert r.status_code == 409 and "no shadow of 1.0.1 has ended" in r.json()["detail"]
        # an admin may override, and the override is recorded in the events and the model card
        r = await client.post(
            "/v1/admin/models/classifier/canary",
            json={"candidate": "1.1.0-night", "override_reason": "night data mislabelled; INC-42"},
            headers=caller(ADMIN),
        )
        assert r.status_code == 200, r.text
        assert any(
            "shadow gate overridden for 1.1.0-night" in e and "INC-42" in e for e in r.json()["events"]
        )
        r = await client.post(
            "/v1/admin/models/classifier/canary",
            json={"candidate": "1.1.0-night", "override_reason": "again"},
            headers=caller(),
        )
        assert r.status_code == 401  # a caller's key is not an admin's
        await gw.rollback("classifier")
        await gw.flush_registry()
        card = json.loads((quality_models / "registry.json").read_text())["releases"]["classifier"][
            "1.1.0-night"
        ]
        override = next(c for c in card["model_card"] if c["section"] == "override")
        assert override["content"]["reason"] == "night data mislabelled; INC-42"
        assert override["content"]["verdict"]["verdict"] == "fail" and card["stage"] == "candidate"

    serve(config, body)


def test_a_drifting_detector_and_a_long_trajectory_fail_their_task_kpis(quality_models: Path) -> None:
    config = load_config(quality_models / "serving.toml")
    assert config.models["detector"].task.kind == "detection"  # from its inference_config.json
    assert config.models["detector"].task.classes == ["car", "pedestrian", "cyclist"]
    rng = np.random.default_rng(5)
    frames = [(rng.standard_normal(32).astype(np.float32), {"weather": "rain"}) for _ in range(300)]
    histories = [(rng.standard_normal(16).astype(np.float32), {}) for _ in range(300)]
    det_budgets = [
        {"metric": "box_recall_delta", "bound": 0.05, "min_samples": 100},
        {"metric": "mean_iou", "bound": 0.8, "min_samples": 100},
        {"metric": "nms_stability", "bound": 0.95, "min_samples": 100},
    ]
    traj_budgets = [{"metric": "fde_relative", "bound": 0.1, "min_samples": 100}]

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        bad = await _shadow(gw, client, "detector", "1.1.0-drift", {"budgets": det_budgets}, frames)
        assert bad["task"] == "detection" and bad["verdict"]["verdict"] == "fail"
        # the first summary over a budget stops the mirroring: the other budgets failed too, or
        # were still pending on too few frames then
        verdicts = {c["condition"].split(")")[0]: c["verdict"] for c in bad["verdict"]["conditions"]}
        assert verdicts["mean(abs(box_recall_delta"] == "fail", verdicts
        assert verdicts["mean(mean_iou"] in ("fail", "pending") and verdicts["mean(nms_stability"] != "pass"
        rows = {(r["metric"], r["class"], r["slice"]): r for r in bad["rows"]}
        assert rows[("mean_iou", None, None)]["value"] < 0.8
        assert ("box_recall_delta", "pedestrian", None) in rows  # per class, by name
        assert ("nms_stability_spread", None, "weather=rain") in rows
        good = await _shadow(gw, client, "detector", "1.0.1", {"budgets": det_budgets}, frames)
        assert good["verdict"]["verdict"] == "pass", good["verdict"]

        long = await _shadow(gw, client, "trajectory", "1.1.0-long", {"budgets": traj_budgets}, histories)
        rows = {(r["metric"], r["class"], r["slice"]): r for r in long["rows"]}
        assert rows[("fde_relative", None, None)]["value"] == pytest.approx(0.4, abs=0.01)  # FDE +40 %
        assert long["verdict"]["verdict"] == "fail" and "fde_relative" in long["verdict"]["reason"]
        good = await _shadow(gw, client, "trajectory", "1.0.1", {"budgets": traj_budgets}, histories)
        assert good["verdict"]["verdict"] == "pass", good["verdict"]

    serve(config, body)


def test_budgets_that_cannot_be_judged_are_refused_and_missing_data_is_pending(quality_models: Path) -> None:
    config = load_config(quality_models / "serving.toml")
    rng = np.random.default_rng(8)

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        for budget, words in (
            ({"metric": "recal", "bound": 0.1}, "not a classification KPI"),
            ({"metric": "recall_delta", "class": "dog", "bound": 0.1}, "no class 'dog'"),
            ({"metric": "agreement", "class": "car", "bound": 0.9}, "not per class"),
            ({"metric": "recall_delta", "slice": "night", "bound": 0.1}, "not key=value"),
            ({"metric": "mean_iou", "bound": 0.5}, "not a classification KPI"),
        ):
            r = await client.post(
                "/v1/admin/models/classifier/shadow",
                json={"version": "1.0.1", "budgets": [budget]},
                headers=caller(ADMIN),
            )
            assert r.status_code == 422 and words in r.json()["detail"], (budget, r.text)
            assert gw.model("classifier").shadow is None  # nothing started
        # a slice nobody sends, and too few samples: pending with the reason, never a pass
        inputs = [_scene(i, rng) for i in range(60)]
        out = await _shadow(
            gw,
            client,
            "classifier",
            "1.0.1",
            {
                "min_samples": 10,
                "budgets": [
                    {"metric": "recall_delta", "class": "car", "slice": "weather=snow", "bound": 0.1}
                ],
            },
            inputs,
        )
        assert out["verdict"]["verdict"] == "pending"
        assert "no data yet" in out["verdict"]["reason"]
        r = await client.post(
            "/v1/admin/models/classifier/canary", json={"candidate": "1.0.1"}, headers=caller(ADMIN)
        )
        assert r.status_code == 409 and "pending" in r.json()["detail"]

    serve(config, body)


def _canary_traffic(
    gw: Gateway, client: httpx.AsyncClient, n: int, rng: np.random.Generator, label: bool = False
) -> Any:
    async def go() -> None:
        for i in range(n):
            x, meta = _scene(i, rng)
            r = await client.post(
                "/v1/models/classifier/infer",
                json={"inputs": x.tolist(), "key": f"u{rng.integers(1 << 30)}", "metadata": meta},
                headers=caller(),
            )
            assert r.status_code == 200
            if label:  # ground truth: production's own top class (it is the better model here)
                truth = int(np.argmax(np.asarray(gw_direct(x))))
                r2 = await client.post(
                    "/v1/models/classifier/labels",
                    json={"request_id": r.json()["request_id"], "label": truth},
                    headers=caller(),
                )
                assert r2.status_code == 200

    return go()


_PROD: dict[str, Any] = {}


def gw_direct(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    import onnxruntime as ort

    sess = _PROD["session"]
    assert isinstance(sess, ort.InferenceSession)
    out: np.ndarray[Any, Any] = sess.run(None, {"input": x[None, :]})[0][0]
    return out


def test_a_good_release_goes_shadow_canary_production_with_its_model_card(quality_models: Path) -> None:
    config = load_config(quality_models / "serving.toml")
    clock = Clock()
    rng = np.random.default_rng(11)
    inputs = [_scene(i, rng) for i in range(2000)]

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        out = await _shadow(
            gw, client, "classifier", "1.0.1", {"max_diff_rate": 0.05, "budgets": NIGHT_BUDGETS}, inputs
        )
        assert out["verdict"]["verdict"] == "pass", out["verdict"]
        r = await client.post(
            "/v1/admin/models/classifier/canary",
            json={
                "candidate": "1.0.1",
                "steps": [20, 100],
                "bake_s": 30,
                "min_requests": 40,
                "slo_p95_ms": 250,
                "slo_p99_ms": 500,
                "max_latency_increase": 1.0,  # the same architecture: latency differs only by noise here
                "min_shadow_agreement": 0.99,
            },
            headers=caller(ADMIN),
        )
        assert r.status_code == 200, r.text
        for _ in range(8):
            await _canary_traffic(gw, client, 150, rng)
            clock.now += timedelta(seconds=31)
            gw.tick()
            if gw.model("classifier").production == "1.0.1":
                break
        st = gw.model("classifier")
        assert st.production == "1.0.1" and st.canary is None, st.events[-5:]
        await gw.flush_registry()
        card = json.loads((quality_models / "registry.json").read_text())["releases"]["classifier"]["1.0.1"]
        sections = [c["section"] for c in card["model_card"]]
        assert sections[:2] == ["shadow", "canary"] and card["stage"] == "production"
        shadow = card["model_card"][0]["content"]
        assert shadow["verdict"] == "pass" and any(r["slice"] == "time=night" for r in shadow["rows"])
        canary_log = card["model_card"][1]["content"]["log"]
        assert any("errors vs baseline" in line or "advancing" in line for line in canary_log)

    serve(config, body, clock)


def test_relative_gates_stop_a_slower_candidate_and_one_that_loses_accuracy_on_late_labels(
    quality_models: Path,
) -> None:
    import onnxruntime as ort

    _PROD["session"] = ort.InferenceSession(
        str(quality_models / "prod.onnx"), providers=["CPUExecutionProvider"]
    )
    config = load_config(quality_models / "serving.toml")
    clock = Clock()
    rng = np.random.default_rng(12)
    slow = {
        "steps": [50, 100],
        "bake_s": 30,
        "min_requests": 150,
        "slo_p95_ms": 250,  # inside the absolute SLO by far
        "slo_p99_ms": 500,
        "max_accuracy_drop": None,
        "max_ece_increase": None,
        "override_reason": "the relative latency gate is under test",
    }

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        r = await client.post(
            "/v1/admin/models/classifier/canary",
            json={"candidate": "1.3.0-slow", **slow},
            headers=caller(ADMIN),
        )
        assert r.status_code == 200, r.text
        outcome = None
        for _ in range(6):
            await _canary_traffic(gw, client, 400, rng)
            clock.now += timedelta(seconds=31)
            done = gw.tick()
            if done:
                outcome = done[0]
                break
        assert outcome is not None and outcome[1] == "rolled back"
        decision = json.loads((outcome[2] / "decision.json").read_text())
        assert decision["action"] == "ABORT" and "latency_ms vs baseline" in decision["reason"]
        assert gw.model("classifier").production == "1.0.0"

        labelled = {
            "steps": [50, 100],
            "bake_s": 30,
            "min_requests": 50,
            "min_labels": 300,
            "slo_p95_ms": 250,
            "slo_p99_ms": 500,
            "max_latency_increase": None,
            "max_accuracy_drop": 0.02,
            "override_reason": "the late-label accuracy gate is under test",
        }
        r = await client.post(
            "/v1/admin/models/classifier/canary",
            json={"candidate": "1.2.0-retrained", **labelled},
            headers=caller(ADMIN),
        )
        assert r.status_code == 200, r.text
        outcome = None
        for _ in range(8):
            await _canary_traffic(gw, client, 400, rng, label=True)
            clock.now += timedelta(seconds=31)
            done = gw.tick()
            if done:
                outcome = done[0]
                break
        assert outcome is not None and outcome[1] == "rolled back", gw.model("classifier").events[-4:]
        decision = json.loads((outcome[2] / "decision.json").read_text())
        assert "correct vs baseline" in decision["reason"]

    serve(config, body, clock)


def test_manual_judgement_and_a_cohort_canary(quality_models: Path) -> None:
    config = load_config(quality_models / "serving.toml")
    clock = Clock()
    rng = np.random.default_rng(13)

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        spec = {
            "steps": [50, 100],
            "bake_s": 10,
            "min_requests": 20,
            "slo_p95_ms": 1e4,
            "slo_p99_ms": 1e4,
            "manual_steps": [1],
            "max_latency_increase": None,
            "cohort": {"region": ["eu"]},
            "override_reason": "manual judgement under test",
        }
        r = await client.post(
            "/v1/admin/models/classifier/canary", json={"candidate": "1.0.1", **spec}, headers=caller(ADMIN)
        )
        assert r.status_code == 200, r.text
        served: dict[str, set[str]] = {"eu": set(), "us": set()}
        for i in range(300):
            x, meta = _scene(i, rng)
            r = await client.post(
                "/v1/models/classifier/infer",
                json={"inputs": x.tolist(), "key": f"k{i}", "metadata": meta},
                headers=caller(),
            )
            served[meta["region"]].add(r.json()["version"])
        assert served["us"] == {"1.0.0"} and served["eu"] == {"1.0.0", "1.0.1"}  # only the cohort
        r = await client.post("/v1/admin/models/classifier/canary/approve", headers=caller(ADMIN))
        assert r.status_code == 409 and "not waiting for a person" in r.json()["detail"]
        clock.now += timedelta(seconds=11)
        gw.tick()
        status = gw.status("classifier")
        assert (
            status["canary"]["status"] == "PAUSED"
            and "waiting for approval" in status["canary"]["paused_reason"]
        )
        clock.now += timedelta(seconds=600)
        gw.tick()
        assert gw.model("classifier").canary is not None and gw.model("classifier").canary.state.step == 0  # type: ignore[union-attr]
        r = await client.post(
            "/v1/admin/models/classifier/canary/approve", json={"by": "alice"}, headers=caller()
        )
        assert r.status_code == 401
        r = await client.post(
            "/v1/admin/models/classifier/canary/approve", json={"by": "alice"}, headers=caller(ADMIN)
        )
        assert (
            r.status_code == 200
            and r.json()["action"] == "ADVANCE"
            and "approved by alice" in r.json()["reason"]
        )
        assert gw.model("classifier").weights == {"1.0.1": 1.0}
        r = await client.post("/v1/admin/models/classifier/canary/reject", headers=caller(ADMIN))
        assert r.status_code == 409  # step 2 is not waiting
        r = await client.post("/v1/admin/models/classifier/rollback", headers=caller(ADMIN))
        assert r.status_code == 200 and r.json()["production"] == "1.0.0" and r.json()["canary"] is None
        # a cohort by request header: internal callers first
        spec["cohort"] = {"header:x-tidegate-cohort": ["internal"]}
        spec["manual_steps"] = []
        r = await client.post(
            "/v1/admin/models/classifier/canary", json={"candidate": "1.0.1", **spec}, headers=caller(ADMIN)
        )
        assert r.status_code == 200, r.text
        by_header: dict[bool, set[str]] = {True: set(), False: set()}
        for i in range(200):
            x, meta = _scene(i, rng)
            internal = i % 2 == 0
            headers = {**caller(), **({"X-Tidegate-Cohort": "internal"} if internal else {})}
            r = await client.post(
                "/v1/models/classifier/infer", json={"inputs": x.tolist(), "key": f"h{i}"}, headers=headers
            )
            by_header[internal].add(r.json()["version"])
        assert by_header[False] == {"1.0.0"} and by_header[True] == {"1.0.0", "1.0.1"}

    serve(config, body, clock)


def test_one_release_operation_at_a_time(quality_models: Path) -> None:
    """Regression: a canary could start during an experiment, and the experiment's end then
    overwrote the canary's weights."""
    config = load_config(quality_models / "serving.toml")

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        gw.start_experiment("classifier", ExperimentSpec(control="1.0.0", treatment="1.0.1"))
        r = await client.post(
            "/v1/admin/models/classifier/canary",
            json={"candidate": "1.0.1", "override_reason": "try to break the table"},
            headers=caller(ADMIN),
        )
        assert r.status_code == 409 and "running an experiment (1.0.0 vs 1.0.1)" in r.json()["detail"]
        for path, payload in (
            ("shadow", {"version": "1.0.1"}),
            ("weights", {"weights": {"1.0.1": 1.0}}),
            ("switch", {"version": "1.0.1"}),
            ("rollback", None),
        ):
            r = await client.post(f"/v1/admin/models/classifier/{path}", json=payload, headers=caller(ADMIN))
            assert r.status_code == 409 and "running an experiment" in r.json()["detail"], (path, r.text)
        st = gw.model("classifier")
        assert st.canary is None and st.shadow is None
        st.experiment = None  # end it (as its analysis would)
        gw.start_canary("classifier", "1.0.1", CanarySpec(), override_reason="table test")
        with pytest.raises(ReleaseError, match="running a canary of 1.0.1: cannot start an experiment"):
            gw.start_experiment("classifier", ExperimentSpec(control="1.0.0", treatment="1.0.1"))
        r = await client.post(
            "/v1/admin/models/classifier/shadow", json={"version": "1.1.0-night"}, headers=caller(ADMIN)
        )
        assert r.status_code == 409 and "running a canary" in r.json()["detail"]

    serve(config, body)
    # the table itself: every operation outside it is refused, every one in it allowed
    for state, allowed in ALLOWED.items():
        for op in Op:
            if op in allowed:
                check("m", op, (state, "x"))
            else:
                with pytest.raises(ReleaseError, match=re.escape(f"cannot {op.value}")):
                    check("m", op, (state, "x"))
    assert Op.START_CANARY not in ALLOWED[Running.SHADOW]  # end the shadow first: its verdict


# ---- pure parts ----------------------------------------------------------------------------------


def test_box_matching_is_one_to_one_by_class_at_iou_half() -> None:
    prod = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=np.float64)
    cand = np.array([[1, 1, 11, 11], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=np.float64)
    m = match_boxes(prod, np.array([0, 1]), cand, np.array([0, 0, 2]))
    assert [(i, j) for i, j, _ in m] == [(0, 1)]  # the exact box wins; the other class never matches
    # the batched matcher agrees with the one-frame reference on random frames
    rng = np.random.default_rng(0)
    pb, cb = rng.uniform(0, 1, (50, 6, 4)), rng.uniform(0, 1, (50, 7, 4))
    pb[..., 2:] += pb[..., :2]
    cb[..., 2:] += cb[..., :2]
    pc, cc = rng.integers(0, 2, (50, 6)), rng.integers(0, 2, (50, 7))
    allowed = pc[:, :, None] == cc[:, None, :]
    batched = greedy_match(iou_matrix(pb, cb), allowed, 0.3)
    for f in range(50):
        one = match_boxes(pb[f], pc[f], cb[f], cc[f], 0.3)
        assert sorted((i, round(v, 9)) for i, _, v in one) == [
            (i, round(v, 9)) for i, v in enumerate(batched[f]) if v > 0
        ]
    spec = TaskSpec(task=Task.DETECTION, scores_output="scores", box_format="cxcywh", class_names=("a", "b"))
    diff = SlicedDiff(spec)
    boxes = np.array([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]], dtype=np.float32)
    scores = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    moved = boxes + np.array([0.3, 0, 0, 0], dtype=np.float32)
    diff.add({"boxes": boxes, "scores": scores}, {"boxes": moved, "scores": scores}, ["weather=fog"])
    rows = {(r.metric, r.cls, r.slice): r.value for r in diff.rows()}
    assert rows[("box_recall_delta", None, None)] == -1.0 and rows[("nms_stability", None, None)] == 0.0
    assert rows[("box_count_delta", None, "weather=fog")] == 0.0 and ("box_recall_delta", "b", None) in rows
    ade, fde = displacement(np.array([[1.0, 0.0], [2.0, 0.0]]), np.array([[1.0, 0.0], [1.0, 0.0]]))
    assert (ade, fde) == (0.5, 1.0)


def test_aa_canaries_abort_rarely(capsys: pytest.CaptureFixture[str]) -> None:
    """A/A: the candidate is the production model. Over 200 simulated canaries with every
    relative gate on (errors, latency, accuracy, ECE), the family-wise false-abort rate the
    spec sets (alpha 0.05, Bonferroni over comparisons and looks) holds."""
    runs, aborted, paused = 200, 0, 0
    rng = np.random.default_rng(2026)
    spec = CanarySpec(
        steps=(10, 50, 100),
        bake_s=60,
        min_requests=200,
        min_labels=200,
        slo_p95_ms=1e3,
        slo_p99_ms=1e3,
        min_success_rate=0.9,
        window_s=120,
    )
    for _ in range(runs):
        clock = Clock()
        c = Canary.begin("m", "a", "b", spec, clock.now)
        while True:
            for _ in range(4):  # 15 s of traffic between ticks, 600 requests
                w = c.weight
                n_c = int(rng.binomial(600, w))
                for side, n in ((False, n_c), (True, 600 - n_c)):
                    errs = rng.random(n) < 0.01
                    lat = rng.lognormal(0, 0.3, n)
                    for e, ms in zip(errs, lat, strict=True):
                        c.record(clock.now, ok=not e, latency_ms=float(ms), baseline=side)
                    for conf in rng.uniform(0.5, 1.0, n // 3):
                        c.label(clock.now, "a" if side else "b", float(conf), bool(rng.random() < conf))
                clock.now += timedelta(seconds=15)
            d = c.tick(clock.now)
            if d.action is Action.ABORT:
                aborted += 1
                break
            if d.action is Action.PAUSE:
                paused += 1
                break
            if d.action is Action.COMPLETE:
                break
    rate = aborted / runs
    with capsys.disabled():
        print(f"\nA/A: {aborted} of {runs} canaries aborted ({rate:.1%}), {paused} paused for a person")
    assert rate <= 0.05


def test_a_guardrail_breach_reverts_the_flags_the_experiment_set(quality_models: Path) -> None:
    """The experiment sets a flag in the flag store (here the standalone gateway's registry
    file); its treatment fails, the guardrail ends it, and the flag is reverted, in the events."""
    config = load_config(quality_models / "serving.toml")
    registry = quality_models / "registry.json"
    rng = np.random.default_rng(21)

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        before = json.loads(registry.read_text()) if registry.exists() else {"releases": {}, "flags": {}}
        before.setdefault("flags", {})["classifier.keep"] = "untouched"
        registry.write_text(json.dumps(before))
        await asyncio.to_thread(gw.flags.refresh)  # type: ignore[union-attr]
        spec = ExperimentSpec(
            control="1.0.0", treatment="9.9.9-bad", flags={"classifier.new_postprocessing": True}
        )
        gw.start_experiment("classifier", spec)
        assert await gw.flush_flags() == 1
        flags = json.loads(registry.read_text())["flags"]
        assert flags["classifier.new_postprocessing"] is True and flags["classifier.keep"] == "untouched"
        ended = None
        for i in range(400):
            x, _ = _scene(i, rng)
            r = await client.post(
                "/v1/models/classifier/infer", json={"inputs": x.tolist(), "key": f"e{i}"}, headers=caller()
            )
            assert r.status_code == 200  # the treatment's failures are answered by production
            if i % 50 == 49 and (done := gw.tick()):
                ended = done[0]
                break
        assert ended is not None and ended[1].startswith("stopped: guardrail")
        assert await gw.flush_flags() == 1
        flags = json.loads(registry.read_text())["flags"]
        assert "classifier.new_postprocessing" not in flags and flags["classifier.keep"] == "untouched"
        events = gw.status("classifier")["events"]
        assert any("reverted the flags it set: classifier.new_postprocessing (removed)" in e for e in events)
        saved, gw.flags = gw.flags, None
        try:
            with pytest.raises(InvalidReleaseError, match="no flag store"):
                gw.start_experiment("classifier", spec)
        finally:
            gw.flags = saved

    serve(config, body)


def test_gray_logging_keeps_the_canarys_pairs_redacted_and_bounded(
    quality_models: Path, tmp_path: Path
) -> None:
    import os

    from cloud_serving.graylog import GrayLog
    from shared.logs import DEFAULT_REDACTOR

    config = load_config(quality_models / "serving.toml")
    rng = np.random.default_rng(31)

    gray_file = config.gateway.failure_dir.parent / "gray" / "classifier-1.0.1.jsonl"
    earlier = len(gray_file.read_text().splitlines()) if gray_file.exists() else 0  # other tests' canaries

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        gw.start_canary(
            "classifier", "1.0.1", CanarySpec(steps=(50, 100)), override_reason="gray logging under test"
        )
        served = 0
        for i in range(120):
            x, _ = _scene(i, rng)
            r = await client.post(
                "/v1/models/classifier/infer",
                json={"inputs": x.tolist(), "key": f"g{i}", "metadata": {"email": "x@y.z", "time": "day"}},
                headers=caller(),
            )
            served += r.json()["version"] == "1.0.1"
        assert gw.gray is not None and await asyncio.to_thread(gw.gray.flush) == served > 0
        pairs = [json.loads(line) for line in gray_file.read_text().splitlines()[earlier:]]
        assert all(p["at"].startswith("20") for p in pairs)  # when, kept as it was (not redacted)
        assert len(pairs) == served and all(p["version"] == "1.0.1" and p["outputs"] for p in pairs)
        assert all(
            p["metadata"]["email"].startswith("redacted:") and p["metadata"]["time"] == "day" for p in pairs
        )
        assert all(p["caller_key"].startswith("redacted:") for p in pairs)

    serve(config, body)
    # bounded by size (one rotated file kept) and by age
    now = [1_000_000.0]
    gray = GrayLog(tmp_path / "gray", DEFAULT_REDACTOR, max_bytes=2000, max_age_s=3600, clock=lambda: now[0])
    for round_ in range(5):
        for i in range(20):
            gray.offer("m-2", lambda i=i: {"i": i, "pad": "x" * 40})
        gray.flush()
        assert sum(p.stat().st_size for p in (tmp_path / "gray").iterdir()) <= 2 * 2000 + 1500, round_
    assert sorted(p.name for p in (tmp_path / "gray").iterdir()) == ["m-2.jsonl", "m-2.jsonl.1"]
    old = tmp_path / "gray" / "m-2.jsonl.1"
    os.utime(old, (now[0] - 7200, now[0] - 7200))
    gray.offer("m-2", lambda: {"i": -1})
    gray.flush()
    assert not old.exists()


def test_a_trajectory_canary_with_fde_40_percent_worse_on_late_truths_is_rolled_back(
    quality_models: Path,
) -> None:
    """Trajectories judged against ground truth when it arrives: the truth is production's
    path plus a little noise; the candidate stretches every point by 1.4, so its FDE against
    the truth is far above production's, and the relative FDE gate aborts the canary."""
    import onnxruntime as ort

    config = load_config(quality_models / "serving.toml")
    clock = Clock()
    rng = np.random.default_rng(41)
    truth_model = ort.InferenceSession(str(quality_models / "traj.onnx"), providers=["CPUExecutionProvider"])

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        spec = {
            "candidate": "1.1.0-long",
            "steps": [50, 100],
            "bake_s": 30,
            "min_requests": 20,
            "min_labels": 100,
            "slo_p95_ms": 250,
            "slo_p99_ms": 500,
            "max_latency_increase": None,
            "max_fde_increase": 0.1,
            "override_reason": "the late-truth FDE gate is under test",
        }
        r = await client.post("/v1/admin/models/trajectory/canary", json=spec, headers=caller(ADMIN))
        assert r.status_code == 200, r.text
        outcome = None
        fde: dict[str, list[float]] = {}
        for _ in range(6):
            for _ in range(300):
                x = rng.standard_normal(16).astype(np.float32)
                r = await client.post(
                    "/v1/models/trajectory/infer", json={"inputs": x.tolist()}, headers=caller()
                )
                answer = r.json()
                truth = truth_model.run(None, {"history": x[None]})[0][0] + rng.normal(0, 0.01, (12, 2))
                got = await client.post(
                    "/v1/models/trajectory/labels",
                    json={"request_id": answer["request_id"], "label": truth.tolist()},
                    headers=caller(),
                )
                assert got.status_code == 200, got.text
                fde.setdefault(answer["version"], []).append(got.json()["fde"])
            clock.now += timedelta(seconds=31)
            if done := gw.tick():
                outcome = done[0]
                break
        assert outcome is not None and outcome[1] == "rolled back", gw.model("trajectory").events[-3:]
        decision = json.loads((outcome[2] / "decision.json").read_text())
        assert "fde vs baseline" in decision["reason"]
        ratio = np.mean(fde["1.1.0-long"]) / np.mean(fde["1.0.0"])
        assert ratio > 5  # production's FDE is the noise; the candidate's is 40 % of the path
        bad = await client.post(
            "/v1/models/trajectory/labels",
            json={"request_id": "nope", "label": [[0.0, 0.0]]},
            headers=caller(),
        )
        assert bad.status_code == 404
        metrics = (await client.get("/metrics")).text
        assert 'tidegate_serving_displacement{metric="fde",model="trajectory",version="1.0.0"}' in metrics

    serve(config, body, clock)


def test_a_failure_bundle_records_a_spec_with_provider_conditions(tmp_path: Path) -> None:
    from cloud_serving.providers import ProviderCondition
    from shared.gates import Comparator

    spec = CanarySpec(
        providers=(ProviderCondition("p99", "prometheus", Comparator.LE, 0.25, "http://prom:9090", "up"),)
    )
    clock = Clock()
    c = Canary.begin("m", "a", "b", spec, clock.now)
    c.record(clock.now, ok=False, latency_ms=1.0)
    out = c.write_failure_bundle(tmp_path, clock.now, c.tick(clock.now))
    saved = json.loads((out / "decision.json").read_text())
    assert saved["spec"]["providers"][0]["name"] == "p99" and saved["spec"]["steps"] == [1, 5, 25, 50, 100]
