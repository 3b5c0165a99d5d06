"""The inference gateway against real in-process ONNX models: routing, shadow, canary with
rollback and a failure bundle, blue/green under load, fallback, and bad input."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from pydantic import ValidationError

from cloud_serving.app import create_app
from cloud_serving.canary import CanarySpec
from cloud_serving.config import ServingConfig, load_config
from cloud_serving.experiments import ExperimentSpec
from cloud_serving.gateway import Gateway
from cloud_serving.routing import RoutingError, bucket, choose
from tests.helpers import ADMIN, ServedApp, caller

# Tests of the canary's mechanics (steps, roll-back, registry) start it without a shadow, and
# judge on the absolute gates alone: their candidates differ in latency only by noise.
OVERRIDE = "test of the canary's mechanics, not of the shadow gate"
ABSOLUTE_ONLY: dict[str, Any] = {
    "max_error_increase": None,
    "max_latency_increase": None,
    "max_accuracy_drop": None,
    "max_ece_increase": None,
}


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def serve(
    config: ServingConfig,
    body: Callable[[Gateway, httpx.AsyncClient], Awaitable[None]],
    clock: Clock | None = None,
) -> None:
    async def main() -> None:
        gateway = Gateway(config, clock=clock or Clock(), seed=1)
        await gateway.start(tick=False)
        app = create_app(gateway, start=False)
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=30
            ) as client:
                await body(gateway, client)
        finally:
            await gateway.stop()

    asyncio.run(main())


def direct(model: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"input": x[None, :]})[0][0])


SAMPLES = np.random.default_rng(9).standard_normal((400, 16)).astype(np.float32)


# ---- routing, pure --------------------------------------------------------------------------


def test_routing_shares_hold_and_callers_stay_put() -> None:
    keys = [f"device-{i}" for i in range(20_000)]
    at5 = [choose({"prod": 0.95, "cand": 0.05}, key=k, salt="r1", order=["prod"]) for k in keys]
    at25 = [choose({"prod": 0.75, "cand": 0.25}, key=k, salt="r1", order=["prod"]) for k in keys]
    share5, share25 = at5.count("cand") / len(keys), at25.count("cand") / len(keys)
    assert abs(share5 - 0.05) < 5 * (0.05 * 0.95 / len(keys)) ** 0.5  # within 5 standard errors
    assert abs(share25 - 0.25) < 5 * (0.25 * 0.75 / len(keys)) ** 0.5
    # sticky: the same key, the same answer; growing the canary only moves callers onto it
    assert all(
        choose({"prod": 0.95, "cand": 0.05}, key=k, salt="r1", order=["prod"]) == a
        for k, a in zip(keys[:500], at5[:500], strict=True)
    )
    assert all(b == "cand" for a, b in zip(at5, at25, strict=True) if a == "cand")
    # a new release's salt reshuffles who goes first
    other = [choose({"prod": 0.95, "cand": 0.05}, key=k, salt="r2", order=["prod"]) for k in keys]
    overlap = sum(1 for a, b in zip(at5, other, strict=True) if a == b == "cand")
    assert overlap < 0.2 * at5.count("cand")
    assert 0 <= bucket("x", "s") < 1
    rng = random.Random(0)
    unkeyed = Counter(choose({"a": 1, "b": 3}, key=None, salt="s", rng=rng) for _ in range(8000))
    assert abs(unkeyed["b"] / 8000 - 0.75) < 0.03
    with pytest.raises(RoutingError):
        choose({"a": 0}, key="k", salt="s")


# ---- through the gateway --------------------------------------------------------------------


def test_shadow_never_changes_the_callers_answer_and_stops_on_its_budget(models: Path) -> None:
    config = load_config(models / "serving.toml")

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        r = await client.post(
            "/v1/admin/models/classifier/shadow",
            json={"version": "1.1.0", "share": 1.0, "max_diff_rate": 0.05, "min_samples": 50},
            headers=caller(ADMIN),
        )
        assert r.status_code == 200, r.text
        for i, x in enumerate(SAMPLES[:200]):
            r = await client.post(
                "/v1/models/classifier/infer", json={"inputs": x.tolist(), "key": f"k{i}"}, headers=caller()
            )
            assert r.status_code == 200
            got = r.json()
            assert got["version"] == "1.0.0"
            np.testing.assert_allclose(
                got["outputs"]["probabilities"], direct(models / "v1.onnx", x), rtol=1e-5, atol=1e-6
            )
            if i % 20 == 0:
                await asyncio.sleep(0.01)  # let the mirror work
        for _ in range(1000):  # the mirror process starts (imports ONNX Runtime) in the background
            if not gw.model("classifier").shadow.active:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.02)
        shadow = gw.model("classifier").shadow
        assert shadow is not None
        k = shadow.stats.kpis()
        assert k["compared"] >= 50 and k["diff_rate"] > 0.05  # two differently seeded models disagree
        assert shadow.stopped_reason is not None and "diff_rate" in shadow.stopped_reason
        assert set(k["per_class"]) and k["max_abs_diff"] > 0
        gw.tick()
        assert any("shadow of 1.1.0 stopped: diff_rate" in e for e in gw.status("classifier")["events"])
        # Disagreements came back whole and are kept as failure captures (rate-limited on disk).
        assert shadow.stats.captured >= 1
        written = gw.record_shadow_diffs()
        assert len(written) == 1 and not shadow.captures  # one per second; the rest suppressed
        capture = json.loads(written[0].read_text())
        assert capture["kind"] == "shadow_diff" and capture["candidate_version"] == "1.1.0"
        p, c = capture["argmax"]["production"], capture["argmax"]["candidate"]
        assert p != c and capture["production_version"] == "1.0.0"
        x = np.asarray(capture["input"], dtype=np.float32)
        np.testing.assert_allclose(
            capture["production"]["probabilities"], direct(models / "v1.onnx", x), atol=1e-5
        )
        assert int(np.argmax(direct(models / "v1.onnx", x))) == p

    serve(config, body)


def test_a_bad_canary_rolls_back_and_writes_its_failure_bundle(models: Path) -> None:
    config = load_config(models / "serving.toml")
    clock = Clock()

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        r = await client.post(
            "/v1/admin/models/classifier/canary",
            json={
                "candidate": "9.9.9-bad",
                "steps": [20, 50, 100],
                "bake_s": 60,
                "min_requests": 20,
                "override_reason": OVERRIDE,
            },
            headers=caller(ADMIN),
        )
        assert r.status_code == 200, r.text
        served = Counter()
        for i, x in enumerate(SAMPLES[:300]):
            r = await client.post(
                "/v1/models/classifier/infer",
                json={
                    "inputs": x.tolist(),
                    "key": f"device-{i}",
                    "metadata": {"email": "a@b.c", "region": "eu"},
                },
                headers=caller(),
            )
            assert r.status_code == 200  # the canary's failures never reach a caller
            served[r.json()["version"]] += 1
            assert np.all(np.isfinite(r.json()["outputs"]["probabilities"]))
        assert served == {"1.0.0": 300}  # its requests were answered by production
        clock.now += timedelta(seconds=5)
        done = gw.tick()
        assert done and done[0][:2] == ("classifier", "rolled back")
        bundle = done[0][2]
        assert bundle is not None and bundle.parent == config.gateway.failure_dir
        decision = json.loads((bundle / "decision.json").read_text())
        assert decision["action"] == "ABORT" and "success" in decision["reason"]
        lines = [json.loads(line) for line in (bundle / "requests.jsonl").read_text().splitlines()]
        assert lines and all(e["error"] for e in lines)
        assert all(
            e["metadata"]["email"].startswith("redacted:") and e["metadata"]["region"] == "eu" for e in lines
        )
        assert all(e["caller_key"].startswith("redacted:") for e in lines)
        assert json.loads((bundle / "metrics.json").read_text())["success_rate"] == 0.0
        status = gw.status("classifier")
        assert status["weights"] == {"1.0.0": 1.0} and status["canary"] is None

    serve(config, body, clock)


def test_a_good_canary_is_promoted_step_by_step_and_can_be_rolled_back(models: Path) -> None:
    config = load_config(models / "serving.toml")
    clock = Clock()

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        gw.start_canary(
            "classifier",
            "1.1.0",
            CanarySpec(
                steps=(10, 50, 100),
                bake_s=60,
                min_requests=10,
                slo_p95_ms=1000,
                slo_p99_ms=2000,
                **ABSOLUTE_ONLY,
            ),
            override_reason=OVERRIDE,
        )
        weights = []
        for _ in range(4):
            for i, x in enumerate(SAMPLES[:200]):
                r = await client.post(
                    "/v1/models/classifier/infer",
                    json={"inputs": x.tolist(), "key": f"d{i}"},
                    headers=caller(),
                )
                assert r.status_code == 200
            clock.now += timedelta(seconds=61)
            gw.tick()
            weights.append(dict(gw.model("classifier").weights))
        assert weights[0] == pytest.approx({"1.0.0": 0.5, "1.1.0": 0.5})
        assert weights[1] == {"1.1.0": 1.0}
        assert gw.model("classifier").production == "1.1.0" and gw.model("classifier").canary is None
        r = await client.post("/v1/admin/models/classifier/rollback", headers=caller(ADMIN))
        assert r.json()["production"] == "1.0.0"

    serve(config, body, clock)


def test_blue_green_switch_under_concurrent_load_drops_nothing(models: Path) -> None:
    config = load_config(models / "serving.toml")

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        seen: list[tuple[float, str]] = []
        failures: list[str] = []
        stop = asyncio.Event()

        async def worker(n: int) -> None:
            i = 0
            while not stop.is_set():
                x = SAMPLES[(n * 37 + i) % len(SAMPLES)]
                r = await client.post(
                    "/v1/models/classifier/infer", json={"inputs": x.tolist()}, headers=caller()
                )
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    seen.append((asyncio.get_running_loop().time(), r.json()["version"]))
                i += 1

        tasks = [asyncio.create_task(worker(n)) for n in range(8)]
        await asyncio.sleep(0.5)
        r = await client.post(
            "/v1/admin/models/classifier/switch", json={"version": "1.1.0"}, headers=caller(ADMIN)
        )
        assert r.status_code == 200, r.text
        switched = asyncio.get_running_loop().time()
        await asyncio.sleep(0.5)
        r = await client.post(
            "/v1/admin/models/classifier/switch", json={"version": "1.0.0"}, headers=caller(ADMIN)
        )
        back = asyncio.get_running_loop().time()
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*tasks)
        assert failures == []
        assert len(seen) > 100
        middle = {v for t, v in seen if switched + 0.05 < t < back - 0.01}
        assert middle == {"1.1.0"} and {v for t, v in seen if t > back + 0.05} == {"1.0.0"}
        r = await client.post(
            "/v1/admin/models/classifier/switch", json={"version": "9.9.9-bad"}, headers=caller(ADMIN)
        )
        assert r.status_code == 409 and "pre-switch check" in r.json()["detail"]

    serve(config, body)


def test_fallback_answers_when_the_model_fails_and_503_without_one(models: Path) -> None:
    config = load_config(models / "serving.toml")

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        x = SAMPLES[0].tolist()
        r = await client.post("/v1/models/guarded/infer", json={"inputs": x}, headers=caller())
        assert r.status_code == 200
        assert r.json()["fallback"] is True and r.json()["outputs"]["probabilities"] == [0.25] * 4
        r = await client.post("/v1/models/unguarded/infer", json={"inputs": x}, headers=caller())
        assert r.status_code == 503 and "no fallback is configured" in r.json()["detail"]

    serve(config, body)


def test_bad_requests_get_a_clear_4xx(models: Path) -> None:
    config = load_config(models / "serving.toml")

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        url, ok = "/v1/models/classifier/infer", {"inputs": SAMPLES[0].tolist()}
        assert (await client.post(url, json=ok)).status_code == 401
        assert (await client.post(url, json=ok, headers=caller("tgk_wrong"))).status_code == 401
        assert (
            await client.get("/v1/admin/models/classifier", headers=caller())
        ).status_code == 401  # not admin
        big = await client.post(url, content=b"[" + b"0.5," * 3000 + b"0]", headers=caller())
        assert big.status_code == 413
        cases = [
            ({"inputs": [1.0, 2.0]}, "shape [2]"),
            ({"inputs": [[1.0] * 16]}, "shape [1, 16]"),
            ({"inputs": SAMPLES[0].tolist(), "extra": 1}, "extra"),
            ({"inputs": "sixteen"}, "inputs"),
            ({"inputs": [1.0] * 15 + ["x"]}, "inputs"),
        ]
        for payload, message in cases:
            r = await client.post(url, json=payload, headers=caller())
            assert r.status_code == 422 and message in r.json()["detail"], (payload, r.text)
        r = await client.post(url, content=b"{not json", headers=caller())
        assert r.status_code == 422
        r = await client.post(url, content=b'{"inputs": [' + b"NaN," * 15 + b"NaN]}", headers=caller())
        assert r.status_code == 422 and "NaN" in r.json()["detail"]
        r = await client.post("/v1/models/nope/infer", json=ok, headers=caller())
        assert r.status_code == 404 and "no model 'nope'" in r.json()["detail"]
        r = await client.post(
            "/v1/admin/models/classifier/canary", json={"candidate": "1.0.0"}, headers=caller(ADMIN)
        )
        assert r.status_code == 409 and "production already" in r.json()["detail"]
        r = await client.post(
            "/v1/admin/models/classifier/weights", json={"weights": {"7.7.7": 1}}, headers=caller(ADMIN)
        )
        assert r.status_code == 409 and "no loaded version" in r.json()["detail"]
        with pytest.raises(Exception, match="serving traffic"):
            await gw.unload_version("classifier", "1.0.0")

    serve(config, body)


def test_versions_load_and_unload_while_serving(models: Path) -> None:
    config = load_config(models / "serving.toml")

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        await gw.load_version("classifier", "2.0.0", models / "v2.onnx")
        gw.set_weights("classifier", {"1.0.0": 1, "2.0.0": 1})
        versions = Counter()
        for i in range(400):
            r = await client.post(
                "/v1/models/classifier/infer",
                json={"inputs": SAMPLES[i].tolist(), "key": f"u{i}"},
                headers=caller(),
            )
            versions[r.json()["version"]] += 1
        assert 150 < versions["2.0.0"] < 250 and sum(versions.values()) == 400
        gw.set_weights("classifier", {"1.0.0": 1})
        await gw.unload_version("classifier", "2.0.0")
        assert "2.0.0" not in gw.status("classifier")["versions"]
        metrics = (await client.get("/metrics")).text
        ok = 'tidegate_serving_requests_total{arm="-",model="classifier",outcome="ok",version="2.0.0"}'
        assert ok in metrics

    serve(config, body)


def test_roll_through_replaces_a_failing_canary_with_the_next_candidate(models: Path) -> None:
    config = load_config(models / "serving.toml")

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        spec = {"steps": [10, 100], "bake_s": 60, "min_requests": 10, "override_reason": OVERRIDE}
        r = await client.post(
            "/v1/admin/models/classifier/canary",
            json={"candidate": "9.9.9-bad", **spec},
            headers=caller(ADMIN),
        )
        assert r.status_code == 200
        r = await client.post(
            "/v1/admin/models/classifier/roll-through",
            json={"candidate": "1.1.0", **spec},
            headers=caller(ADMIN),
        )
        assert r.status_code == 200, r.text
        status = r.json()
        assert status["canary"]["candidate"] == "1.1.0" and status["weights"] == pytest.approx(
            {"1.0.0": 0.9, "1.1.0": 0.1}
        )
        assert any("canary 9.9.9-bad rolled back: rolled through to 1.1.0" in e for e in status["events"])
        r = await client.post(
            "/v1/admin/models/classifier/roll-through",
            json={"candidate": "1.1.0", **spec},
            headers=caller(ADMIN),
        )
        assert r.status_code == 409
        r = await client.post(
            "/v1/admin/models/classifier/canary",
            json={"candidate": "1.1.0", "steps": [50, 10]},
            headers=caller(ADMIN),
        )
        assert r.status_code == 422 and "cumulative" in r.json()["detail"]

    serve(config, body)


def _run_experiment(
    gw: Gateway,
    client: httpx.AsyncClient,
    rates: dict[str, float],
    requests: int,
    seed: int,
    check: Callable[[int, dict[str, Any]], None] | None = None,
) -> Any:
    """Traffic with rewards at each arm's rate until the experiment ends; `check` sees each
    answer (request index, body) first."""

    async def go() -> list[tuple[str, list[str]]]:
        rng = random.Random(seed)
        ended: list[tuple[str, list[str]]] = []
        for i in range(requests):
            r = await client.post(
                "/v1/models/classifier/infer",
                json={"inputs": SAMPLES[i % 400].tolist(), "key": f"user-{i}"},
                headers=caller(),
            )
            assert r.status_code == 200
            body = r.json()
            if check is not None:
                check(i, body)
            if "request_id" in body:
                reward = 1.0 if rng.random() < rates[body["arm"]] else 0.0
                f = await client.post(
                    "/v1/models/classifier/feedback",
                    json={"request_id": body["request_id"], "reward": reward},
                    headers=caller(),
                )
                assert f.status_code == 200 and f.json()["arm"] == body["arm"]
            if i % 200 == 199:
                for model, verdict, _path in gw.tick():
                    ended.append((verdict, [model]))
                if ended:
                    break
        return ended

    return go()


def test_an_ab_experiment_finds_the_better_version_and_promotes_it(models: Path) -> None:
    config = load_config(models / "serving.toml")

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        r = await client.post(
            "/v1/admin/models/classifier/experiment",
            json={"control": "1.0.0", "treatment": "1.1.0", "baseline_rate": 0.2, "mde": 0.1},
            headers=caller(ADMIN),
        )
        assert r.status_code == 200, r.text
        ended = await _run_experiment(gw, client, {"1.0.0": 0.2, "1.1.0": 0.4}, 4000, seed=1)
        assert ended and ended[0][0] == "treatment_wins"
        assert gw.model("classifier").production == "1.1.0"
        summary = json.loads(
            (
                config.gateway.failure_dir.parent / "experiments" / "classifier-1.1.0" / "ab_summary.json"
            ).read_text()
        )
        assert summary["decision"] == "treatment_wins" and summary["effect"] > 0.1
        lo, hi = summary["confidence_interval"]
        assert lo < summary["effect"] < hi and lo > 0
        assert summary["p_value"] <= 0.05 and summary["plan"]["samples_per_arm"] > 0
        share = summary["arms"]["1.1.0"]["assigned"] / sum(a["assigned"] for a in summary["arms"].values())
        assert abs(share - 0.5) < 0.1
        r = await client.post(
            "/v1/models/classifier/feedback", json={"request_id": "x", "reward": 1}, headers=caller()
        )
        assert r.status_code == 409  # no experiment any more
        metrics = (await client.get("/metrics")).text
        for arm in ("1.0.0", "1.1.0"):  # latency histograms per arm
            labels = f'arm="{arm}",model="classifier",version="{arm}"'
            assert f"tidegate_serving_latency_seconds_count{{{labels}}}" in metrics

    serve(config, body)


def test_an_experiment_with_a_broken_treatment_stops_on_its_guardrail(
    models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(models / "serving.toml")
    caplog.set_level(logging.WARNING, logger="tidegate.serving")

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        exp = gw.start_experiment("classifier", ExperimentSpec(control="1.0.0", treatment="9.9.9-bad"))
        ended = await _run_experiment(gw, client, {"1.0.0": 0.2, "9.9.9-bad": 0.2}, 1000, seed=2)
        assert ended and ended[0][0].startswith("stopped: guardrail")
        assert gw.model("classifier").production == "1.0.0" and gw.model("classifier").weights == {
            "1.0.0": 1.0
        }
        # Each failure was answered by production, so the caller never saw it; the log did, once
        # (rate-limited), with its traceback, not once per request.
        logged = [r for r in caplog.records if "arm 9.9.9-bad failed a request" in r.getMessage()]
        assert exp.arms["9.9.9-bad"].errors > 10 and len(logged) == 1 and logged[0].exc_info

    serve(config, body)


def test_a_bandit_sends_most_traffic_to_the_better_arm(models: Path) -> None:
    config = load_config(models / "serving.toml")

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        from cloud_serving.experiments import ExperimentSpec

        exp = gw.start_experiment(
            "classifier",
            ExperimentSpec(control="1.0.0", treatment="1.1.0", mode="bandit", burn_in=100, mde=0.5),
        )
        ended = await _run_experiment(gw, client, {"1.0.0": 0.1, "1.1.0": 0.5}, 1200, seed=3)
        arms = exp.arms
        after_burn_in = arms["1.1.0"].assigned - 50, arms["1.0.0"].assigned - 50
        assert after_burn_in[0] > 4 * after_burn_in[1]  # past the 50/50 burn-in, the better arm
        assert ended and ended[0][0] == "treatment_wins" and exp.summary()["bandit"]["1.1.0"]["pulls"] > 0

    serve(config, body)


def test_the_example_configuration_parses_and_bad_ones_are_refused(tmp_path: Path) -> None:
    from cloud_serving.config import ConfigError

    example = Path(__file__).parent.parent / "config" / "serving.example.toml"
    cfg = load_config(example)
    assert cfg.models["classifier"].versions["1.3.0"].batching.preferred_sizes == [8, 16, 32]
    assert cfg.models["classifier"].versions["1.3.0"].path.is_absolute()
    bad = tmp_path / "s.toml"
    bad.write_text('[models.m]\nproduction = "2"\nversions."1".path = "m.onnx"\n')
    with pytest.raises(ConfigError, match="production version '2' is not among the versions"):
        load_config(bad)
    bad.write_text("[models.m\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such serving configuration"):
        load_config(tmp_path / "none.toml")


def test_a_promotion_is_recorded_in_the_fleet_registry(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sample_payload: Path
) -> None:
    """A canary that passes moves the release to production in the fleet server's registry
    (through staging) and appends the evidence to its model card: a real fleet server, over
    HTTP; while the registry is down, the record waits and is retried."""

    from fleet_server.app import create_app as fleet_app
    from fleet_server.auth.service import Role, create_token
    from fleet_server.db import Database
    from fleet_server.migrate import upgrade
    from shared.trust import UpdateRepository
    from tests.helpers import build_bundle
    from tests.mqtt_helpers import free_port

    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    upgrade(db)
    with db.session() as s:
        token = create_token(s, name="gateway", role=Role.ADMIN, now=datetime.now(UTC))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bundle = build_bundle(
        sample_payload, tmp_path / "c.bundle", name="classifier", version="1.1.0", skus=["edge-cpu"]
    )
    monkeypatch.setenv("TIDEGATE_REGISTRY_TOKEN", token)
    raw = load_config(models / "serving.toml").model_dump()
    raw["gateway"]["registry"] = {"url": url, "timeout_s": 2}
    config = ServingConfig.model_validate(raw)
    clock = Clock()

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        gw.start_canary(
            "classifier",
            "1.1.0",
            CanarySpec(
                steps=(50, 100), bake_s=10, min_requests=5, slo_p95_ms=1e4, slo_p99_ms=1e4, **ABSOLUTE_ONLY
            ),
            override_reason=OVERRIDE,
        )
        for _ in range(3):
            for i in range(60):
                await client.post(
                    "/v1/models/classifier/infer",
                    json={"inputs": SAMPLES[i].tolist(), "key": f"d{i}"},
                    headers=caller(),
                )
            clock.now += timedelta(seconds=11)
            gw.tick()
        assert gw.model("classifier").production == "1.1.0"
        pending = gw.registry.pending  # type: ignore[union-attr]
        assert await gw.flush_registry() == 0 and len(pending) == 2  # down: kept (the override, the canary)
        served = ServedApp(fleet_app(db, repository=UpdateRepository.init(tmp_path / "repo")), port).start()
        try:
            r = httpx.post(
                url + "/api/v1/releases",
                content=bundle.read_bytes(),
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 201, r.text
            assert await gw.flush_registry() == 2
            release = httpx.get(
                url + "/api/v1/releases?name=classifier", headers={"Authorization": f"Bearer {token}"}
            ).json()[0]
            assert release["stage"] == "production"
            sections = [c["section"] for c in release["model_card"]]
            assert "canary" in sections and sections.count("stage") == 2
        finally:
            served.stop()

    serve(config, body, clock)


def test_feature_flags_tune_the_threshold_live_and_an_outage_keeps_the_last_values(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    from fleet_server.app import create_app as fleet_app
    from fleet_server.auth.service import Role, create_token
    from fleet_server.db import Database
    from fleet_server.migrate import upgrade
    from tests.mqtt_helpers import free_port

    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    upgrade(db)
    with db.session() as s:
        token = create_token(s, name="gateway", role=Role.OPERATOR, now=datetime.now(UTC))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {token}"}
    served = ServedApp(fleet_app(db), port).start()
    assert (
        httpx.put(url + "/api/v1/flags/classifier.threshold", json={"value": 0.999}, headers=auth).status_code
        == 200
    )
    monkeypatch.setenv("TIDEGATE_REGISTRY_TOKEN", token)
    raw = load_config(models / "serving.toml").model_dump()
    raw["gateway"]["registry"] = {"url": url, "timeout_s": 1}
    raw["models"]["classifier"].update(scores_output="probabilities", threshold_flag="classifier.threshold")
    config = ServingConfig.model_validate(raw)

    async def labels(client: httpx.AsyncClient) -> list[int | None]:
        out = []
        for x in SAMPLES[:50]:
            r = await client.post(
                "/v1/models/classifier/infer", json={"inputs": x.tolist()}, headers=caller()
            )
            assert r.status_code == 200
            out.append(r.json()["label"])
        return out

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        assert gw.flags is not None and gw.flags.get("classifier.threshold") == 0.999
        strict = await labels(client)
        assert strict.count(None) > 40  # almost nothing is that confident
        assert (
            httpx.put(
                url + "/api/v1/flags/classifier.threshold", json={"value": 0.0}, headers=auth
            ).status_code
            == 200
        )
        assert await asyncio.to_thread(gw.flags.refresh)
        assert None not in await labels(client)
        served.stop()
        assert not await asyncio.to_thread(gw.flags.refresh)  # the flag store is down
        assert None not in await labels(client)  # serving goes on with the last values
        status = gw.status("classifier")["flags"]
        assert status["last_error"] and status["flags"] == 1

    serve(config, body)


def test_traces_follow_a_request_and_logs_are_json_with_personal_data_redacted(models: Path) -> None:
    import logging

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from shared.logs import JsonFormatter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    config = load_config(models / "serving.toml")

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        r = await client.post(
            "/v1/models/guarded/infer", json={"inputs": SAMPLES[0].tolist()}, headers=caller()
        )
        assert r.status_code == 200 and r.json()["fallback"]

    serve(config, body)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {"gateway.request", "gateway.preprocess", "gateway.model", "gateway.postprocess"} <= set(spans)
    root = spans["gateway.request"]
    assert all(s.context.trace_id == root.context.trace_id for s in spans.values())
    assert spans["gateway.model"].parent is not None
    assert root.attributes["tidegate.model"] == "guarded" and root.attributes["tidegate.fallback"] is True

    record = logging.LogRecord(
        "tidegate.serving", logging.WARNING, __file__, 1, "fallback answered", None, None
    )
    record.metadata = {"email": "driver@example.com", "region": "eu", "vin": "WVWZZZ1JZXW000001"}
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "fallback answered" and line["level"] == "warning"
    assert line["metadata"]["region"] == "eu"
    assert line["metadata"]["email"].startswith("redacted:") and line["metadata"]["vin"].startswith(
        "redacted:"
    )
    assert "driver@example.com" not in json.dumps(line)


def test_a_version_served_by_triton_over_its_http_protocol(models: Path, tmp_path: Path) -> None:
    """The Triton backend through `tritonclient`. No Triton server can run on this machine
    (it ships as a container image), so the test serves the KServe v2 HTTP protocol that
    Triton speaks from a small endpoint running the real ONNX model in ONNX Runtime."""

    import onnxruntime as ort

    from tests.mqtt_helpers import free_port

    sess = ort.InferenceSession(str(models / "v2.onnx"), providers=["CPUExecutionProvider"])
    v2 = FastAPI()
    calls = Counter()

    @v2.get("/v2/models/{name}")
    def metadata(name: str) -> dict[str, Any]:
        def spec(t: Any) -> dict[str, Any]:
            return {
                "name": t.name,
                "datatype": "FP32",
                "shape": [-1 if not isinstance(d, int) else d for d in t.shape],
            }

        return {
            "name": name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [spec(i) for i in sess.get_inputs()],
            "outputs": [spec(o) for o in sess.get_outputs()],
        }

    @v2.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> dict[str, Any]:
        body = json.loads(await request.body())  # tritonclient sends JSON without a JSON content type
        calls[name] += 1
        feeds = {i["name"]: np.asarray(i["data"], np.float32).reshape(i["shape"]) for i in body["inputs"]}
        names = [o.name for o in sess.get_outputs()]
        outs = sess.run(names, feeds)
        return {
            "model_name": name,
            "outputs": [
                {"name": n, "datatype": "FP32", "shape": list(o.shape), "data": o.reshape(-1).tolist()}
                for n, o in zip(names, outs, strict=True)
            ],
        }

    port = free_port()
    served = ServedApp(v2, port).start()
    raw = load_config(models / "serving.toml").model_dump()
    raw["models"]["classifier"]["versions"]["2.0.0-triton"] = {
        "triton": {"url": f"http://127.0.0.1:{port}", "model": "classifier"}
    }
    config = ServingConfig.model_validate(raw)

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        r = await client.post(
            "/v1/admin/models/classifier/switch", json={"version": "2.0.0-triton"}, headers=caller(ADMIN)
        )
        assert r.status_code == 200, r.text
        for x in SAMPLES[:20]:
            r = await client.post(
                "/v1/models/classifier/infer", json={"inputs": x.tolist()}, headers=caller()
            )
            assert r.status_code == 200 and r.json()["version"] == "2.0.0-triton"
            np.testing.assert_allclose(
                r.json()["outputs"]["probabilities"], direct(models / "v2.onnx", x), rtol=1e-5, atol=1e-6
            )
        assert calls["classifier"] == 21  # the 20 requests and the switch's probe
        r = await client.post("/v1/models/classifier/infer", json={"inputs": [1.0] * 3}, headers=caller())
        assert r.status_code == 422  # the sample shape comes from Triton's model metadata

    try:
        serve(config, body)
    finally:
        served.stop()


def test_an_experiment_serves_only_its_cohort(models: Path) -> None:
    config = load_config(models / "serving.toml")

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        r = await client.post(
            "/v1/admin/models/classifier/experiment",
            json={"control": "1.0.0", "treatment": "1.1.0", "cohort": {"region": ["eu"]}},
            headers=caller(ADMIN),
        )
        assert r.status_code == 200, r.text
        seen = Counter()
        for i in range(200):
            region = "eu" if i % 2 else "us"
            r = await client.post(
                "/v1/models/classifier/infer",
                json={"inputs": SAMPLES[i].tolist(), "key": f"u{i}", "metadata": {"region": region}},
                headers=caller(),
            )
            seen[(region, r.json()["version"], "arm" in r.json())] += 1
        assert {k for k in seen if k[0] == "us"} == {("us", "1.0.0", False)}  # outside: production, no arm
        assert seen[("eu", "1.1.0", True)] > 20 and seen[("eu", "1.0.0", True)] > 20
        exp = gw.model("classifier").experiment
        assert exp is not None and sum(a.assigned for a in exp.arms.values()) == 100
        r = await client.post(
            "/v1/admin/models/classifier/experiment",
            json={"control": "1.0.0", "treatment": "1.1.0", "hours_utc": [0, 25]},
            headers=caller(ADMIN),
        )
        assert r.status_code == 422

    serve(config, body)


def test_arms_can_differ_only_in_post_processing(models: Path) -> None:
    """One model version, two label thresholds: each arm's answers use its own, and the
    winning threshold becomes the model's."""
    config = load_config(models / "serving.toml")

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        spec = {
            "control": "lenient",
            "treatment": "strict",
            "control_version": "1.0.0",
            "treatment_version": "1.0.0",
            "control_threshold": 0.0,
            "treatment_threshold": 0.9,
            "baseline_rate": 0.2,
            "mde": 0.1,
        }
        r = await client.post("/v1/admin/models/classifier/experiment", json=spec, headers=caller(ADMIN))
        assert r.status_code == 200, r.text
        labels: dict[str, list[int | None]] = {"lenient": [], "strict": []}

        def check(i: int, got: dict[str, Any]) -> None:
            assert got["version"] == "1.0.0"
            labels[got["arm"]].append(got["label"])

        ended = await _run_experiment(gw, client, {"lenient": 0.2, "strict": 0.4}, 4000, seed=4, check=check)
        verdict = ended[0][0] if ended else None
        assert None not in labels["lenient"] and labels["strict"].count(None) > len(labels["strict"]) / 2
        assert verdict == "treatment_wins" and gw.model("classifier").threshold == 0.9
        r = await client.post(
            "/v1/admin/models/classifier/experiment",
            json={**spec, "treatment_threshold": 0.0},
            headers=caller(ADMIN),
        )
        assert r.status_code == 409 and "same post-processing" in r.json()["detail"]

    serve(config, body)


