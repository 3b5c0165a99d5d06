"""The fleet server's AWS IoT Jobs service: protocol rules on SQLite and PostgreSQL, Alembic
migrations, and the MQTT bridge serving the real agent daemon through Mosquitto."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, select

from fleet_server.db import Database
from fleet_server.devices.models import Device
from fleet_server.devices.service import register_device
from fleet_server.jobs import protocol
from fleet_server.jobs.models import ExecutionEvent, JobExecution

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
P = "$aws/things/car-1/jobs"


def setup_device(db: Database, *things: str) -> None:
    with db.session() as s:
        for t in things or ("car-1",):
            register_device(s, thing_name=t, sku="edge-cpu", now=T0)


def call(db: Database, topic: str, body: Any, now: datetime = T0) -> list[protocol.Outgoing]:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    with db.session() as s:
        return protocol.handle(s, topic, payload, now)


def reply(out: list[protocol.Outgoing]) -> tuple[str, dict[str, Any]]:
    kind = out[0].topic.rsplit("/", 1)[-1]
    return kind, out[0].payload


def queue(
    db: Database, job_id: str, thing: str = "car-1", now: datetime = T0, **kw: Any
) -> list[protocol.Outgoing]:
    with db.session() as s:
        return protocol.create_execution(s, thing, job_id, {"operation": "tidegate.install"}, now, **kw)


def test_migrations_create_the_schema_and_downgrade_cleanly(db: Database) -> None:
    from fleet_server.migrate import downgrade, upgrade

    assert {"devices", "job_executions", "execution_events", "alembic_version"} <= set(
        inspect(db.engine).get_table_names()
    )
    downgrade(db, "base")
    assert "devices" not in inspect(db.engine).get_table_names()
    upgrade(db)
    assert "job_executions" in inspect(db.engine).get_table_names()
    if db.engine.dialect.name != "postgresql":
        return
    # replicas migrating at once (every pod's init container): one migrates, the others wait
    # for it and find the schema at head; none fails on a table the other just created
    downgrade(db, "base")
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def migrate() -> None:
        replica = Database(db.url)
        barrier.wait()
        try:
            upgrade(replica)
        except BaseException as exc:
            errors.append(exc)
        finally:
            replica.engine.dispose()

    replicas = [threading.Thread(target=migrate) for _ in range(4)]
    for t in replicas:
        t.start()
    for t in replicas:
        t.join(120)
    assert errors == [], errors
    assert "job_executions" in inspect(db.engine).get_table_names()


def test_start_next_update_and_the_event_log(db: Database) -> None:
    setup_device(db)
    kind, body = reply(call(db, f"{P}/start-next", {"clientToken": "t0"}))
    assert kind == "accepted" and "execution" not in body and body["clientToken"] == "t0"
    notes = queue(db, "job-1")
    assert notes[0].topic == f"{P}/notify-next" and notes[0].payload["execution"]["jobId"] == "job-1"
    queue(db, "job-2", now=T0 + timedelta(seconds=1))
    kind, body = reply(call(db, f"{P}/get", {"clientToken": "g"}))
    assert [j["jobId"] for j in body["queuedJobs"]] == ["job-1", "job-2"] and body["inProgressJobs"] == []
    kind, body = reply(
        call(
            db,
            f"{P}/start-next",
            {"clientToken": "t1", "statusDetails": {"step": "accepted"}, "stepTimeoutInMinutes": 10},
        )
    )
    ex = body["execution"]
    assert (ex["jobId"], ex["status"], ex["versionNumber"]) == ("job-1", "IN_PROGRESS", 2)
    assert ex["jobDocument"] == {"operation": "tidegate.install"} and ex["statusDetails"] == {
        "step": "accepted"
    }
    # start-next again hands back the same IN_PROGRESS execution (a restarted device resumes it)
    assert reply(call(db, f"{P}/start-next", {}))[1]["execution"]["jobId"] == "job-1"
    out = call(
        db,
        f"{P}/job-1/update",
        {
            "status": "SUCCEEDED",
            "expectedVersion": 2,
            "clientToken": "u",
            "statusDetails": {"version": "2.0.0"},
            "includeJobExecutionState": True,
        },
    )
    kind, body = reply(out)
    assert kind == "accepted" and body["executionState"] == {
        "status": "SUCCEEDED",
        "versionNumber": 3,
        "statusDetails": {"version": "2.0.0"},
    }
    nxt = [o for o in out if o.topic.endswith("notify-next")]
    assert nxt and nxt[0].payload["execution"]["jobId"] == "job-2"  # the head of the queue moved
    with db.session() as s:
        ex1 = s.scalars(select(JobExecution).where(JobExecution.job_id == "job-1")).one()
        events = s.scalars(
            select(ExecutionEvent).where(ExecutionEvent.execution_id == ex1.id).order_by(ExecutionEvent.id)
        ).all()
        assert [(e.from_status, e.to_status) for e in events] == [
            (None, "QUEUED"),
            ("QUEUED", "IN_PROGRESS"),
            ("IN_PROGRESS", "SUCCEEDED"),
        ]
    kind, body = reply(call(db, f"{P}/$next/get", {"clientToken": "n"}))
    assert body["execution"]["jobId"] == "job-2"


@pytest.mark.parametrize(
    ("topic_suffix", "body", "code"),
    [
        ("job-1/update", {"status": "SUCCEEDED", "expectedVersion": 7}, "VersionMismatch"),
        ("job-1/update", {"status": "TIMED_OUT"}, "InvalidRequest"),
        ("job-1/update", {"status": "CANCELED"}, "InvalidRequest"),
        ("job-1/update", {"status": "DONE"}, "InvalidRequest"),
        ("job-1/update", {"status": "IN_PROGRESS", "statusDetails": {"bad key!": "x"}}, "InvalidRequest"),
        ("job-1/update", {"status": "IN_PROGRESS", "statusDetails": {"k": "x" * 1025}}, "InvalidRequest"),
        ("job-1/update", {"status": "IN_PROGRESS", "stepTimeoutInMinutes": 0}, "InvalidRequest"),
        ("job-1/update", b"{not json", "InvalidJson"),
        ("job-1/update", b"[1, 2]", "InvalidJson"),
        ("nope/update", {"status": "SUCCEEDED"}, "ResourceNotFound"),
        ("job-1/delete", {}, "InvalidTopic"),
        ("start-next", {"clientToken": 42}, "InvalidRequest"),
    ],
)
def test_bad_requests_are_rejected_with_aws_codes(
    db: Database, topic_suffix: str, body: Any, code: str
) -> None:
    setup_device(db)
    queue(db, "job-1")
    kind, payload = reply(call(db, f"{P}/{topic_suffix}", body))
    assert kind == "rejected" and payload["code"] == code, payload
    if code == "VersionMismatch":
        assert payload["executionState"]["versionNumber"] == 1


def test_terminal_states_are_final_and_queued_may_end_at_once(db: Database) -> None:
    setup_device(db)
    queue(db, "job-1")
    kind, _ = reply(call(db, f"{P}/job-1/update", {"status": "REJECTED", "statusDetails": {"reason": "sku"}}))
    assert kind == "accepted"  # QUEUED may go straight to a terminal state
    kind, body = reply(call(db, f"{P}/job-1/update", {"status": "IN_PROGRESS"}))
    assert kind == "rejected" and body["code"] == "InvalidStateTransition"


def test_unknown_thing_and_foreign_topics(db: Database) -> None:
    kind, body = reply(call(db, "$aws/things/ghost/jobs/start-next", {"clientToken": "x"}))
    assert kind == "rejected" and body["code"] == "ResourceNotFound" and body["clientToken"] == "x"
    kind, body = reply(call(db, "$aws/things/bad thing/jobs/get", {}))
    assert body["code"] == "InvalidTopic"
    kind, body = reply(call(db, "not/a/jobs/topic", {}))
    assert body["code"] == "InvalidTopic"


def test_sweep_times_out_stuck_executions_and_renotifies_queued(db: Database) -> None:
    setup_device(db, "car-1", "car-2")
    queue(db, "stuck", in_progress_timeout_min=30)
    call(db, f"{P}/start-next", {"stepTimeoutInMinutes": 5})
    queue(db, "missed", thing="car-2")
    with db.session() as s:
        assert protocol.sweep(s, T0 + timedelta(minutes=1), renotify_after=timedelta(minutes=10)) == []
    with db.session() as s:
        out = protocol.sweep(s, T0 + timedelta(minutes=6), renotify_after=timedelta(minutes=5))
    topics = {o.topic for o in out}
    assert "$aws/things/car-2/jobs/notify-next" in topics  # re-notified: it may have missed the first
    with db.session() as s:
        stuck = s.scalars(select(JobExecution).where(JobExecution.job_id == "stuck")).one()
        assert stuck.status == "TIMED_OUT" and stuck.status_details["reason"] == "timed out"
    _, body = reply(call(db, f"{P}/stuck/update", {"status": "SUCCEEDED"}))
    assert body["code"] == "InvalidStateTransition"  # a device cannot revive a timed-out execution
    # progress updates push a step timer forward
    queue(db, "alive")
    call(db, f"{P}/start-next", {"stepTimeoutInMinutes": 5}, T0 + timedelta(minutes=7))
    call(
        db,
        f"{P}/alive/update",
        {"status": "IN_PROGRESS", "stepTimeoutInMinutes": 5},
        T0 + timedelta(minutes=11),
    )
    with db.session() as s:
        protocol.sweep(s, T0 + timedelta(minutes=13), renotify_after=timedelta(hours=1))
        assert (
            s.scalars(select(JobExecution).where(JobExecution.job_id == "alive")).one().status
            == "IN_PROGRESS"
        )


def test_bridge_serves_the_real_agent(db: Database, tmp_path: Path, sample_payload: Path) -> None:
    """The agent daemon, unchanged, against the fleet server's jobs service over Mosquitto."""
    from fleet_server.jobs.bridge import JobsBridge
    from tests.agent_world import build_world, device_view
    from tests.mqtt_helpers import MOSQUITTO, Broker
    from tests.test_agent_runtime import DaemonThread, job_doc, make_config

    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto binary not installed")
    world = build_world(tmp_path / "world", sample_payload)
    broker = Broker(tmp_path / "broker").start()
    bridge = JobsBridge(db, port=broker.port, sweep_interval_s=0.5).start()
    try:
        device, _ = world.copy(tmp_path / "d")
        with db.session() as s:
            register_device(s, thing_name="dev-1", sku="edge-cpu", now=datetime.now(UTC))
        with DaemonThread(make_config(tmp_path / "d", device, broker.port)):
            bridge.queue_job("dev-1", "campaign-1-wave-1", job_doc(world, "v2"))
            bridge.queue_job("dev-1", "bad-model", job_doc(world, "v3-bad"))
            deadline = datetime.now(UTC) + timedelta(seconds=60)
            while datetime.now(UTC) < deadline:
                with db.session() as s:
                    done = s.scalars(
                        select(JobExecution).where(
                            JobExecution.status.in_(("SUCCEEDED", "FAILED", "REJECTED"))
                        )
                    ).all()
                    if len(done) == 2:
                        break
                time.sleep(0.1)
            from fleet_server.telemetry.models import TelemetryRecord

            wanted = {("receipt", "campaign-1-wave-1"), ("receipt", "bad-model"), ("beacon", None)}
            deadline = datetime.now(UTC) + timedelta(seconds=20)
            while datetime.now(UTC) < deadline:  # receipts and beacons reach the server's store
                with db.session() as s:
                    kinds = {
                        (r.kind, r.payload.get("job_id")) for r in s.scalars(select(TelemetryRecord)).all()
                    }
                if wanted <= kinds:
                    break
                time.sleep(0.1)
        with db.session() as s:
            rows = {e.job_id: e for e in s.scalars(select(JobExecution)).all()}
            assert rows["campaign-1-wave-1"].status == "SUCCEEDED"
            assert rows["campaign-1-wave-1"].status_details["version"] == "2.0.0"
            assert rows["bad-model"].status == "FAILED"
            assert "self-test failed" in rows["bad-model"].status_details["reason"]
            steps = [
                e.details.get("step")
                for e in s.scalars(
                    select(ExecutionEvent).where(ExecutionEvent.execution_id == rows["campaign-1-wave-1"].id)
                ).all()
            ]
            assert "writing" in steps and "self_testing" in steps
        assert ("receipt", "campaign-1-wave-1") in kinds and ("receipt", "bad-model") in kinds
        assert device_view(device)["version"] == "2.0.0"
    finally:
        bridge.stop()
        broker.stop()


