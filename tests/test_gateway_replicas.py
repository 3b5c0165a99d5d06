"""Gateways as replicas (issue 18): the release state in PostgreSQL, one replica deciding on
every replica's samples, callers alternating between two `tidegate serve` processes, one of
them SIGKILLed and restarted mid-canary."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, text

from cloud_serving.canary import (
    CanarySpec,
    Recorded,
    spec_from_dict,
    spec_to_dict,
    state_from_dict,
    state_to_dict,
)
from cloud_serving.config import ConfigError, ReplicationConfig, load_config
from cloud_serving.diffs import SlicedDiff, Task, TaskSpec
from cloud_serving.errors import DuplicateGatewayError, ReleaseError, ReplicationError, UnknownModelError
from cloud_serving.experiments import ExperimentSpec
from cloud_serving.gateway import Gateway
from cloud_serving.providers import ProviderCondition
from cloud_serving.replication import ReleaseStore, encode
from cloud_serving.shadow import (
    Budget,
    ShadowBudget,
    ShadowStats,
    ShadowVerdict,
    budget_from_dict,
    budget_to_dict,
    judge,
)
from shared.gates import Comparator, start
from shared.procs import stop_process
from tests.conftest import _worker_pg_url
from tests.helpers import ADMIN, KEY, write_serving_models
from tests.mqtt_helpers import free_port
from tests.test_fleet_e2e import wait
from tests.test_replicas import TcpCut, is_ready

ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
CALLER_H = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def pg_url() -> str:
    if not os.environ.get("TIDEGATE_TEST_PG_URL"):
        pytest.skip("gateway replicas need PostgreSQL: set TIDEGATE_TEST_PG_URL (.ci/run does)")
    url = _worker_pg_url()
    engine = create_engine(url)
    with engine.begin() as c:
        for table in ("gateway_samples", "gateway_releases", "gateway_replicas"):
            c.execute(text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()
    return url


def test_a_canary_survives_the_trip_through_the_store() -> None:
    """What the replicas share comes back as it went: the spec with its providers, the step
    with its bake clock, and a recorder hands each sample on exactly once."""
    spec = CanarySpec(
        steps=(5, 50, 100),
        manual_steps=(2,),
        cohort=(("region", ("eu", "us")),),
        providers=(ProviderCondition("p99", "prometheus", Comparator.LE, 0.2, "http://prom:9090", "up"),),
    )
    assert spec_from_dict(spec_to_dict(spec)) == spec
    state = start(datetime(2026, 12, 4, 1, 2, 3, tzinfo=UTC))
    assert state_from_dict(state_to_dict(state)) == state

    rec = Recorded()
    for i in range(1500):  # past one automatic trim (every 1000 samples)
        rec.add("success", float(i), 1.0)
    first = rec.drain()["success"]
    assert first[0].size == 1500 and rec.drain() == {}
    rec.trim(1000.0)  # drops the 1000 oldest: what is left was sent already
    rec.add("success", 2000.0, 0.0)
    again = rec.drain()["success"]
    assert again[0].tolist() == [2000.0] and again[1].tolist() == [0.0]


def _outputs(task: Task, rng: np.random.Generator, n: int, classes: int) -> dict[str, np.ndarray[Any, Any]]:
    if task is Task.CLASSIFICATION:
        return {"scores": rng.random((n, classes)).astype(np.float32)}
    if task is Task.DETECTION:
        centre = rng.uniform(0.2, 0.8, (n, 5, 2))
        size = rng.uniform(0.05, 0.2, (n, 5, 2))
        return {
            "boxes": np.concatenate([centre, size], axis=2).astype(np.float32),
            "scores": rng.random((n, 5, classes)).astype(np.float32),
        }
    return {"path": rng.normal(size=(n, 6, 2)).cumsum(axis=1).astype(np.float32)}


@pytest.mark.parametrize("task", list(Task))
def test_two_mirrors_comparisons_combine_into_exactly_what_one_would_hold(task: Task) -> None:
    """The diff accumulators are sums (and a maximum): half the batches on each of two
    replicas' mirrors, combined through their JSON state, give every KPI row of one mirror
    that compared them all, per class and per slice, and the verdict on them."""
    rng = np.random.default_rng(7)
    spec = TaskSpec(
        task=task,
        scores_output="scores" if task is not Task.TRAJECTORY else None,
        box_format="cxcywh",
        trajectory_output="path" if task is Task.TRAJECTORY else None,
        class_names=("car", "pedestrian", "cyclist", "sign"),
    )
    whole, halves = SlicedDiff(spec), [SlicedDiff(spec), SlicedDiff(spec)]
    for i in range(12):
        classes = 2 if i < 6 else 4  # the first mirror sees fewer classes: its counts must grow
        n = int(rng.integers(1, 9))
        prod = _outputs(task, rng, n, classes)
        noise = {k: v + rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in prod.items()}
        slices = [[f"time={'night' if rng.random() < 0.4 else 'day'}", f"region=r{i % 3}"] for _ in range(n)]
        whole.add_batch(prod, noise, slices)
        halves[i % 2 if i >= 6 else 0].add_batch(prod, noise, slices)
    json_states = [json.loads(json.dumps(h.state())) for h in halves]  # as the store carries them
    combined = SlicedDiff(spec)
    for state in json_states:
        combined.absorb(state)

    def table(d: SlicedDiff) -> dict[tuple[str, str | None, str | None], tuple[float, int]]:
        return {(r.metric, r.cls, r.slice): (round(r.value, 9), r.samples) for r in d.rows()}

    assert table(combined) == table(whole)
    assert len(table(whole)) > 10 and table(halves[0]) != table(whole)  # the halves alone differ

    stats = [ShadowStats(spec), ShadowStats(spec)]
    for k, s in enumerate(stats):
        s.diff, s.compared, s.errors = halves[k], 10 * (k + 1), k
        s.candidate_ms.extend([1.0 + k] * 50)
    both = ShadowStats.combined(spec, [json.loads(json.dumps(s.state())) for s in stats])
    assert (both.compared, both.errors, len(both.candidate_ms)) == (30, 1, 100)
    kpis = both.kpis()
    assert {(r["metric"], r["samples"]) for r in kpis["rows"] if r["metric"] == "error_rate"} == {
        ("error_rate", 31)
    }
    # a budget and a verdict survive the trip through the release state
    budget = ShadowBudget(max_p95_ms=5.0, budgets=(Budget("error_rate", 0.5, min_samples=3),))
    assert budget_from_dict(json.loads(json.dumps(budget_to_dict(budget)))) == budget
    verdict = judge("1.1.0", kpis, budget.all(task), task, datetime(2026, 12, 8, tzinfo=UTC))
    assert ShadowVerdict.from_dict(json.loads(json.dumps(verdict.as_dict()))) == verdict


def test_the_store_refuses_a_live_replica_id_and_an_unreachable_store_is_named(
    pg_url: str, tmp_path: Path
) -> None:
    # replicas starting at once on a fresh database create its tables once, without a clash
    stores = [ReleaseStore(ReplicationConfig(url=pg_url, replica_id=f"gw-{i}", lease_s=2)) for i in range(6)]
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def open_at_once(store: ReleaseStore) -> None:
        barrier.wait()
        try:
            store.open({"m": encode({"production": "1"})})
        except BaseException as exc:
            errors.append(exc)

    openers = [threading.Thread(target=open_at_once, args=(s,)) for s in stores]
    for t in openers:
        t.start()
    for t in openers:
        t.join(60)
    assert errors == [], errors
    for store in stores:
        store.close()

    a = ReleaseStore(ReplicationConfig(url=pg_url, replica_id="gw-a", lease_s=2))
    a.open({"m": encode({"production": "1"})})
    twin = ReleaseStore(ReplicationConfig(url=pg_url, replica_id="gw-a", lease_s=2))
    with pytest.raises(DuplicateGatewayError, match="'gw-a' is live"):
        twin.open({}, wait_s=0.5)
    a.close()
    twin.open({})  # a graceful stop left: the id is free at once
    twin.close()

    dead = f"postgresql+psycopg://postgres:s3cret@127.0.0.1:{free_port()}/test"
    gone = ReleaseStore(ReplicationConfig(url=dead, replica_id="gw-x", timeout_s=1))
    with pytest.raises(ReplicationError, match=r"shared store postgresql\+psycopg://postgres:\*\*\*@") as err:
        gone.open({})
    assert "s3cret" not in str(err.value)
    gone.engine.dispose()

    bad = tmp_path / "bad.toml"
    models = write_serving_models(tmp_path / "models")
    bad.write_text(
        (models / "serving.toml").read_text() + '\n[gateway.replication]\nurl = "sqlite:///x.db"\n'
    )
    with pytest.raises(ConfigError, match="replication needs PostgreSQL"):
        load_config(bad)

    # `tidegate serve` on a store out of reach: one line naming it (password hidden), exit 1
    unreachable = tmp_path / "unreachable.toml"
    unreachable.write_text(
        (models / "serving.toml").read_text() + f'\n[gateway.replication]\nurl = "{dead}"\ntimeout_s = 1\n'
    )
    run = subprocess.run(
        [sys.executable, "-m", "tidegate", "serve", "--config", str(unreachable), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1 and "error: the gateways' shared store" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and "s3cret" not in run.stderr

    # a database in SQL_ASCII (psycopg then hands back bytes): one line too, not a traceback
    from sqlalchemy import make_url

    name = f"tidegate_sql_ascii_{os.getpid()}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        c.execute(
            text(
                f"CREATE DATABASE \"{name}\" ENCODING 'SQL_ASCII' TEMPLATE template0 "
                "LC_COLLATE 'C' LC_CTYPE 'C'"
            )
        )
    try:
        ascii_url = make_url(pg_url).set(database=name).render_as_string(hide_password=False)
        unreachable.write_text(
            (models / "serving.toml").read_text() + f'\n[gateway.replication]\nurl = "{ascii_url}"\n'
        )
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "tidegate",
                "serve",
                "--config",
                str(unreachable),
                "--port",
                str(free_port()),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 1 and "error: the gateways' shared store" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _config(
    models: Path, name: str, pg_url: str, replica: str, *, tick_s: float = 0.3, lease_s: float = 2
) -> Path:
    toml = models / name
    body = (models / "serving.toml").read_text()
    body = body.replace('failure_dir = "failures"', f'failure_dir = "failures"\ntick_s = {tick_s}')
    toml.write_text(
        body + f'\n[gateway.replication]\nurl = "{pg_url}"\nreplica_id = "{replica}"\nlease_s = {lease_s:g}\n'
    )
    return toml


def test_two_gateways_in_one_process_route_alike_and_a_lost_store_makes_one_unready(
    pg_url: str, tmp_path: Path
) -> None:
    """The same caller key gets the same version from either replica; an operator's change on
    one is on the other at its next tick; a replica cut off from the store says so."""
    asyncio.run(_two_in_one(pg_url, tmp_path))


async def _two_in_one(pg_url: str, tmp_path: Path) -> None:
    from sqlalchemy import make_url

    models = write_serving_models(tmp_path / "models")
    url = make_url(pg_url)
    cut = TcpCut((url.host or "127.0.0.1", url.port or 5432))
    through = url.set(host="127.0.0.1", port=cut.port).render_as_string(hide_password=False)
    a = Gateway(load_config(_config(models, "a.toml", pg_url, "gw-a")), seed=1)
    b = Gateway(load_config(_config(models, "b.toml", through, "gw-b")), seed=2)
    await a.start(tick=False)
    other = ReleaseStore(ReplicationConfig(url=pg_url, replica_id="another-deployment"))
    other.open({"not-served-here": encode({"production": "1"})})
    other.close()
    await b.start(tick=False)
    try:
        async with a.replicated():
            a.set_weights("classifier", {"1.0.0": 0.5, "1.1.0": 0.5})
        await b._replicated_tick()
        assert b.models["classifier"].weights == {"1.0.0": 0.5, "1.1.0": 0.5}
        # a replica whose configuration lacks 1.1.0 does not adopt a state routing to it, and is not ready
        lacking = _config(models, "c.toml", pg_url, "gw-c")
        lacking.write_text(lacking.read_text().replace('versions."1.1.0".path = "v2.onnx"\n', ""))
        c = Gateway(load_config(lacking), seed=3)
        await c.start(tick=False)
        try:
            assert c.models["classifier"].weights == {"1.0.0": 1.0}
            assert any("routes to 1.1.0, not loaded here" in w for w in c.replication_unready())
        finally:
            await c.stop()
        x = np.zeros(16, dtype=np.float32)
        for i in range(40):
            ka = (await a.infer("classifier", x, key=f"k{i}")).version
            kb = (await b.infer("classifier", x, key=f"k{i}")).version
            assert ka == kb, f"k{i}: {ka} on a, {kb} on b"
        assert b.replication_unready() == []
        engine = create_engine(pg_url)
        with engine.connect() as c:  # neither replica leads a model it does not serve
            owner = c.execute(
                text("SELECT owner FROM gateway_releases WHERE model = 'not-served-here'")
            ).scalar()
        engine.dispose()
        assert owner is None
        cut.cut()
        await b._replicated_tick()  # fails: no decision, the reason kept
        assert b.replication_error is not None
        time.sleep(2.1)  # longer than a lease without the store
        assert any("not reached within 2 s" in w for w in b.replication_unready())
        with pytest.raises(ReplicationError, match="cannot be reached"):
            async with b.replicated():
                pass
        cut.restore()
        await b._replicated_tick()
        assert b.replication_unready() == []
    finally:
        await a.stop()
        await b.stop()
        cut.cut()


def test_an_experiment_across_two_replicas_decides_on_both_replicas_counts(
    pg_url: str, tmp_path: Path
) -> None:
    asyncio.run(_experiment_across(pg_url, tmp_path))


async def _experiment_across(pg_url: str, tmp_path: Path) -> None:
    """Callers alternate between the replicas and report each reward to the other one (the
    request id carries its arm, sealed); the leading replica's test and sample-ratio check
    read both replicas' counts, and both replicas end on the winner."""
    models = write_serving_models(tmp_path / "models")
    a = Gateway(load_config(_config(models, "a.toml", pg_url, "gw-a")), seed=1)
    b = Gateway(load_config(_config(models, "b.toml", pg_url, "gw-b")), seed=2)
    await a.start(tick=False)
    await b.start(tick=False)
    try:
        assert a.status("classifier")["replication"]["leading"]
        spec = ExperimentSpec(control="1.0.0", treatment="1.1.0", baseline_rate=0.3, mde=0.3)
        async with a.replicated():
            a.start_experiment("classifier", spec)
        await b._replicated_tick()
        assert b.models["classifier"].experiment is not None

        rng = np.random.default_rng(7)
        x = np.zeros(16, dtype=np.float32)
        sent: Counter[str] = Counter()
        answered = []
        for i in range(300):
            here, there = (a, b) if i % 2 == 0 else (b, a)
            answer = await here.infer("classifier", x, key=f"k{i}")
            assert answer.arm is not None and answer.request_id is not None
            sent[answer.arm] += 1
            answered.append((answer.arm, answer.request_id))
            reward = float(rng.random() < (0.9 if answer.arm == "1.1.0" else 0.1))
            assert there.feedback("classifier", answer.request_id, reward) == answer.arm
        _, rid = answered[0]
        with pytest.raises(UnknownModelError):  # its reward is in: once is all
            b.feedback("classifier", rid, 1.0)
        forged = rid.replace(".0.", ".1.") if ".0." in rid else rid.replace(".1.", ".0.")
        with pytest.raises(UnknownModelError):  # the arm cannot be chosen by the caller
            a.feedback("classifier", forged, 1.0)

        await b._replicated_tick()  # sends its counts
        await a._forget()  # the leader's housekeeping keeps a running experiment's counts
        engine = create_engine(pg_url)
        with engine.connect() as c:
            kept = c.execute(text("SELECT count(*) FROM gateway_samples WHERE side = 'experiment'")).scalar()
        engine.dispose()
        assert kept and kept >= 1, kept  # b's counts, not deleted with ended experiments'
        for _ in range(3):
            await b._replicated_tick()  # sends its counts
            await a._replicated_tick()  # reads both, decides
            if a.models["classifier"].experiment is None:
                break
        assert a.models["classifier"].production == "1.1.0", a.status("classifier")["events"]
        await b._replicated_tick()
        assert b.models["classifier"].production == "1.1.0" and b.models["classifier"].experiment is None
        summary = json.loads((models / "experiments" / "classifier-1.1.0" / "ab_summary.json").read_text())
        assigned = {arm: v["assigned"] for arm, v in summary["arms"].items()}
        assert assigned == dict(sent), (assigned, sent)  # both replicas' requests, each once
        assert sum(v["rewards"] for v in summary["arms"].values()) == 300  # every reward once
        assert summary["decision"] == "treatment_wins"
    finally:
        await a.stop()
        await b.stop()


