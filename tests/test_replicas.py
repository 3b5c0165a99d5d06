"""Fleet-server replicas on PostgreSQL and a real Mosquitto: the device traffic shared by
partition (`fleet_server.jobs.partitions`), a replica SIGKILLed mid-wave, another joining,
and the campaign's record checked for what failover must never do (issue 18)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, make_url, select

from fleet_server.app import create_app
from fleet_server.campaigns.models import CampaignDecision
from fleet_server.db import Database
from fleet_server.jobs.models import ExecutionEvent, JobExecution, JobsPartition
from fleet_server.jobs.partitions import PARTITIONS, DuplicateReplicaError, PartitionLeases, balance
from fleet_server.migrate import upgrade
from fleet_server.sim.fleet import SimSettings, SimulatedFleet
from shared.procs import stop_process
from tests.conftest import _worker_pg_url, empty_pg
from tests.mqtt_helpers import MOSQUITTO, Broker, free_port
from tests.test_fleet_e2e import admin_token, wait

TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED")


def test_the_partitions_are_shared_evenly_by_the_live_replicas() -> None:
    assert balance(range(64), 1) == ([], 0)
    assert balance(range(64), 2) == (list(range(32, 64)), 0)
    assert balance([], 2) == ([], 32)
    assert balance(range(10), 3) == ([], 12)  # ceil(64 / 3) = 22 each: the shares cover all 64
    assert balance(range(22), 3) == ([], 0)
    assert balance([], 0) == ([], 64)  # not yet counted itself: at most everything


@pytest.fixture
def pg() -> Any:
    if not os.environ.get("TIDEGATE_TEST_PG_URL"):
        pytest.skip("replicas need PostgreSQL: set TIDEGATE_TEST_PG_URL (.ci/run does)")
    database = Database(_worker_pg_url())
    empty_pg(database)
    upgrade(database)
    yield database
    database.engine.dispose()


def owners(db: Database) -> Counter[str]:
    with db.session() as s:
        rows = s.execute(select(JobsPartition.owner, func.count()).group_by(JobsPartition.owner)).all()
    return Counter({(o or "").split("/")[0]: n for o, n in rows})


def test_leases_hand_partitions_over_and_a_held_batch_blocks_the_claim(pg: Database) -> None:
    """Two replicas split the partitions; one's id cannot be used twice; a partition being
    handled in a batch cannot be claimed until that batch ends; a stopped replica's share goes
    to the other after the grace, a dead one's after its lease runs out."""
    a = PartitionLeases(pg, "rep-a", heartbeat_s=0.2, lease_s=1.5, stale_s=1.5, grace_s=0.5)
    b = PartitionLeases(pg, "rep-b", heartbeat_s=0.2, lease_s=1.5, stale_s=1.5, grace_s=0.5)
    a.start()
    assert a.held == PARTITIONS and owners(pg)["rep-a"] == PARTITIONS

    twin = PartitionLeases(pg, "rep-a", stale_s=1.5)
    with pytest.raises(DuplicateReplicaError, match="'rep-a' is live"):
        twin.start(wait_s=0.5)

    b.start()
    wait(lambda: owners(pg) == {"rep-a": 32, "rep-b": 32}, timeout=15, what="the partitions split")
    # a batch on one of A's partitions holds its row: B cannot take it while it runs
    mine = next(p for p in range(PARTITIONS) if a.holds_locally(p))
    with pg.session() as s:
        assert set(a.holding(s, [mine])) == {mine}
        a._stop.set()  # A stops renewing (as a replica stalled mid-batch would)
        a._thread.join(5)
        time.sleep(2.0)  # A's leases run out while the batch holds the row
        b.step()
        with pg.session() as peek:
            assert peek.get(JobsPartition, mine).owner.startswith("rep-a/")  # type: ignore[union-attr]
    # the batch is over: B claims every expired partition, and A's next batch handles nothing
    wait(lambda: owners(pg) == {"rep-b": PARTITIONS}, timeout=15, what="B took A's expired share")
    with pg.session() as s:
        assert a.holding(s, [mine]) == {}

    # a graceful stop hands everything back at once; a new replica takes it after the grace
    b.stop()
    assert owners(pg) == {"": PARTITIONS}
    c = PartitionLeases(pg, "rep-c", heartbeat_s=0.2, lease_s=1.5, stale_s=1.5, grace_s=0.5)
    t0 = time.monotonic()
    c.start()
    wait(lambda: c.held == PARTITIONS, timeout=10, what="C claimed the released partitions")
    assert time.monotonic() - t0 >= 0.4  # not before the grace: B's last messages may be in flight
    c.stop()