def test_a_request_sent_again_while_its_original_waits_is_answered_once(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device whose reply is late sends the same request again (the same clientToken): the
    copies that arrive while the original is queued or being handled are dropped on receipt
    (one answer serves them all), and a copy sent after the answer is a request again."""
    from fleet_server.jobs.bridge import JobsBridge
    from tests.mqtt_helpers import MOSQUITTO, Broker, client

    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto binary not installed")
    setup_device(db, "car-1")
    queue(db, "job-1")
    broker = Broker(tmp_path / "broker").start()
    bridge = JobsBridge(db, port=broker.port, sweep_interval_s=60)
    gate = threading.Event()
    real = bridge._process

    def stalled(batch: list[Any]) -> None:  # a busy bridge: the original waits its turn
        gate.wait(20)
        real(batch)

    monkeypatch.setattr(bridge, "_process", stalled)
    bridge.start()
    replies: list[dict[str, Any]] = []
    device = client(broker.port, "car-1")
    try:
        device.on_message = lambda c, u, m: replies.append(json.loads(m.payload))
        device.subscribe(f"{P}/start-next/accepted", qos=1)
        time.sleep(0.3)
        request = json.dumps({"clientToken": "late-1"})
        for _ in range(5):
            device.publish(f"{P}/start-next", request, qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while bridge.duplicates < 4:
            assert time.monotonic() < deadline, bridge.duplicates
            time.sleep(0.05)
        gate.set()
        deadline = time.monotonic() + 10
        while not replies:
            assert time.monotonic() < deadline, "no answer"
            time.sleep(0.05)
        time.sleep(0.5)
        assert [r["clientToken"] for r in replies] == ["late-1"]  # five sent, one answer
        device.publish(f"{P}/start-next", request, qos=1).wait_for_publish(5)  # after it: new
        deadline = time.monotonic() + 10
        while len(replies) < 2:
            assert time.monotonic() < deadline, "the request sent after the answer was dropped"
            time.sleep(0.05)
        assert bridge.duplicates == 4 and bridge.counters()["jobs_duplicates"] == 4
        with db.session() as s:
            (ex,) = s.scalars(select(JobExecution)).all()
            assert ex.status == "IN_PROGRESS" and ex.version_number == 2
    finally:
        gate.set()
        device.loop_stop()
        device.disconnect()
        bridge.stop()
        broker.stop()


def test_server_cli_registers_devices_and_queues_jobs(tmp_path: Path) -> None:
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'cli.db'}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tidegate", "server", *args, "--db", url],
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert run("migrate").returncode == 0
    assert run("device-add", "car-9", "--sku", "edge-cpu").returncode == 0
    doc = json.dumps({"operation": "tidegate.install", "target": "x", "repository": "y"})
    assert run("job-create", "car-9", "--job-id", "j1", "--document", doc).returncode == 0
    for args, needle in [
        (("job-create", "car-9", "--job-id", "j1", "--document", doc), "job 'j1' already exists for 'car-9'"),
        (("job-create", "ghost", "--job-id", "j2", "--document", doc), "unknown device 'ghost'"),
        (("job-create", "car-9", "--job-id", "bad id!", "--document", doc), "invalid job id"),
        (("job-create", "car-9", "--job-id", "j3", "--document", "{oops"), "not valid JSON"),
        (("device-add", "bad thing", "--sku", "s"), "invalid thing name"),
    ]:
        p = run(*args)
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        assert p.returncode != 0 and len(lines) == 1 and needle in lines[0], p.stderr
    db = Database(url)
    with db.session() as s:
        assert [e.job_id for e in s.scalars(select(JobExecution)).all()] == ["j1"]


def test_telemetry_is_stored_deduped_bounded_and_checked(db: Database) -> None:
    from fleet_server.devices.models import Device
    from fleet_server.telemetry import service as telemetry
    from fleet_server.telemetry.models import TelemetryRecord

    setup_device(db, "car-1", "car-2")

    def beacon(seq: int, device: str = "car-1", **kw: Any) -> bytes:
        body = {
            "seq": seq,
            "device_id": device,
            "sku": "edge-cpu",
            "at": T0.isoformat(),
            "agent_version": "0.1.0",
            "active_version": "2.0.0",
            "throttle_level": 1,
            **kw,
        }
        return json.dumps(body).encode()

    with db.session() as s:
        assert telemetry.ingest(s, "tidegate/things/car-1/beacon", beacon(1), T0) == "stored"
        assert telemetry.ingest(s, "tidegate/things/car-1/beacon", beacon(1), T0) == "duplicate"
    for payload, topic, needle in [
        (beacon(2, device="car-2"), "tidegate/things/car-1/beacon", "names device car-2"),
        (b"{oops", "tidegate/things/car-1/beacon", "beacon from car-1"),
        (beacon(3, surprise=1), "tidegate/things/car-1/beacon", "beacon from car-1"),
        (beacon(4, device="ghost"), "tidegate/things/ghost/beacon", "unregistered"),
        (beacon(5), "tidegate/things/car-1/secrets", "not a telemetry topic"),
    ]:
        with db.session() as s, pytest.raises(telemetry.TelemetryRejectedError, match=needle):
            telemetry.ingest(s, topic, payload, T0)
    receipt = {
        "seq": 9,
        "device_id": "car-1",
        "at": T0.isoformat(),
        "job_id": "j",
        "outcome": "committed",
        "reason": "ok",
    }
    with db.session() as s:
        assert (
            telemetry.ingest(s, "tidegate/things/car-1/receipt", json.dumps(receipt).encode(), T0) == "stored"
        )
    for seq in range(10, 10 + telemetry.HISTORY + 20):
        with db.session() as s:
            telemetry.ingest(s, "tidegate/things/car-1/beacon", beacon(seq), T0)
    with db.session() as s:
        beacons = s.scalars(select(TelemetryRecord.seq).where(TelemetryRecord.kind == "beacon")).all()
        assert len(beacons) == telemetry.HISTORY and min(beacons) == 30  # the oldest went first
        assert s.query(TelemetryRecord).filter(TelemetryRecord.kind == "receipt").count() == 1
        device = s.get(Device, "car-1")
        assert device is not None and device.active_version == "2.0.0"
        assert device.last_beacon is not None and device.last_beacon["seq"] == 10 + telemetry.HISTORY + 19


def test_the_migrations_build_exactly_the_models_schema(db: Database) -> None:
    """Alembic's autogenerate finds nothing to add or drop: a model change without its
    migration fails here, on SQLite and on PostgreSQL."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    import fleet_server.app  # noqa: F401  (imports every model)
    from fleet_server.db import Base

    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    tables_and_columns = [
        d for d in diff if d[0] in ("add_table", "remove_table", "add_column", "remove_column")
    ]
    assert tables_and_columns == []


def test_bridge_batches_are_ordered_isolated_and_never_lose_a_message(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch, one transaction: a device's requests apply in order within it, bad input is
    rejected in place, and a message that breaks the handler costs only itself."""
    from fleet_server.jobs.bridge import JobsBridge, _Inbound

    setup_device(db, "car-1", "car-2", "car-3")
    queue(db, "job-1")
    queue(db, "job-1", thing="car-3")
    bridge = JobsBridge(db, port=1)  # never started: the batch is handed over directly
    bridge.leases.start()  # on PostgreSQL: this (only) replica claims every partition
    sent: list[protocol.Outgoing] = []
    monkeypatch.setattr(bridge, "publish", sent.extend)

    def msg(topic: str, body: Any) -> _Inbound:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        return _Inbound(topic, payload, 0, 0, time.monotonic())

    update = f"{P}/job-1/update"
    bridge._process(
        [
            msg(f"{P}/start-next", {"clientToken": "a"}),
            msg(update, {"status": "IN_PROGRESS", "expectedVersion": 2, "clientToken": "b"}),
            msg(update, {"status": "SUCCEEDED", "expectedVersion": 2, "clientToken": "c"}),  # stale
            msg(update, {"status": "SUCCEEDED", "expectedVersion": 3, "clientToken": "d"}),
            msg(f"{P}/start-next", b"{not json"),
            msg("$aws/things/car-2/jobs/start-next", {"clientToken": "e"}),
        ]
    )
    replies = [
        (o.topic.rsplit("/", 1)[-1], o.payload.get("clientToken"), o.payload.get("code")) for o in sent
    ]
    replies = [r for r in replies if r[0] in ("accepted", "rejected")]
    assert replies == [
        ("accepted", "a", None),
        ("accepted", "b", None),
        ("rejected", "c", "VersionMismatch"),
        ("accepted", "d", None),
        ("rejected", None, "InvalidJson"),
        ("accepted", "e", None),
    ]
    with db.session() as s:
        ex = s.scalars(select(JobExecution).where(JobExecution.thing_name == "car-1")).one()
        assert (ex.status, ex.version_number) == ("SUCCEEDED", 4)

    # a message that breaks the handler: InternalError for it, the rest of its batch still applies
    sent.clear()
    real = protocol.handle

    def flaky(session: Any, topic: str, payload: bytes, now: datetime) -> list[protocol.Outgoing]:
        if "car-2" in topic:
            raise RuntimeError("disk on fire")
        return real(session, topic, payload, now)

    monkeypatch.setattr(protocol, "handle", flaky)
    bridge._process(
        [
            msg("$aws/things/car-3/jobs/start-next", {"clientToken": "f"}),
            msg("$aws/things/car-2/jobs/get", {"clientToken": "g"}),
        ]
    )
    replies = [
        (o.topic.rsplit("/", 1)[-1], o.payload.get("code"))
        for o in sent
        if "accepted" in o.topic or "rejected" in o.topic
    ]
    assert replies == [("accepted", None), ("rejected", "InternalError")]
    with db.session() as s:
        ex = s.scalars(select(JobExecution).where(JobExecution.thing_name == "car-3")).one()
        assert ex.status == "IN_PROGRESS"  # committed once, in the one-by-one redo
        events = s.scalars(select(ExecutionEvent).where(ExecutionEvent.execution_id == ex.id)).all()
        assert [e.to_status for e in events] == ["QUEUED", "IN_PROGRESS"]
    assert bridge.handled == 6 + 2
    bridge.leases.stop()


def test_a_concurrent_writer_cannot_be_overwritten(db: Database) -> None:
    """versionNumber is the ORM's version column: two transactions that both change one
    execution cannot both commit (the loser fails and is redone), so no transition is lost."""
    setup_device(db)
    queue(db, "job-1")
    a = db._sessions()
    try:
        ex_a = a.scalars(select(JobExecution)).one()
        with db.session() as b:  # the sweeper, say, moves it on first
            ex_b = b.scalars(select(JobExecution)).one()
            ex_b.status, ex_b.version_number = "CANCELED", ex_b.version_number + 1
        ex_a.status, ex_a.version_number = "IN_PROGRESS", ex_a.version_number + 1
        with pytest.raises(Exception, match="(?i)stale|locked|expected to update"):
            a.commit()
    finally:
        a.rollback()
        a.close()
    with db.session() as s:
        assert s.scalars(select(JobExecution)).one().status == "CANCELED"


def test_a_batch_is_written_in_one_statement_per_table_and_still_version_checked(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL the bridge writes a batch's execution updates and events with one
    statement each (the flush's one UPDATE per row was most of a batch's time), and that
    statement checks every row's version as the flush would: a row another writer moved on
    fails the whole batch, which is then redone one message per transaction."""
    from sqlalchemy import event
    from sqlalchemy.orm.exc import StaleDataError

    from fleet_server.jobs.bridge import JobsBridge, _Inbound

    things = [f"car-{i}" for i in range(40)]
    setup_device(db, *things)
    for t in things:
        queue(db, "job-1", thing=t)
    bridge = JobsBridge(db, port=1)  # never started: batches are handed over directly
    bridge.leases.start()
    monkeypatch.setattr(bridge, "publish", lambda out: None)
    statements: list[str] = []
    event.listen(db.engine, "before_cursor_execute", lambda c, cur, sql, *a: statements.append(sql))

    def msg(thing: str, op: str, body: dict[str, Any]) -> _Inbound:
        return _Inbound(f"$aws/things/{thing}/jobs/{op}", json.dumps(body).encode(), 0, 0, time.monotonic())

    bridge._process([msg(t, "start-next", {}) for t in things])
    bridge._process([msg(t, "job-1/update", {"status": "SUCCEEDED", "expectedVersion": 2}) for t in things])
    writes = [
        sql.split("(")[0].split(" SET ")[0].strip()
        for sql in statements
        if sql.startswith(("UPDATE", "INSERT"))
    ]
    if db.engine.dialect.name == "postgresql":
        assert writes.count("UPDATE job_executions AS e") == 2  # one per batch, not one per device
        assert writes.count("INSERT INTO execution_events") == 2
        assert writes.count("UPDATE devices AS d") == 1  # last seen: once, for the 40 at once
        assert not any(w.startswith("UPDATE devices SET") for w in writes)
    # the devices re-send their final update (its reply was lost): refused, and the batch
    # looks the ended executions up in one query, not one per message
    before = len(statements)
    replies: list[protocol.Outgoing] = []
    monkeypatch.setattr(bridge, "publish", replies.extend)
    bridge._process([msg(t, "job-1/update", {"status": "SUCCEEDED", "expectedVersion": 2}) for t in things])
    reads = [sql for sql in statements[before:] if sql.startswith("SELECT") and "FROM job_executions" in sql]
    assert len(reads) == 2, reads  # the batch's pending executions, and those its updates name
    assert len(replies) == 40 and all(r.topic.endswith("/update/rejected") for r in replies)
    assert {r.payload["code"] for r in replies} == {"VersionMismatch"}, replies[0].payload
    monkeypatch.setattr(bridge, "publish", lambda out: None)
    with db.session() as s:
        rows = s.scalars(select(JobExecution)).all()
        assert {(r.status, r.version_number) for r in rows} == {("SUCCEEDED", 3)} and len(rows) == 40
        assert all(d.last_seen_at is not None for d in s.scalars(select(Device)))
        trail = s.execute(
            select(ExecutionEvent.execution_id, ExecutionEvent.to_status).order_by(ExecutionEvent.id)
        )
        per_row: dict[int, list[str]] = {}
        for execution_id, to_status in trail:
            per_row.setdefault(execution_id, []).append(to_status)
        assert set(map(tuple, per_row.values())) == {("QUEUED", "IN_PROGRESS", "SUCCEEDED")}

    # Read by a batch, moved on by another writer (the sweeper), then written: refused.
    queue(db, "job-2", thing="car-0")
    queue(db, "job-2", thing="car-1")
    a = db._sessions()
    try:
        with a.no_autoflush:
            held = protocol.prefetch_pending(a, ["car-0", "car-1"])
            for t in ("car-0", "car-1"):
                protocol.handle(a, f"$aws/things/{t}/jobs/start-next", b"{}", T0)
            with db.session() as b:
                swept = b.scalars(select(JobExecution).where(JobExecution.job_id == "job-2")).all()[1]
                swept.status, swept.version_number = "CANCELED", swept.version_number + 1
            with pytest.raises(StaleDataError):
                protocol.write_batch(a)
                a.flush()  # SQLite: the flush at commit is the check
            del held
    finally:
        a.rollback()  # as the bridge's session does when its batch raised
        a.close()
    with db.session() as s:
        job2 = {
            r.thing_name: r.status
            for r in s.scalars(select(JobExecution).where(JobExecution.job_id == "job-2"))
        }
    assert sorted(job2.values()) == ["CANCELED", "QUEUED"]  # nothing of the refused batch written
    bridge.leases.stop()


def test_a_saturated_bridge_says_it_is_busy_and_an_idle_one_does_not(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load the scheduler holds campaigns on: the share of the last window spent handling
    batches, from this replica or (its heartbeat's reading) the busiest live one."""
    from fleet_server.jobs import bridge as bridge_module
    from fleet_server.jobs.bridge import JobsBridge, _Inbound

    monkeypatch.setattr(bridge_module, "LOAD_WINDOW_S", 1.0)
    setup_device(db, "car-1")
    bridge = JobsBridge(db, port=1)  # never started: batches are handed over directly
    bridge.leases.start()
    monkeypatch.setattr(bridge, "publish", lambda out: None)
    assert bridge.load() == 0.0 and bridge.busy() is None
    real = protocol.handle

    def slow(session: Any, topic: str, payload: bytes, now: datetime) -> list[protocol.Outgoing]:
        time.sleep(0.01)  # a database that takes 10 ms a request
        return real(session, topic, payload, now)

    monkeypatch.setattr(protocol, "handle", slow)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.2:  # back to back, as when the broker holds a backlog
        bridge._process([_Inbound(f"{P}/get", b"{}", 0, 0, time.monotonic()) for _ in range(10)])
    assert bridge.load() >= 0.9
    reason = bridge.busy()
    assert reason is not None and "of the last 1 s spent answering devices" in reason
    time.sleep(1.1)  # idle for a window
    assert bridge.load() == 0.0 and bridge.busy() is None
    bridge.leases.fleet_load = 0.97  # another replica's heartbeat says it is saturated
    assert bridge.busy() == "97% of the last 1 s spent answering devices"
    bridge.leases.stop()


def test_a_wave_is_queued_in_one_insert_per_table_and_comes_back_whole(db: Database) -> None:
    """Queueing 1,200 devices writes their executions and their first events with one
    statement each (PostgreSQL: unnested arrays; the unit of work cost most of a large
    wave's tick) and reads nothing back per device: the notifications are built from the
    objects the insert returned, each device notified of its own new execution."""
    from sqlalchemy import event

    things = [f"car-{i:04d}" for i in range(1200)]
    setup_device(db, *things)
    queue(db, "job-0", thing="car-0000")  # a device with an older job pending: that stays its head
    statements: list[str] = []
    listener = lambda c, cur, sql, *a: statements.append(sql)  # noqa: E731
    event.listen(db.engine, "before_cursor_execute", listener)
    try:
        with db.session() as s:
            out = protocol.create_executions(s, things, "job-1", {"operation": "x"}, T0, wave=2)
    finally:
        event.remove(db.engine, "before_cursor_execute", listener)
    inserts = [sql.split("(")[0].strip() for sql in statements if sql.startswith("INSERT")]
    pg = db.engine.dialect.name == "postgresql"  # elsewhere: SQLAlchemy's pages of 1,000 rows
    assert inserts.count("INSERT INTO job_executions") == (1 if pg else 2)
    assert inserts.count("INSERT INTO execution_events") == 1
    selects = [sql for sql in statements if sql.startswith("SELECT")]
    assert len(selects) <= 3 * 3  # devices, duplicates, pending: one per 500 names, none per device
    nxt = {o.topic.split("/")[2]: o.payload for o in out if o.topic.endswith("notify-next")}
    assert len(nxt) == 1200
    assert nxt["car-0000"]["execution"]["jobId"] == "job-0"
    assert {p["execution"]["jobId"] for t, p in nxt.items() if t != "car-0000"} == {"job-1"}
    with db.session() as s:
        rows = s.scalars(select(JobExecution).where(JobExecution.job_id == "job-1")).all()
        assert len(rows) == 1200 and {(r.status, r.version_number, r.wave) for r in rows} == {
            ("QUEUED", 1, 2)
        }
        assert all(r.last_notified_at is not None for r in rows if r.thing_name != "car-0000")
        events = s.scalars(
            select(ExecutionEvent.to_status).where(ExecutionEvent.execution_id.in_([r.id for r in rows]))
        ).all()
        assert len(events) == 1200 and set(events) == {"QUEUED"}