class Gw:
    """`tidegate serve` as one gateway replica, its log in a file."""

    def __init__(self, config: Path, logs: Path, name: str) -> None:
        self.config, self.name, self.port = config, name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logs / f"{name}.log"
        self.start()

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tidegate",
                    "serve",
                    "--config",
                    str(self.config),
                    "--port",
                    str(self.port),
                ],
                stdout=out,
                stderr=out,
                env={**os.environ, "PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1"},
            )

    def ready(self) -> Gw:
        try:
            wait(lambda: is_ready(self.url), timeout=60, what=f"{self.name} ready")
        except AssertionError:
            # What it was doing: the log as it is now (not as it was when the wait began), and
            # every thread's stack (PYTHONFAULTHANDLER dumps them on SIGABRT).
            alive = self.proc.poll() is None
            if alive:
                self.proc.send_signal(signal.SIGABRT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(10)
            tail = self.log.read_text()[-6000:]
            raise AssertionError(
                f"{self.name} not ready in 60 s (alive: {alive}); its log:\n{tail}"
            ) from None
        return self

    def status(self) -> dict[str, Any]:
        r = httpx.get(self.url + "/v1/admin/models/classifier", headers=ADMIN_H, timeout=5)
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc, grace_s=15)


def test_two_gateway_processes_run_one_canary_and_a_killed_one_resumes_it(
    pg_url: str, tmp_path: Path
) -> None:
    models = write_serving_models(tmp_path / "models")
    gws = [Gw(_config(models, f"{n}.toml", pg_url, n), tmp_path, n) for n in ("gw-a", "gw-b")]
    stop = threading.Event()
    served: Counter[str] = Counter()
    failed: Counter[str] = Counter()

    def callers() -> None:  # alternating between the replicas, sticky keys
        x = np.zeros(16, dtype=np.float32).tolist()
        with httpx.Client(headers=CALLER_H, timeout=5) as c:
            i = 0
            while not stop.is_set():
                gw = gws[i % 2]
                try:
                    r = c.post(
                        gw.url + "/v1/models/classifier/infer", json={"inputs": x, "key": f"k{i % 300}"}
                    )
                    (served if r.status_code == 200 else failed)[gw.name] += 1
                except httpx.TransportError:
                    failed[gw.name] += 1
                i += 1
                time.sleep(0.004)

    steps_seen: list[tuple[str, int]] = []
    logs_seen: list[list[str]] = []

    def watch() -> None:  # what each replica says the canary is doing
        while not stop.is_set():
            for gw in gws:
                try:
                    canary = gw.status()["canary"]
                except httpx.HTTPError:
                    continue
                if canary is not None:
                    steps_seen.append((gw.name, canary["step"]))
                    logs_seen.append(canary["log"])
            time.sleep(0.2)

    threads = [threading.Thread(target=f, daemon=True) for f in (callers, watch)]
    try:
        for gw in gws:
            gw.ready()
        for t in threads:
            t.start()
        canary = {
            "candidate": "1.1.0",
            "steps": [20, 50, 100],
            "bake_s": 6,
            "min_requests": 40,
            "window_s": 120,
            "slo_p95_ms": 10_000,
            "slo_p99_ms": 10_000,
            "max_latency_increase": None,
            "max_error_increase": None,
            "override_reason": "replicas under test",
        }
        r = httpx.post(
            gws[0].url + "/v1/admin/models/classifier/canary", json=canary, headers=ADMIN_H, timeout=10
        )
        assert r.status_code == 200, r.text
        wait(
            lambda: (gws[1].status()["canary"] or {}).get("candidate") == "1.1.0",
            10,
            "gw-b adopted the canary",
        )
        # a second canary asked of the other replica meets the same release state: refused
        r = httpx.post(
            gws[1].url + "/v1/admin/models/classifier/canary", json=canary, headers=ADMIN_H, timeout=10
        )
        assert r.status_code == 409 and "running a canary" in r.json()["detail"], r.text

        wait(lambda: gws[0].status()["canary"]["step"] == 1, 40, "the canary's first advance")
        # sticky across replicas: at the same revision, one key gets one version everywhere
        x = np.zeros(16, dtype=np.float32).tolist()
        with httpx.Client(headers=CALLER_H, timeout=5) as c:
            for _ in range(5):
                before = [gw.status()["replication"]["revision"] for gw in gws]
                got = {
                    gw.name: [
                        c.post(
                            gw.url + "/v1/models/classifier/infer", json={"inputs": x, "key": f"s{k}"}
                        ).json()["version"]
                        for k in range(40)
                    ]
                    for gw in gws
                }
                after = [gw.status()["replication"]["revision"] for gw in gws]
                if before == after and len(set(before)) == 1:
                    break
            assert got["gw-a"] == got["gw-b"], got
            assert set(got["gw-a"]) == {"1.0.0", "1.1.0"}  # 50 %: both versions among 40 keys

        # kill the replica that decides, mid-step; restart it: it resumes at the step it left
        leader = next(gw for gw in gws if gw.status()["replication"]["leading"])
        other = next(gw for gw in gws if gw is not leader)
        at_kill = leader.status()["canary"]
        leader.kill()
        wait(lambda: other.status()["replication"]["leading"], 15, f"{other.name} took the lead")
        leader.start()
        leader.ready()
        resumed = leader.status()["canary"]
        assert resumed is not None and resumed["step"] >= at_kill["step"] >= 1, (at_kill, resumed)
        assert resumed["step_started_at"] == at_kill["step_started_at"] or resumed["step"] > at_kill["step"]

        wait(lambda: all(gw.status()["production"] == "1.1.0" for gw in gws), 90, "the canary promoted")
    finally:
        stop.set()
        for t in threads:
            if t.ident is not None:  # started (a replica that never got ready: they were not)
                t.join(5)
        for gw in gws:
            gw.stop()

    per_replica: dict[str, list[int]] = {}
    for name, step in steps_seen:
        per_replica.setdefault(name, []).append(step)
    for name, seq in per_replica.items():  # never back to an earlier step, on either replica
        assert seq == sorted(seq), (name, seq)
    log = max(logs_seen, key=len)
    advances = [line for line in log if " ADVANCE: " in line]
    assert len(advances) == 2, log  # 20 → 50 → 100: one advance per step, never twice
    # the first step was judged on both replicas' samples; the step the leader was killed in
    # may be judged on the survivor's alone (the restarted one may have served none of it)
    assert "from replicas gw-a, gw-b" in advances[0], advances
    assert all(" from replicas gw-" in line for line in advances), advances
    print(
        f"gateway replicas: served {dict(served)}, failed {dict(failed)} (the killed one's), "
        f"killed {leader.name} at step {at_kill['step']}, resumed at {resumed['step']}; {advances}"
    )