def test_an_arm_can_be_an_ensemble_and_a_winning_ensemble_becomes_production(models: Path) -> None:
    """Post-processing by ensemble weights: the treatment averages two versions' outputs
    (weights 3:1), its answers are exactly that average, and when it wins production answers
    with the ensemble until production changes again."""
    config = load_config(models / "serving.toml")
    import onnxruntime as ort

    v1, v2 = (
        ort.InferenceSession(str(models / f), providers=["CPUExecutionProvider"]).run(
            None, {"input": SAMPLES}
        )[0]
        for f in ("v1.onnx", "v2.onnx")
    )

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        spec = {
            "control": "single",
            "treatment": "blend",
            "control_version": "1.0.0",
            "treatment_ensemble": {"1.0.0": 3, "1.1.0": 1},
            "baseline_rate": 0.2,
            "mde": 0.1,
        }
        bad = {**spec, "treatment_ensemble": {"1.0.0": 1, "7.7.7": 1}}
        r = await client.post("/v1/admin/models/classifier/experiment", json=bad, headers=caller(ADMIN))
        assert r.status_code == 409 and "7.7.7" in r.json()["detail"]
        r = await client.post(
            "/v1/admin/models/classifier/experiment",
            json={**spec, "treatment_ensemble": {"1.0.0": 0}},
            headers=caller(ADMIN),
        )
        assert r.status_code == 422
        r = await client.post("/v1/admin/models/classifier/experiment", json=spec, headers=caller(ADMIN))
        assert r.status_code == 200, r.text
        seen = {"single": 0, "blend": 0}

        def check(i: int, got: dict[str, Any]) -> None:
            want = v1[i % 400] if got["arm"] == "single" else 0.75 * v1[i % 400] + 0.25 * v2[i % 400]
            np.testing.assert_allclose(got["outputs"]["probabilities"], want, rtol=1e-5, atol=1e-6)
            seen[got["arm"]] += 1

        ended = await _run_experiment(gw, client, {"single": 0.2, "blend": 0.4}, 4000, seed=5, check=check)
        verdict = ended[0][0] if ended else None
        assert verdict == "treatment_wins" and min(seen.values()) > 50
        st = gw.model("classifier")
        assert st.production == "1.0.0" and st.ensemble == {"1.0.0": 0.75, "1.1.0": 0.25}
        r = await client.post(
            "/v1/models/classifier/infer", json={"inputs": SAMPLES[0].tolist()}, headers=caller()
        )
        assert r.json()["version"] == "1.0.0*0.75+1.1.0*0.25"
        np.testing.assert_allclose(
            r.json()["outputs"]["probabilities"], 0.75 * v1[0] + 0.25 * v2[0], rtol=1e-5, atol=1e-6
        )
        await gw.switch("classifier", "1.1.0")  # a new production: the ensemble is gone
        r = await client.post(
            "/v1/models/classifier/infer", json={"inputs": SAMPLES[0].tolist()}, headers=caller()
        )
        assert r.json()["version"] == "1.1.0" and st.ensemble is None

    serve(config, body)