class TcpCut:
    """A TCP forwarder to PostgreSQL that can be cut and restored: a lost database connection
    without stopping the database the rest of the suite uses."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.port = target, free_port()
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
            self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        assert self._listener is not None
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept (close alone would not)
        self._listener.close()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._socks.clear()


def test_a_replica_that_loses_its_database_is_not_ready_and_holds_nothing_twice(pg: Database) -> None:
    url = make_url(_worker_pg_url())
    cut = TcpCut((url.host or "127.0.0.1", url.port or 5432))
    through = Database(url.set(host="127.0.0.1", port=cut.port).render_as_string(hide_password=False))
    a = PartitionLeases(through, "rep-a", heartbeat_s=0.2, lease_s=1.5, stale_s=1.5, grace_s=0.5)
    b = PartitionLeases(pg, "rep-b", heartbeat_s=0.2, lease_s=1.5, stale_s=1.5, grace_s=0.5)
    app = create_app(pg, leases=a)
    client = TestClient(app)
    try:
        a.start()
        b.start()
        wait(lambda: owners(pg) == {"rep-a": 32, "rep-b": 32}, timeout=15, what="the partitions split")
        assert client.get("/readyz").status_code == 200
        assert "tidegate_jobs_partitions_held 32.0" in client.get("/metrics").text

        cut.cut()  # A cannot reach the database: it cannot renew, and must say so
        wait(lambda: not a.healthy(), timeout=10, what="A's leases counted as lost")
        r = client.get("/readyz")
        assert r.status_code == 503 and "partition leases" in r.json()["why"]
        wait(lambda: owners(pg) == {"rep-b": PARTITIONS}, timeout=15, what="B took A's expired share")

        cut.restore()  # A comes back: it finds its leases gone, takes its share again from B
        wait(lambda: owners(pg) == {"rep-a": 32, "rep-b": 32}, timeout=30, what="the split restored")
        wait(a.healthy, timeout=10, what="A healthy again")
        assert client.get("/readyz").status_code == 200
        with pg.session() as s:  # every partition has one owner, and each knows its own
            rows = {p.partition: p.owner for p in s.scalars(select(JobsPartition))}
        assert all((owner or "").startswith("rep-a/") == a.holds_locally(p) for p, owner in rows.items())
        assert all((owner or "").startswith("rep-b/") == b.holds_locally(p) for p, owner in rows.items())
    finally:
        a.stop()
        b.stop()
        cut.cut()
        through.engine.dispose()


def is_ready(url: str) -> bool:
    """A server process's /readyz answers 200 (not yet up: False)."""
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