ALERTS_TOML = """
[[models.guarded.alerts]]
name = "guarded-errors"
kind = "burn_rate"
metric = "errors"
threshold = 1.0
min_samples = 40

[[models.classifier.alerts]]
name = "classifier-accuracy"
kind = "below"
metric = "accuracy"
threshold = 0.5
min_labels = 40
min_samples = 1
"""


def test_alert_rules_judge_every_replicas_traffic_and_a_label_reaches_any_replica(
    pg_url: str, tmp_path: Path
) -> None:
    asyncio.run(_alerts_across(pg_url, tmp_path))


async def _alerts_across(pg_url: str, tmp_path: Path) -> None:
    """30 failing requests on each replica and 30 wrong labels taken by each: neither half
    reaches the rules' 40, together they do. Only the leader judges, on both halves; a label
    may be posted to the replica that did not answer (the answer's facts travel sealed in its
    request id), a label posted twice counts once, and a forged seal is refused."""
    models = write_serving_models(tmp_path / "models")
    configs = []
    for name in ("a", "b"):
        path = _config(models, f"{name}.toml", pg_url, f"gw-{name}")
        path.write_text(path.read_text() + ALERTS_TOML)
        configs.append(load_config(path))
    a, b = (Gateway(cfg, seed=i) for i, cfg in enumerate(configs, 1))
    await a.start(tick=False)
    await b.start(tick=False)
    a_stopped = False
    try:
        assert a.status("classifier")["replication"]["leading"]
        assert not b.status("classifier")["replication"]["leading"]
        x = np.zeros(16, dtype=np.float32)
        for i in range(30):
            for gw in (a, b):
                assert (await gw.infer("guarded", x, key=f"g{i}")).fallback
        answers = []
        for i in range(60):
            here, there = (a, b) if i % 2 == 0 else (b, a)
            answer = await here.infer("classifier", x, key=f"k{i}")
            assert answer.request_id is not None and "~" in answer.request_id
            answers.append((there, answer))
        for there, answer in answers:  # each label to the replica that did not answer, wrongly
            wrong = (int(np.argmax(answer.outputs["probabilities"])) + 1) % 4
            assert there.ground_truth("classifier", answer.request_id, wrong)["correct"] is False
        there, answer = answers[0]
        other = b if there is a else a
        wrong = (int(np.argmax(answer.outputs["probabilities"])) + 1) % 4
        other.ground_truth("classifier", answer.request_id, wrong)  # again, where it was answered
        with pytest.raises(UnknownModelError):  # and again where it was labelled: once is all
            there.ground_truth("classifier", answer.request_id, wrong)
        rid = answers[1][1].request_id
        assert rid is not None
        head, facts, mac = rid.split("~")
        forged = f"{head}~{facts[:-2]}{'A' if facts[-2] != 'A' else 'B'}{facts[-1]}~{mac}"
        with pytest.raises(UnknownModelError):  # a caller cannot invent the answer it labels
            a.ground_truth("classifier", forged, 0)

        await b._replicated_tick()  # b sends its half; it leads nothing, so judges nothing
        assert b.models["guarded"].alert_states == {} and b.models["classifier"].alert_states == {}
        await a._replicated_tick()  # a sends its half, reads both, judges
        guarded, classifier = a.models["guarded"], a.models["classifier"]
        assert guarded.alert_states["guarded-errors"].status == "firing", a.status("guarded")["events"]
        assert classifier.alert_states["classifier-accuracy"].status == "firing"
        assert sum(s.bad for s in guarded.outcomes["bad"]) == 60  # both replicas' failures, once
        combined = a._monitored["classifier"].calibration["1.0.0"]
        assert len(combined) == 60 and combined.accuracy() == 0.0  # 61 posts, 60 labels
        # each replica alone saw 30 (+1) labels: below min_labels, it could not have fired
        assert len(b.models["classifier"].calibration["1.0.0"]) in (30, 31)
        await a._replicated_tick()
        assert sum(s.bad for s in guarded.outcomes["bad"]) == 60  # rows re-read count once

        # A canary's accuracy reads the labels of both replicas' answers, wherever posted.
        async with a.replicated():
            a.start_canary(
                "classifier", "1.1.0", CanarySpec(steps=(50, 100), bake_s=3600), override_reason="labels"
            )
        await b._replicated_tick()
        labelled = 0
        for i in range(200):
            answer = await b.infer("classifier", x, key=f"c{i}")
            if answer.version == "1.1.0" and labelled < 10:
                right = int(np.argmax(answer.outputs["probabilities"]))
                assert answer.request_id is not None
                assert a.ground_truth("classifier", answer.request_id, right)["correct"] is True
                labelled += 1
        assert labelled == 10
        await b._replicated_tick()
        await a._replicated_tick()
        parts = a._combined["classifier"].parts["candidate"]["correct"]
        assert sorted(float(v) for _, values in parts for v in values) == [1.0] * 10
        canary = a.models["classifier"].canary
        assert canary is not None and len(canary.labels["candidate"]) == 10

        # The leader leaves; the other replica takes the lead, re-reads every stored row and
        # goes on from the rules' stored states: firing still, and nobody notified again.
        await b._replicated_tick()  # adopts the states the leader stored
        assert b.models["guarded"].alert_states["guarded-errors"].status == "firing"
        await a.stop()
        a_stopped = True
        await b._replicated_tick()  # takes the lead
        await b._replicated_tick()  # judges, on the rows it re-read
        assert "guarded" in b._led and sum(s.bad for s in b.models["guarded"].outcomes["bad"]) == 60
        assert b.models["guarded"].alert_states["guarded-errors"].status == "firing"
        fired = [e for e in b.models["guarded"].events if "alert guarded-errors firing" in e]
        assert fired == [], fired
    finally:
        if not a_stopped:
            await a.stop()
        await b.stop()