def test_a_standalone_gateway_keeps_its_registry_and_flags_in_a_local_file(
    models: Path, tmp_path: Path
) -> None:
    """No fleet server: promotions are recorded (stage, model-card sections) in a local JSON
    file, flags are read from the same file, and a file that breaks keeps the last flags."""
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"releases": {}, "flags": {"classifier.threshold": 0.999}}))
    raw = load_config(models / "serving.toml").model_dump()
    raw["gateway"]["registry"] = {"file": str(registry), "flags_ttl_s": 1}
    raw["models"]["classifier"].update(scores_output="probabilities", threshold_flag="classifier.threshold")
    config = ServingConfig.model_validate(raw)
    clock = Clock()

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        async def labels() -> list[int | None]:
            out = []
            for i, x in enumerate(SAMPLES[:60]):
                payload = {"inputs": x.tolist(), "key": f"d{i}"}
                r = await client.post("/v1/models/classifier/infer", json=payload, headers=caller())
                assert r.status_code == 200
                out.append(r.json()["label"])
            return out

        assert (await labels()).count(None) > 50  # the file's strict threshold is in force
        registry.write_text(json.dumps({"releases": {}, "flags": {"classifier.threshold": 0.0}}))
        assert await asyncio.to_thread(gw.flags.refresh)  # type: ignore[union-attr]
        assert None not in await labels()
        registry.write_text("{not json")
        assert not await asyncio.to_thread(gw.flags.refresh)  # type: ignore[union-attr]
        assert None not in await labels()  # the last values stay in force
        registry.write_text(json.dumps({"releases": {}, "flags": {"classifier.threshold": 0.0}}))

        gw.start_canary(
            "classifier",
            "1.1.0",
            CanarySpec(
                steps=(50, 100), bake_s=10, min_requests=5, slo_p95_ms=1e4, slo_p99_ms=1e4, **ABSOLUTE_ONLY
            ),
            override_reason=OVERRIDE,
        )
        for _ in range(3):
            await labels()
            clock.now += timedelta(seconds=11)
            gw.tick()
        assert gw.model("classifier").production == "1.1.0"
        assert await gw.flush_registry() == 2
        saved = json.loads(registry.read_text())
        release = saved["releases"]["classifier"]["1.1.0"]
        assert release["stage"] == "production"
        # the override of the shadow gate is evidence too
        assert [c["section"] for c in release["model_card"]] == ["override", "canary", "stage", "stage"]
        assert saved["flags"] == {"classifier.threshold": 0.0}  # an operator's flags are kept

    serve(config, body, clock)
    raw["gateway"]["registry"] = {"url": "http://x", "file": str(registry)}
    with pytest.raises(ValidationError, match="exactly one of url"):
        ServingConfig.model_validate(raw)


def test_a_replica_is_ready_only_with_every_version_its_routing_can_send_to(models: Path) -> None:
    config = load_config(models / "serving.toml")

    async def body(gw: Gateway, client: httpx.AsyncClient) -> None:
        r = await client.get("/readyz")
        assert r.status_code == 200 and r.json()["ready"] is True
        st = gw.model("classifier")
        st.weights = {**st.weights, "9.9.9": 0.1}  # routing names a version this replica lacks
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json() == {"ready": False, "missing": ["classifier 9.9.9"]}

    serve(config, body)