class Replica:
    """`tidegate server run` as one replica, its log in a file (a pipe would fill and stall it)."""

    def __init__(self, db_url: str, mqtt_port: int, client_id: str, logs: Path, *extra: str) -> None:
        self.port, self.client_id = free_port(), client_id
        self.url = f"http://127.0.0.1:{self.port}"
        logs.mkdir(parents=True, exist_ok=True)
        self.log = logs / f"{client_id}.log"
        args = [
            "server",
            "run",
            "--db",
            db_url,
            "--port",
            str(self.port),
            "--mqtt-port",
            str(mqtt_port),
            *extra,
        ]
        env = {
            **os.environ,
            "TIDEGATE_MQTT_CLIENT_ID": client_id,
            "TIDEGATE_RENOTIFY_QUEUED_S": "5",
            "TIDEGATE_SWEEP_INTERVAL_S": "1",
        }
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tidegate", *args, "--tick-s", "0.3"], stdout=out, stderr=out, env=env
            )

    def ready(self) -> Replica:
        wait(lambda: is_ready(self.url), timeout=60, what=f"{self.client_id} ready")
        return self

    def handled(self) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        line = next(x for x in text.splitlines() if x.startswith("tidegate_jobs_requests_total"))
        return float(line.split()[-1])

    def stop(self) -> None:
        stop_process(self.proc, grace_s=20)


@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto binary not installed")
def test_a_replica_killed_mid_wave_loses_nothing_and_a_joining_one_takes_a_share(
    pg: Database, tmp_path: Path
) -> None:
    devices = 2000
    broker = Broker(tmp_path / "broker").start()
    token = admin_token(pg.url)
    h = {"Authorization": f"Bearer {token}"}
    a = Replica(pg.url, broker.port, "fleet-a", tmp_path)
    b = Replica(pg.url, broker.port, "fleet-b", tmp_path)
    replicas = [a, b]
    sim = None
    try:
        a.ready(), b.ready()
        wait(lambda: owners(pg) == {"fleet-a": 32, "fleet-b": 32}, timeout=30, what="two replicas split")
        twin = Replica(pg.url, broker.port, "fleet-b", tmp_path / "twin")  # B's client id again
        replicas.append(twin)
        things = [f"rep-{i:05d}" for i in range(devices)]
        r = httpx.post(
            b.url + "/api/v1/devices/batch",
            json={"devices": [{"thing_name": t, "sku": "rep-sku"} for t in things]},
            headers=h,
            timeout=60,
        )
        assert r.status_code < 300, r.text
        sim = SimulatedFleet(
            things, SimSettings(port=broker.port, install_s=(0.05, 0.3), retry_s=3.0)
        ).start()
        spec = {
            "name": "replicas",
            "target": "m.bundle",
            "repository": "http://repo",
            "cohort": {"sku": "rep-sku"},
            "waves": [{"percent": 5}, {"percent": 40}, {"percent": 70}, {"percent": 100}],
            "rate": {"maximum_per_minute": 6000},  # 100 a second: the kill lands mid-wave
            "success_gate": {
                "conditions": [{"metric": "success_rate", "comparator": ">=", "threshold": 0.95}]
            },
        }
        cid = httpx.post(b.url + "/api/v1/campaigns", json=spec, headers=h).json()["id"]
        httpx.post(f"{b.url}/api/v1/campaigns/{cid}/submit", headers=h).raise_for_status()
        httpx.post(
            f"{b.url}/api/v1/campaigns/{cid}/approve", json={"override_reason": "replica test"}, headers=h
        ).raise_for_status()

        def succeeded() -> int:
            with pg.session() as s:
                return (
                    s.scalar(
                        select(func.count())
                        .select_from(JobExecution)
                        .where(JobExecution.status == "SUCCEEDED")
                    )
                    or 0
                )

        wait(lambda: succeeded() >= 300, timeout=120, what="the second wave under way")
        a_handled = a.handled()
        a.proc.send_signal(signal.SIGKILL)  # mid-wave, with its batches, leases and ticks
        a.proc.wait(10)
        killed_at = succeeded()
        wait(lambda: owners(pg) == {"fleet-b": PARTITIONS}, timeout=30, what="B took A's partitions")
        c = Replica(pg.url, broker.port, "fleet-c", tmp_path).ready()
        replicas.append(c)
        wait(lambda: owners(pg) == {"fleet-b": 32, "fleet-c": 32}, timeout=30, what="C took its share")

        def done() -> dict[str, Any] | None:
            body: dict[str, Any] = httpx.get(f"{c.url}/api/v1/campaigns/{cid}", headers=h, timeout=10).json()
            return body if body["state"] in ("completed", "paused", "failed", "canceled") else None

        try:
            final = wait(done, timeout=240, what="the campaign ended")
        except AssertionError:
            with pg.session() as s:
                statuses = s.execute(
                    select(JobExecution.status, func.count()).group_by(JobExecution.status)
                ).all()
                last = s.execute(
                    select(CampaignDecision.kind, CampaignDecision.message)
                    .where(CampaignDecision.campaign_id == cid)
                    .order_by(CampaignDecision.id.desc())
                    .limit(5)
                ).all()
            raise AssertionError(
                f"campaign stuck: {statuses}, last decisions {last}, sim {sim.stats}"
            ) from None
        assert final["state"] == "completed", final
        assert sum(w["counts"].get("SUCCEEDED", 0) for w in final["waves"]) == devices
        assert killed_at < devices * 0.9  # the kill was mid-campaign, not after it
        assert a_handled > 0 and c.handled() > 0  # each replica handled its share of the requests
        with pg.session() as s:
            per_thing = Counter(
                s.scalars(select(JobExecution.thing_name).where(JobExecution.campaign_id == cid))
            )
            assert len(per_thing) == devices and set(per_thing.values()) == {1}  # nobody queued twice
            terminal = Counter(
                s.scalars(
                    select(ExecutionEvent.execution_id)
                    .join(JobExecution, JobExecution.id == ExecutionEvent.execution_id)
                    .where(JobExecution.campaign_id == cid, ExecutionEvent.to_status.in_(TERMINAL))
                )
            )
            assert len(terminal) == devices and set(terminal.values()) == {1}  # one terminal transition each
            log = s.execute(
                select(CampaignDecision.kind, CampaignDecision.message).where(
                    CampaignDecision.campaign_id == cid
                )
            ).all()
        # the twin with B's client id gave up while B lived, saying why, and took nothing
        assert twin.proc.wait(30) == 1, twin.log.read_text()[-2000:]
        assert (
            "'fleet-b' is live" in twin.log.read_text() and "TIDEGATE_MQTT_CLIENT_ID" in twin.log.read_text()
        )
        kinds = Counter(k for k, _ in log)
        assert kinds["advanced"] == 3 and kinds["completed"] == 1  # each decision taken once
        notified = sum(int(m.split("notifying ")[1].split()[0]) for k, m in log if k == "queued")
        assert notified == devices  # every device queued by exactly one tick
        print(
            f"\nreplicas: {devices} devices, A killed at {killed_at} succeeded; sim retries "
            f"{sim.stats.retries}, applied on retry {sim.stats.applied_on_retry}, rejected "
            f"{dict(sim.stats.rejected)}; handled A {a_handled:.0f} (before the kill), "
            f"B {b.handled():.0f}, C {c.handled():.0f}"
        )
    finally:
        if sim is not None:
            sim.stop()
        for rep in replicas:
            rep.stop()
        broker.stop()