def test_a_bandit_across_two_replicas_draws_on_both_replicas_rewards(pg_url: str, tmp_path: Path) -> None:
    asyncio.run(_bandit_across(pg_url, tmp_path))


async def _bandit_across(pg_url: str, tmp_path: Path) -> None:
    """Each replica's Thompson posterior is every replica's rewards, each once (rewards
    reported to the replica that did not answer), so both replicas shift to the better arm:
    with only its own rewards each would see half the evidence."""
    models = write_serving_models(tmp_path / "models")
    a = Gateway(load_config(_config(models, "a.toml", pg_url, "gw-a")), seed=1)
    b = Gateway(load_config(_config(models, "b.toml", pg_url, "gw-b")), seed=2)
    await a.start(tick=False)
    await b.start(tick=False)
    try:
        spec = ExperimentSpec(control="1.0.0", treatment="1.1.0", mode="bandit", burn_in=20, mde=0.01)
        async with a.replicated():
            a.start_experiment("classifier", spec)
        await b._replicated_tick()
        assert b.models["classifier"].experiment is not None
        rng = np.random.default_rng(3)
        x = np.zeros(16, dtype=np.float32)
        late: Counter[str] = Counter()
        wins = 0
        for i in range(400):
            here, there = (a, b) if i % 2 == 0 else (b, a)
            answer = await here.infer("classifier", x, key=f"k{i}")
            assert answer.arm is not None and answer.request_id is not None
            won = rng.random() < (0.8 if answer.arm == "1.1.0" else 0.2)
            wins += won
            there.feedback("classifier", answer.request_id, float(won))
            if i >= 300:
                late[answer.arm] += 1
            if i % 20 == 19:  # a tick on each replica every 20 requests
                await a._replicated_tick()
                await b._replicated_tick()
        await a._replicated_tick()
        await b._replicated_tick()
        for gw in (a, b):
            exp = gw.models["classifier"].experiment
            assert exp is not None and exp.bandit is not None
            seen = sum(exp.bandit.successes.values()) + sum(exp.bandit.failures.values())
            assert seen == 400, (gw.replicas.replica_id if gw.replicas else "?", seen)  # both halves, once
            assert sum(exp.bandit.successes.values()) == wins
        assert late["1.1.0"] > 3 * late["1.0.0"], late  # both replicas moved to the better arm
    finally:
        await a.stop()
        await b.stop()


def test_an_experiment_that_sets_flags_is_ended_and_its_flags_restored_by_the_leader(
    pg_url: str, tmp_path: Path
) -> None:
    asyncio.run(_flags_across(pg_url, tmp_path))


async def _flags_across(pg_url: str, tmp_path: Path) -> None:
    """Started on the replica that does not lead: it sets the flag in the store both share;
    the treatment fails on both replicas' traffic, the leader's guardrail ends it and the
    leader, which never set the flag, restores what was there before (the earlier values
    travel in the release state)."""
    models = write_serving_models(tmp_path / "models")
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"releases": {}, "flags": {"classifier.keep": "untouched"}}))
    gws = []
    for name in ("a", "b"):
        path = _config(models, f"{name}.toml", pg_url, f"gw-{name}")
        path.write_text(path.read_text() + f'\n[gateway.registry]\nfile = "{registry}"\nflags_ttl_s = 1\n')
        gws.append(Gateway(load_config(path), seed=len(gws) + 1))
    a, b = gws
    await a.start(tick=False)
    await b.start(tick=False)
    try:
        assert a.status("classifier")["replication"]["leading"]
        spec = ExperimentSpec(control="1.0.0", treatment="9.9.9-bad", flags={"classifier.new_path": True})
        async with b.replicated():
            b.start_experiment("classifier", spec)
        assert await b.flush_flags() == 1
        assert json.loads(registry.read_text())["flags"] == {
            "classifier.keep": "untouched",
            "classifier.new_path": True,
        }
        await a._replicated_tick()
        assert a.models["classifier"].experiment is not None and a.models["classifier"].flag_restore
        x = np.zeros(16, dtype=np.float32)
        for i in range(300):
            await (a if i % 2 == 0 else b).infer("classifier", x, key=f"k{i}")
        await b._replicated_tick()  # sends its half
        await a._replicated_tick()  # reads both: the guardrail ends it
        assert a.models["classifier"].experiment is None, a.status("classifier")["events"]
        assert await a.flush_flags() == 1
        assert json.loads(registry.read_text())["flags"] == {"classifier.keep": "untouched"}
        events = a.status("classifier")["events"]
        assert any("reverted the flags it set: classifier.new_path (removed)" in e for e in events), events
        await b._replicated_tick()
        assert b.models["classifier"].experiment is None and b.models["classifier"].flag_restore == {}
        assert await b.flush_flags() == 0  # the starter does not write them a second time
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.parametrize("mirrors", ["child processes", "a shadow worker"])
def test_a_shadow_across_two_replicas_is_judged_on_both_mirrors_and_gates_the_canary_everywhere(
    pg_url: str, tmp_path: Path, mirrors: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each replica's mirror in a child process of its own, or both replicas' mirrors on one
    shadow worker (the compose file's layout: two gateways, one worker)."""
    if mirrors == "child processes":
        asyncio.run(_shadow_across(pg_url, tmp_path))
        return
    key = "0123456789abcdef-replica-shadows"
    monkeypatch.setenv("TIDEGATE_SHADOW_AUTHKEY", key)
    port, log = free_port(), tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "tidegate", "serve", "shadow-worker", "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait(lambda: "shadow worker on" in log.read_text(), 60, "the shadow worker listening")
        asyncio.run(_shadow_across(pg_url, tmp_path, worker=f"127.0.0.1:{port}"))
        assert log.read_text().count("shadow from") >= 5, log.read_text()  # both replicas' mirrors
    finally:
        stop_process(worker, grace_s=10)


async def _until(what: str, check: Any, gws: list[Gateway], timeout: float = 30) -> None:
    """Tick the replicas (each one exchange with the store) until `check()` holds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        for gw in gws:
            await gw._replicated_tick()
        await asyncio.sleep(0.1)


async def _shadow_across(pg_url: str, tmp_path: Path, worker: str | None = None) -> None:
    """A shadow started on the replica that does not lead runs a mirror on each replica; both
    replicas' KPIs and verdicts are on both mirrors' comparisons; a failing one is ended by the
    leader alone; a replica restarted mid-shadow keeps its earlier mirror's comparisons in the
    verdict; the verdict an operator's stop makes final gates a canary on the other replica."""
    models = write_serving_models(tmp_path / "models")
    serving = models / "serving.toml"  # 1.0.1 is production's own model: a shadow that agrees
    serving.write_text(
        serving.read_text().replace(
            'versions."1.1.0".path = "v2.onnx"\n',
            'versions."1.1.0".path = "v2.onnx"\nversions."1.0.1".path = "v1.onnx"\n',
        )
    )
    # a lease longer than the test's pauses (mirrors loading, a restart): a leads throughout
    if worker is not None:
        serving.write_text(
            serving.read_text().replace(
                'failure_dir = "failures"', f'failure_dir = "failures"\nshadow_worker = "{worker}"'
            )
        )
    cfg = {n: _config(models, f"{n}.toml", pg_url, n, lease_s=60) for n in ("gw-a", "gw-b")}
    a = Gateway(load_config(cfg["gw-a"]), seed=1)
    b = Gateway(load_config(cfg["gw-b"]), seed=2)
    await a.start(tick=False)
    await b.start(tick=False)
    rng = np.random.default_rng(3)
    try:
        assert a.status("classifier")["replication"]["leading"]
        assert not b.status("classifier")["replication"]["leading"]

        # a candidate that disagrees: started on b, judged failing on both mirrors, ended by a
        strict = ShadowBudget(max_diff_rate=0.05, min_samples=60)
        async with b.replicated():
            b.start_shadow("classifier", "1.1.0", share=1.0, budget=strict)
        await a._replicated_tick()
        sa, sb = a.models["classifier"].shadow, b.models["classifier"].shadow
        assert sa is not None and sb is not None and sa.id == sb.id and sa.mirror_id != sb.mirror_id
        assert all((sh.link is not None) == (worker is not None) for sh in (sa, sb))
        for sh in (sa, sb):
            assert await asyncio.to_thread(sh.ready.wait, 60), "a mirror did not load"
        for i in range(80):
            await (a if i % 2 else b).infer("classifier", rng.random(16, dtype=np.float32))
        await _until(  # each mirror has compared its half; neither replica has sent it yet
            "each mirror's 40", lambda: all(sh.state and sh.state["compared"] == 40 for sh in (sa, sb)), []
        )
        await a._replicated_tick()  # sends a's 40, reads none of b's: 40 of 60, pending
        assert sa.active and sa.verdict.verdict == "pending", sa.verdict.reason
        for _ in range(3):  # b does not lead: it shows the failing verdict on all 80, decides nothing
            await b._replicated_tick()
        assert sb.stats.summary["compared"] == 80 and sb.stats.summary["mirrors"] == 2
        assert sb.verdict.verdict == "fail" and sb.active, sb.verdict.reason
        await a._replicated_tick()  # the leader ends it, on both mirrors' 80 comparisons
        assert not sa.active and "on 2 replicas' mirrors" in (sa.stopped_reason or "")
        await b._replicated_tick()
        assert not sb.active and sb.stopped_reason == "ended on another gateway replica"
        for gw in (a, b):
            verdict = gw.models["classifier"].verdicts["1.1.0"]
            assert (verdict.verdict, verdict.final, verdict.compared) == ("fail", True, 80), verdict
        canary = CanarySpec(steps=(50, 100))
        with pytest.raises(ReleaseError, match="its shadow verdict is fail"):
            async with b.replicated():
                b.start_canary("classifier", "1.1.0", canary)

        # a candidate that agrees: 60 requests, then b restarts (a new mirror), 60 more
        agree = ShadowBudget(max_diff_rate=0.05, min_samples=100)
        async with a.replicated():
            a.start_shadow("classifier", "1.0.1", share=1.0, budget=agree)
        await b._replicated_tick()
        shadow_id = a.models["classifier"].shadow.id
        mirrors = [gw.models["classifier"].shadow for gw in (a, b)]
        for sh in mirrors:
            assert sh is not None and sh.id == shadow_id
            assert await asyncio.to_thread(sh.ready.wait, 60)
        for i in range(60):
            await (a if i % 2 else b).infer("classifier", rng.random(16, dtype=np.float32))
        sa = mirrors[0]
        assert sa is not None
        await _until("60 on both", lambda: sa.stats.summary.get("compared") == 60, [b, a])
        assert sa.verdict.verdict == "pending"  # 60 of the 100 samples the budget needs
        await b.stop()
        b = Gateway(load_config(cfg["gw-b"]), seed=4)
        await b.start(tick=False)  # adopts the running shadow: a new mirror of it
        sb = b.models["classifier"].shadow
        assert sb is not None and sb.id == shadow_id and sb.mirror_id != mirrors[1].mirror_id
        assert await asyncio.to_thread(sb.ready.wait, 60)
        for i in range(60):
            await (a if i % 2 else b).infer("classifier", rng.random(16, dtype=np.float32))
        await _until("120 on b", lambda: sb.stats.summary.get("compared") == 120, [a, b])
        assert sb.stats.summary["mirrors"] == 3  # a's, b's before its restart, b's now
        assert sb.verdict.verdict == "pass", sb.verdict.reason
        async with b.replicated():
            final = await b.stop_shadow("classifier")
        assert final["verdict"]["verdict"] == "pass" and final["verdict"]["compared"] == 120, final
        await a._replicated_tick()
        assert a.models["classifier"].shadow is not None and not a.models["classifier"].shadow.active
        assert a.models["classifier"].verdicts["1.0.1"].verdict == "pass"
        async with a.replicated():  # the gate passes on the verdict b made final: no override
            a.start_canary("classifier", "1.0.1", canary)
        assert a.models["classifier"].canary is not None
        assert a.models["classifier"].canary.shadow_agreement == (1.0, 120)

        await a._forget()  # the leader's housekeeping keeps what a running shadow needs only
        engine = create_engine(pg_url)
        with engine.connect() as c:
            left = c.execute(text("SELECT count(*) FROM gateway_samples WHERE side LIKE 's%'")).scalar()
        engine.dispose()
        assert left == 0, left  # both shadows ended: their rows are gone
    finally:
        await a.stop()
        await b.stop()


def test_a_trajectory_truth_posted_to_either_replica_reaches_the_leaders_canary_once(
    pg_url: str, tmp_path: Path
) -> None:
    asyncio.run(_paths_across(pg_url, tmp_path))


async def _paths_across(pg_url: str, tmp_path: Path) -> None:
    """A trajectory's answer on a replicated gateway carries its points sealed in its request
    id: its truth may be posted to the replica that did not answer, the leader counts each
    request id's truth once (one posted to both replicas too), and the canary's FDE gate
    rolls a stretched candidate back on both replicas' truths."""
    import onnxruntime as ort

    from builder.samples import make_trajectory_model
    from cloud_serving.app import _hash

    d = tmp_path / "models"
    d.mkdir()
    make_trajectory_model(d / "traj.onnx", seed=0)
    make_trajectory_model(d / "traj_long.onnx", seed=0, scale=1.4)
    (d / "serving.toml").write_text(
        f"""
[gateway]
api_keys_sha256 = ["{_hash(KEY)}"]
admin_keys_sha256 = ["{_hash(ADMIN)}"]
failure_dir = "failures"

[models.trajectory]
production = "1.0.0"
task = {{ kind = "trajectory", trajectory_output = "trajectory" }}
versions."1.0.0".path = "traj.onnx"
versions."1.1.0-long".path = "traj_long.onnx"
"""
    )
    a = Gateway(load_config(_config(d, "a.toml", pg_url, "gw-a", lease_s=60)), seed=1)
    b = Gateway(load_config(_config(d, "b.toml", pg_url, "gw-b", lease_s=60)), seed=2)
    await a.start(tick=False)
    await b.start(tick=False)
    truth_model = ort.InferenceSession(str(d / "traj.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    try:
        spec = CanarySpec(
            steps=(50, 100),
            bake_s=1,
            min_requests=20,
            min_labels=40,
            window_s=600,
            slo_p95_ms=10_000,
            slo_p99_ms=10_000,
            max_latency_increase=None,
            max_error_increase=None,
            max_fde_increase=0.1,
        )
        async with a.replicated():
            a.start_canary("trajectory", "1.1.0-long", spec, override_reason="the FDE gate across replicas")
        await b._replicated_tick()
        assert b.models["trajectory"].canary is not None
        sent: Counter[str] = Counter()
        for i in range(200):
            here, there = (a, b) if i % 2 else (b, a)
            x = rng.standard_normal(16).astype(np.float32)
            answer = await here.infer("trajectory", x)
            assert answer.request_id is not None and answer.request_id.count("~") == 2
            truth = truth_model.run(None, {"history": x[None]})[0][0] + rng.normal(0, 0.01, (12, 2))
            got = there.ground_truth("trajectory", answer.request_id, truth.tolist())
            assert got["version"] == answer.version
            sent[answer.version] += 1
            if i == 0:  # the same truth posted to the replica that answered too: counted once
                here.ground_truth("trajectory", answer.request_id, truth.tolist())
        rid = answer.request_id
        with pytest.raises(UnknownModelError):  # posted twice to one replica: once is all
            there.ground_truth("trajectory", rid, truth.tolist())
        forged = rid[: rid.rindex("~")] + "~" + "0" * 16
        with pytest.raises(UnknownModelError):  # points a caller invented are not judged
            a.ground_truth("trajectory", forged, truth.tolist())

        await b._replicated_tick()  # b sends its truths; it does not lead: it judges nothing
        assert b.models["trajectory"].canary is not None
        await a._replicated_tick()  # a reads both replicas' truths
        comb = a._combined["trajectory"]
        counted = {
            side: sum(len(at) for at, _ in comb.parts[side]["fde"]) for side in ("candidate", "baseline")
        }
        assert counted == {"candidate": sent["1.1.0-long"], "baseline": sent["1.0.0"]}, (counted, sent)
        deadline = time.monotonic() + 30
        while a.models["trajectory"].canary is not None:
            assert time.monotonic() < deadline, a.status("trajectory")["events"][-3:]
            await asyncio.sleep(0.5)
            await b._replicated_tick()
            await a._replicated_tick()
        events = a.status("trajectory")["events"]
        assert any("rolled back" in e and "fde vs baseline" in e for e in events), events[-3:]
        await b._replicated_tick()
        assert b.models["trajectory"].canary is None and b.models["trajectory"].production == "1.0.0"
    finally:
        await a.stop()
        await b.stop()