def test_each_replica_hears_the_busiest_live_replicas_load(pg: Database) -> None:
    """A replica writes its bridge's load in its heartbeat and reads the highest of the live
    ones: the one ticking a campaign holds it when another's jobs service is saturated."""
    a = PartitionLeases(pg, "rep-a", heartbeat_s=0.2, lease_s=1.5, stale_s=1.5, grace_s=0.5)
    b = PartitionLeases(pg, "rep-b", heartbeat_s=0.2, lease_s=1.5, stale_s=1.5, grace_s=0.5)
    a.load = lambda: 0.2
    b.load = lambda: 0.95
    a.start()
    b.start()
    try:
        wait(lambda: a.fleet_load == 0.95 and b.fleet_load == 0.95, timeout=10, what="both heard B's load")
        b.load = lambda: 0.1
        wait(lambda: a.fleet_load == 0.2, timeout=10, what="A heard B recover")
        b.stop()  # gone: its last load no longer counts
        a.load = lambda: 0.05
        wait(lambda: a.fleet_load == 0.05, timeout=10, what="A alone")
    finally:
        a.stop()
        b.stop()


@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto binary not installed")
def test_an_api_only_replica_serves_operators_and_leaves_devices_and_ticks_to_the_others(
    pg: Database, tmp_path: Path
) -> None:
    """`server run --api-only`: ready without partitions, registers no heartbeat (the full
    replicas' shares are unchanged), handles no device request, ticks nothing; a campaign
    created and approved through it is run by the full replica, and what its own actions
    publish (a log pull's notification) reaches the device. On SQLite it is refused."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from fleet_server.jobs.models import FleetReplica

    broker = Broker(tmp_path / "broker").start()
    token = admin_token(pg.url)
    h = {"Authorization": f"Bearer {token}"}
    full = Replica(pg.url, broker.port, "fleet-a", tmp_path)
    api = Replica(pg.url, broker.port, "fleet-api", tmp_path, "--api-only")
    sim = None
    listener = None
    try:
        full.ready(), api.ready()
        wait(lambda: owners(pg) == {"fleet-a": PARTITIONS}, timeout=30, what="the full replica leased all")
        with pg.session() as s:
            assert list(s.scalars(select(FleetReplica.replica_id))) == ["fleet-a"]
        things = [f"api-{i:03d}" for i in range(50)]
        httpx.post(
            api.url + "/api/v1/devices/batch",
            json={"devices": [{"thing_name": t, "sku": "api-sku"} for t in things]},
            headers=h,
            timeout=30,
        ).raise_for_status()
        sim = SimulatedFleet(things, SimSettings(port=broker.port, install_s=(0.05, 0.2))).start()
        spec = {
            "name": "through the api replica",
            "target": "m.bundle",
            "repository": "http://repo",
            "cohort": {"sku": "api-sku"},
            "waves": [{"percent": 20}, {"percent": 100}],
        }
        cid = httpx.post(api.url + "/api/v1/campaigns", json=spec, headers=h).json()["id"]
        httpx.post(f"{api.url}/api/v1/campaigns/{cid}/submit", headers=h).raise_for_status()
        httpx.post(
            f"{api.url}/api/v1/campaigns/{cid}/approve", json={"override_reason": "replica test"}, headers=h
        ).raise_for_status()
        final = wait(
            lambda: (
                (b := httpx.get(f"{api.url}/api/v1/campaigns/{cid}", headers=h).json())["state"]
                in ("completed", "paused")
                and b
            ),
            timeout=90,
            what="the campaign ended",
        )
        assert final["state"] == "completed"
        assert sum(w["counts"].get("SUCCEEDED", 0) for w in final["waves"]) == 50
        assert api.handled() == 0 and full.handled() > 0

        heard: list[str] = []
        listener = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="api-listener")
        listener.on_message = lambda c, u, m: heard.append(m.topic)
        listener.connect("127.0.0.1", broker.port)
        listener.subscribe("$aws/things/api-000/jobs/notify-next", qos=1)
        listener.loop_start()
        time.sleep(0.5)
        full.stop()  # only the API replica is left to publish it
        httpx.post(f"{api.url}/api/v1/devices/api-000/log-pull", headers=h).raise_for_status()
        wait(lambda: heard == ["$aws/things/api-000/jobs/notify-next"], timeout=10, what="the notification")
    finally:
        if listener is not None:
            listener.loop_stop()
            listener.disconnect()
        if sim is not None:
            sim.stop()
        for r in (full, api):
            r.stop()
        broker.stop()

    lite = f"sqlite:///{tmp_path}/x.db"
    tidegate = [sys.executable, "-m", "tidegate", "server"]
    subprocess.run([*tidegate, "migrate", "--db", lite], check=True, capture_output=True, timeout=60)
    refused = subprocess.run(
        [*tidegate, "run", "--api-only", "--db", lite], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0 and "needs PostgreSQL" in refused.stderr, refused.stderr
