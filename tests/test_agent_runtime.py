"""The device daemon against a real Mosquitto and a scripted AWS IoT Jobs endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.engine import Agent
from agent.runtime import AgentDaemon
from tests.agent_world import World, build_world, device_view
from tests.mqtt_helpers import MOSQUITTO, Broker, JobsEndpoint, client

pytestmark = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto binary not installed")

THING = "dev-1"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, sample_payload: Path) -> World:
    return build_world(tmp_path_factory.mktemp("runtime"), sample_payload)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def endpoint(broker: Broker) -> Iterator[JobsEndpoint]:
    e = JobsEndpoint(broker.port)
    yield e
    e.close()


def write_vehicle(path: Path, **state: Any) -> None:
    base = {
        "battery_pct": 90,
        "ignition": "off",
        "parked": True,
        "network": "wifi",
        "firmware": "2.0.0",
        "updated_at": datetime.now(UTC).isoformat(),
    }
    base.update(state)
    path.write_text(json.dumps(base))


def write_temp(thermal: Path, celsius: float) -> None:
    zone = thermal / "thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("soc\n")
    (zone / "temp").write_text(f"{int(celsius * 1000)}\n")


def make_config(tmp_path: Path, device: Path, port: int, **sections: dict[str, Any]) -> Path:
    thermal = tmp_path / "thermal"
    write_temp(thermal, 45.0)
    vehicle = tmp_path / "vehicle.json"
    write_vehicle(vehicle)
    cfg: dict[str, dict[str, Any]] = {
        "device": {"root": str(device)},
        "mqtt": {"port": port, "reconnect_min_s": 1, "reconnect_max_s": 2, "keepalive_s": 5},
        "jobs": {"poll_s": 1, "progress_interval_s": 0, "precondition_recheck_s": 0.2, "reply_timeout_s": 3},
        "vehicle": {"state_file": str(vehicle)},
        "thermal": {"root": str(thermal), "poll_s": 0.1},
        "telemetry": {"beacon_interval_s": 0.3},
        "health": {"port": 0},
        "batcher": {"max_batch": 8, "concurrency": 2},
    }
    for k, v in sections.items():
        cfg[k].update(v)
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class DaemonThread:
    """An AgentDaemon running in its own thread and event loop."""

    def __init__(self, config: Path) -> None:
        self.daemon: AgentDaemon | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self._cfg = AgentConfig.load(config)
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def go() -> None:
            self.loop = asyncio.get_running_loop()
            self.daemon = AgentDaemon(self._cfg)
            self._started.set()
            await self.daemon.run()

        try:
            asyncio.run(go())
        except BaseException as exc:
            self.error = exc
            self._started.set()

    def __enter__(self) -> DaemonThread:
        self.thread.start()
        self._started.wait(30)
        assert self.error is None, self.error
        return self

    def call(self, fn: Any, *args: Any) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(_call(fn, *args), self.loop).result(30)

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self.daemon is not None:
            self.loop.call_soon_threadsafe(self.daemon.stop)
        self.thread.join(30)
        assert self.error is None, self.error


async def _call(fn: Any, *args: Any) -> Any:
    return fn(*args)


def wait_for(predicate: Any, timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def job_doc(world: World, key: str, **extra: Any) -> dict[str, Any]:
    return {
        "operation": "tidegate.install",
        "target": world.targets[key],
        "repository": str(world.repo),
        **extra,
    }


class Collector:
    """Subscribes to a topic filter and keeps every payload, in arrival order."""

    def __init__(self, port: int, topic: str, client_id: str) -> None:
        self.messages: list[dict[str, Any]] = []
        self.c = client(port, client_id, persistent=True)
        self.c.on_message = lambda c, u, m: self.messages.append(json.loads(m.payload))
        self.c.on_connect = lambda c, u, f, r, p: c.subscribe(topic, qos=1)
        self.c.subscribe(topic, qos=1)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


# ---- the protocol, end to end ---------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["paho", "awsiot"])
def test_notify_start_next_progress_succeeded(
    world: World, tmp_path: Path, broker: Broker, endpoint: JobsEndpoint, transport: str
) -> None:
    """The same protocol over both transports: paho-mqtt and the AWS IoT Device SDK v2 (awscrt)."""
    device, _ = world.copy(tmp_path)
    receipts = Collector(broker.port, f"tidegate/things/{THING}/receipt", "receipts")
    with DaemonThread(make_config(tmp_path, device, broker.port, mqtt={"transport": transport})) as d:
        expected = {"paho": "PahoTransport", "awsiot": "AwsIotTransport"}[transport]
        assert type(d.daemon.transport).__name__ == expected  # type: ignore[union-attr]
        endpoint.add_job(THING, "job-1", job_doc(world, "v2"))
        ex = endpoint.wait_status(THING, "job-1", {"SUCCEEDED", "FAILED", "REJECTED"})
        assert ex.status == "SUCCEEDED", ex.history
        steps = [h[1].get("step") for h in ex.history if h[0] == "IN_PROGRESS"]
        for step in ("downloading", "verifying", "writing", "flipped", "self_testing"):
            assert step in steps, steps
        assert any("progress" in h[1] for h in ex.history)
        assert ex.details["version"] == "2.0.0" and ex.details["outcome"] == "committed"
        assert endpoint.terminal(THING, "job-1") == ["SUCCEEDED"]
        wait_for(lambda: any(r["job_id"] == "job-1" for r in receipts.messages), what="receipt")
        assert d.daemon is not None and d.daemon.batcher is not None
        wait_for(lambda: d.daemon.batcher.runner is not None, what="model reloaded")  # type: ignore[union-attr]
    receipts.close()
    assert device_view(device)["version"] == "2.0.0"
    start_next = [b for t, b in endpoint.requests if t.endswith("start-next")]
    assert all("clientToken" in b for b in start_next)


def test_a_throttled_final_update_is_retried_until_it_lands(
    world: World, tmp_path: Path, broker: Broker, endpoint: JobsEndpoint
) -> None:
    """The service sheds load with RequestThrottled: the outcome of an install must still
    arrive (later), not be dropped as a rejected update would be."""
    device, _ = world.copy(tmp_path)
    endpoint.throttle_terminal = 2
    with DaemonThread(make_config(tmp_path, device, broker.port)):
        endpoint.add_job(THING, "job-t", job_doc(world, "v2"))
        ex = endpoint.wait_status(THING, "job-t", {"SUCCEEDED", "FAILED", "REJECTED"})
    assert ex.status == "SUCCEEDED" and endpoint.throttle_terminal == 0
    finals = [
        i
        for i, (t, b) in enumerate(endpoint.requests)
        if t.endswith("job-t/update") and b["status"] == "SUCCEEDED"
    ]
    assert len(finals) >= 3  # two throttled, then accepted
    between = [t for t, _ in endpoint.requests[finals[0] : finals[-1]] if t.endswith("start-next")]
    assert between == []  # the same update retried, not the job dropped and started over


def _starts(device: Path) -> int | None:
    path = device / "starts.json"
    return int(json.loads(path.read_text())["starts"]) if path.exists() else None


def test_beacons_count_restarts_since_the_active_version(
    world: World, tmp_path: Path, broker: Broker
) -> None:
    """What a campaign's relative wave gate compares: each start of the agent on the same
    active version counts; the count is persisted across starts (starts.json)."""
    device, _ = world.copy(tmp_path)
    cfg = make_config(tmp_path, device, broker.port)
    seen = []
    for n in range(1, 4):
        with DaemonThread(cfg) as d:
            assert d.daemon is not None
            wait_for(lambda n=n: _starts(device) == n, what="start")
            wait_for(lambda n=n: d.daemon.restarts == n - 1, what="counted")  # type: ignore[union-attr]
            seen.append(d.daemon.beacon().restarts)
    assert seen == [0, 1, 2]
    assert json.loads((device / "starts.json").read_text())["starts"] == 3


def test_rejected_and_failed_paths(
    world: World, tmp_path: Path, broker: Broker, endpoint: JobsEndpoint
) -> None:
    device, _ = world.copy(tmp_path)
    with DaemonThread(make_config(tmp_path, device, broker.port)):
        endpoint.add_job(THING, "sku", job_doc(world, "other-sku"))
        ex = endpoint.wait_status(THING, "sku", {"SUCCEEDED", "FAILED", "REJECTED"})
        assert ex.status == "REJECTED" and "this device is edge-cpu" in ex.details["reason"]
        endpoint.add_job(THING, "sku-doc", job_doc(world, "v2", skus=["other-sku"]))
        ex = endpoint.wait_status(THING, "sku-doc", {"SUCCEEDED", "FAILED", "REJECTED"})
        assert ex.status == "REJECTED" and "this device is edge-cpu" in ex.details["reason"]
        endpoint.add_job(THING, "unknown-field", {**job_doc(world, "v2"), "surprise": 1})
        ex = endpoint.wait_status(THING, "unknown-field", {"SUCCEEDED", "FAILED", "REJECTED"})
        assert ex.status == "REJECTED" and "surprise" in ex.details["reason"]
        endpoint.add_job(THING, "not-an-object", "install please")  # type: ignore[arg-type]
        ex = endpoint.wait_status(THING, "not-an-object", {"SUCCEEDED", "FAILED", "REJECTED"})
        assert ex.status == "REJECTED"
        endpoint.add_job(THING, "bad-model", job_doc(world, "v3-bad"))
        ex = endpoint.wait_status(THING, "bad-model", {"SUCCEEDED", "FAILED", "REJECTED"})
        assert ex.status == "FAILED" and "self-test failed" in ex.details["reason"]
        assert ex.details["outcome"] == "rolled_back"
    assert device_view(device)["version"] == "1.0.0"


def test_malformed_and_foreign_messages_never_stop_the_daemon(
    world: World, tmp_path: Path, broker: Broker, endpoint: JobsEndpoint
) -> None:
    device, _ = world.copy(tmp_path)
    with DaemonThread(make_config(tmp_path, device, broker.port)) as d:
        noisy = client(broker.port, "noisy")
        for topic in (
            f"$aws/things/{THING}/jobs/notify-next",
            f"$aws/things/{THING}/jobs/start-next/accepted",
            f"$aws/things/{THING}/jobs/job-x/update/rejected",
        ):
            for payload in (b"{not json", b"[1,2]", b'{"clientToken": 5}', b"\xff\xfe"):
                noisy.publish(topic, payload, qos=1).wait_for_publish(5)
        d.call(d.daemon.jobs.handle, "$aws/things/someone-else/jobs/notify-next", b"{}")  # type: ignore[union-attr]
        noisy.loop_stop()
        noisy.disconnect()
        endpoint.add_job(THING, "after-noise", job_doc(world, "v2"))
        assert endpoint.wait_status(THING, "after-noise", {"SUCCEEDED", "FAILED"}).status == "SUCCEEDED"


def test_version_conflict_is_resolved(
    world: World, tmp_path: Path, broker: Broker, endpoint: JobsEndpoint
) -> None:
    """An update whose expectedVersion is stale is rejected; the agent re-reads and retries."""
    device, _ = world.copy(tmp_path)
    original = endpoint._on_message
    bumped = []

    def meddle(c: Any, u: Any, msg: Any) -> None:
        if msg.topic.endswith("/update") and not bumped:
            with endpoint.lock:
                ex = endpoint.executions[THING][0]
                ex.version += 1  # someone else touched the execution
            bumped.append(True)
        original(c, u, msg)

    endpoint.c.on_message = meddle
    with DaemonThread(make_config(tmp_path, device, broker.port)):
        endpoint.add_job(THING, "conflict", job_doc(world, "v2"))
        assert endpoint.wait_status(THING, "conflict", {"SUCCEEDED", "FAILED"}).status == "SUCCEEDED"
    assert bumped


# ---- preconditions and thermal ------------------------------------------------------------------


def test_unmet_preconditions_are_reported_and_waited_for(
    world: World, tmp_path: Path, broker: Broker, endpoint: JobsEndpoint
) -> None:
    device, _ = world.copy(tmp_path)
    cfg = make_config(tmp_path, device, broker.port)
    write_vehicle(
        tmp_path / "vehicle.json", battery_pct=12, parked=False, network="cellular", firmware="1.0.0"
    )
    pre = {
        "min_battery_pct": 30,
        "require_parked": True,
        "networks": ["wifi"],
        "min_firmware": "1.5.0",
        "min_free_disk_mb": 1,
        "max_temperature_c": 85,
    }
    with DaemonThread(cfg):
        endpoint.add_job(THING, "pre", job_doc(world, "v2", preconditions=pre))

        def waiting() -> dict[str, str] | None:
            with endpoint.lock:
                ex = endpoint.executions[THING][0]
                return ex.details if ex.details.get("step") == "waiting" else None

        details = wait_for(waiting, what="waiting status")
        for needle in (
            "battery: battery 12% < 30%",
            "parked: vehicle not parked",
            "network: network cellular not in wifi",
            "firmware: firmware 1.0.0 < 1.5.0",
        ):
            assert needle in details["unmet"], details
        time.sleep(0.5)
        assert device_view(device)["version"] == "1.0.0"  # nothing installed while waiting
        write_vehicle(tmp_path / "vehicle.json", battery_pct=80)
        ex = endpoint.wait_status(THING, "pre", {"SUCCEEDED", "FAILED", "REJECTED"})
        assert ex.status == "SUCCEEDED"
    assert device_view(device)["version"] == "2.0.0"


def test_thermal_governor_throttles_and_defers_installs(
    world: World, tmp_path: Path, broker: Broker, endpoint: JobsEndpoint
) -> None:
    device, _ = world.copy(tmp_path)
    cfg = make_config(tmp_path, device, broker.port)
    thermal = tmp_path / "thermal"
    with DaemonThread(cfg) as d:
        daemon = d.daemon
        assert daemon is not None and daemon.batcher is not None
        wait_for(lambda: daemon.temps, what="first thermal reading")
        assert daemon.throttle.level == 0 and daemon.batcher.max_batch == 8
        write_temp(thermal, 86.0)  # past 70 and 80: level 2, installs deferred
        wait_for(lambda: daemon.throttle.level == 2, what="throttle level 2")
        assert daemon.batcher.max_batch == 2 and daemon.batcher.concurrency == 1
        assert daemon.batcher.pacing_s > 0
        endpoint.add_job(THING, "hot", job_doc(world, "v2"))

        def deferred() -> bool:
            with endpoint.lock:
                ex = endpoint.executions[THING][0]
                return "temperature" in ex.details.get("unmet", "")

        wait_for(deferred, what="install deferred for temperature")
        write_temp(thermal, 77.0)  # below 80 but not below 80 - 5: hysteresis keeps level 2
        time.sleep(0.5)
        assert daemon.throttle.level == 2
        write_temp(thermal, 60.0)
        wait_for(lambda: daemon.throttle.level == 0, what="cooled down")
        assert daemon.batcher.max_batch == 8 and daemon.batcher.pacing_s == 0
        assert endpoint.wait_status(THING, "hot", {"SUCCEEDED", "FAILED"}).status == "SUCCEEDED"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{daemon.health.port}/metrics", timeout=5).read()
        assert b"tidegate_agent_throttle_level 0.0" in metrics
        assert b'tidegate_agent_temperature_celsius{zone="thermal_zone0:soc"} 60.0' in metrics


# ---- broker and agent failures ------------------------------------------------------------------


def test_broker_restart_mid_install_and_offline_beacons_arrive_in_order(
    world: World, tmp_path: Path, broker: Broker, endpoint: JobsEndpoint
) -> None:
    device, _ = world.copy(tmp_path)
    cfg = make_config(tmp_path, device, broker.port)
    write_vehicle(tmp_path / "vehicle.json", battery_pct=5)  # hold the job until the broker is down
    beacons = Collector(broker.port, f"tidegate/things/{THING}/beacon", "beacon-collector")
    with DaemonThread(cfg) as d:
        endpoint.add_job(THING, "outage", job_doc(world, "v2", preconditions={"min_battery_pct": 20}))
        wait_for(lambda: endpoint.executions[THING][0].details.get("step") == "waiting", what="waiting")
        endpoint.close()
        broker.stop()
        assert d.daemon is not None
        wait_for(lambda: not d.daemon.transport.connected, what="agent sees the broker gone")  # type: ignore[union-attr]
        write_vehicle(tmp_path / "vehicle.json", battery_pct=90)  # the install runs while offline
        wait_for(lambda: device_view_safe(device) == "2.0.0", timeout=60, what="install while offline")
        time.sleep(1.0)  # beacons pile up in the outbox while offline
        beacon_topic = f"tidegate/things/{THING}/beacon"
        queued = [
            json.loads(m.payload)["seq"] for m in d.daemon.outbox.peek(10_000) if m.topic == beacon_topic
        ]
        assert len(queued) >= 3
        broker.start()
        endpoint2 = JobsEndpoint(broker.port)
        endpoint2.executions = endpoint.executions  # the service's state outlives its connection
        try:
            ex = endpoint2.wait_status(THING, "outage", {"SUCCEEDED", "FAILED"}, timeout=60)
            assert ex.status == "SUCCEEDED"
            wait_for(
                lambda: set(queued) <= {b["seq"] for b in beacons.messages},
                timeout=30,
                what="every beacon queued offline",
            )
        finally:
            endpoint2.close()
    beacons.close()
    arrived = list(
        dict.fromkeys(b["seq"] for b in beacons.messages)
    )  # QoS 1 may repeat; first arrival counts
    assert [s for s in arrived if s in set(queued)] == queued  # all of them, in the order they were queued
    assert arrived == sorted(arrived)
    assert endpoint.terminal(THING, "outage") == ["SUCCEEDED"]


def device_view_safe(device: Path) -> str | None:
    try:
        return (
            str(Agent(device).status()["active_version"])
            if Agent(device).status()["state"] == "idle"
            else None
        )
    except Exception:
        return None


def test_agent_killed_mid_install_resumes_to_one_terminal_status(
    world: World, tmp_path: Path, broker: Broker, endpoint: JobsEndpoint
) -> None:
    device, _ = world.copy(tmp_path)
    cfg = make_config(tmp_path, device, broker.port)
    env = {**os.environ, "TIDEGATE_FAULT_KILL_AT": "after:writing"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidegate", "agent", "run", "--config", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    endpoint.add_job(THING, "killed", job_doc(world, "v2"))
    proc.wait(60)
    assert proc.returncode == -9  # SIGKILLed itself mid-install
    with endpoint.lock:
        assert endpoint.executions[THING][0].status == "IN_PROGRESS"
    env.pop("TIDEGATE_FAULT_KILL_AT")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidegate", "agent", "run", "--config", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        ex = endpoint.wait_status(THING, "killed", {"SUCCEEDED", "FAILED", "REJECTED"}, timeout=60)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=40)
    assert proc.returncode == 0, err.decode()[-3000:]  # SIGTERM is a clean stop
    assert ex.status == "SUCCEEDED"
    assert endpoint.terminal(THING, "killed") == ["SUCCEEDED"]
    assert device_view(device)["version"] == "2.0.0"


# ---- health, watchdog, config -------------------------------------------------------------------


def test_health_endpoints_inference_and_systemd_notify(
    world: World, tmp_path: Path, broker: Broker, endpoint: JobsEndpoint
) -> None:
    device, _ = world.copy(tmp_path)
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(10)
    os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"] = sock_path, "200000"
    try:
        with DaemonThread(make_config(tmp_path, device, broker.port)) as d:
            assert sock.recv(64) == b"READY=1"
            assert sock.recv(64) == b"WATCHDOG=1"
            daemon = d.daemon
            assert daemon is not None
            base = f"http://127.0.0.1:{daemon.health.port}"
            assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
            wait_for(
                lambda: daemon.transport.connected and daemon.batcher and daemon.batcher.runner, what="ready"
            )
            assert urllib.request.urlopen(base + "/readyz", timeout=5).status == 200
            req = urllib.request.Request(
                base + "/v1/infer", data=json.dumps({"input": [0.1] * 16}).encode(), method="POST"
            )
            out = json.loads(urllib.request.urlopen(req, timeout=5).read())
            probs = out["outputs"]["probabilities"]
            assert len(probs) == 4 and abs(sum(probs) - 1) < 1e-5
            # the beacon's quality proxy: the mean top score, by the device's time of day
            quality = daemon.beacon().inference.quality
            assert len(quality) == 1 and next(iter(quality)).startswith("top_score_mean@time=")
            assert next(iter(quality.values())) == pytest.approx(max(probs), abs=1e-6)
            bad = urllib.request.Request(base + "/v1/infer", data=b"{oops", method="POST")
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(bad, timeout=5)
            assert err.value.code == 400
        messages = []  # the daemon has stopped; what it said last is still in the socket
        sock.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            while True:
                messages.append(sock.recv(64))
        assert messages and messages[-1] == b"STOPPING=1"
        assert set(messages[:-1]) <= {b"WATCHDOG=1"}
    finally:
        del os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"]
        sock.close()


def test_a_damaged_slot_with_no_good_one_to_fall_back_on_is_not_served(
    world: World, tmp_path: Path, broker: Broker
) -> None:
    """The committed model is damaged at rest and the reinstall that should replace it fails
    its self-test: the rollback lands on the damaged slot, and the daemon serves nothing
    rather than bytes nobody signed; /readyz says why."""
    from agent.engine import Outcome

    device, repo = world.copy(tmp_path)
    agent = Agent(device)
    assert agent.install(repository=str(repo), target=world.targets["v2"]).outcome is Outcome.COMMITTED
    model = (device / "current").resolve() / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    assert not agent.verify(repair=False)["ok"]
    failed = agent.install(repository=str(repo), target=world.targets["v3-bad"])  # overwrites the other slot
    assert (
        failed.outcome is Outcome.ROLLED_BACK
        and "nothing is served until a reinstall commits" in failed.reason
    )
    with DaemonThread(make_config(tmp_path, device, broker.port)) as d:
        daemon = d.daemon
        assert daemon is not None
        wait_for(lambda: daemon.transport.connected, what="connected")
        base = f"http://127.0.0.1:{daemon.health.port}"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/readyz", timeout=5)
        assert err.value.code == 503 and "is invalid: reinstall the model" in err.value.read().decode()
        assert daemon.batcher is not None and daemon.batcher.runner is None
        req = urllib.request.Request(base + "/v1/infer", data=json.dumps({"input": [0.1] * 16}).encode())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 503


def test_a_tls_failure_is_logged_and_readyz_says_why(
    world: World, tmp_path: Path, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """TLS configured against a broker port that does not speak it: the agent logs the cause
    once and /readyz names it, not just "not connected" (a wrong host name or CA is named the
    same way, as the SSLError it is)."""
    from shared.pki import make_ca

    device, _ = world.copy(tmp_path)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(make_ca("some other CA").cert_pem)
    caplog.set_level(logging.ERROR, logger="agent.mqtt")
    with DaemonThread(make_config(tmp_path, device, broker.port, mqtt={"ca_file": str(ca)})) as d:
        daemon = d.daemon
        assert daemon is not None
        wait_for(lambda: daemon.transport.last_error and daemon.health.port, what="a failed connect")

        def readyz() -> tuple[int, str] | None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{daemon.health.port}/readyz", timeout=5)
            except urllib.error.HTTPError as err:
                return err.code, err.read().decode()
            except urllib.error.URLError:
                return None  # the health server is still starting
            return 200, ""

        code, body = wait_for(readyz, what="/readyz")
        # A plain MQTT port resets the TLS hello: the cause, named (an SSLError with a wrong CA)
        cause = f"cannot connect to 127.0.0.1:{broker.port}: ConnectionResetError"
        assert code == 503 and cause in body, body
    errors = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert errors and len(errors) <= 2  # once per distinct cause, not once per retry


def test_a_failed_install_sends_its_log_tail_and_a_log_pull_uploads_the_log(
    world: World, tmp_path: Path, broker: Broker, endpoint: JobsEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """Diagnostics from the device itself: a receipt of a failed install carries the agent's
    own log lines for it (redacted, bounded); a log-pull job uploads the recent log over the
    device's MQTT connection."""
    device, _ = world.copy(tmp_path)
    receipts = Collector(broker.port, f"tidegate/things/{THING}/receipt", "receipts")
    logs = Collector(broker.port, f"tidegate/things/{THING}/log", "logs")
    caplog.set_level(logging.INFO)  # as `tidegate agent run` configures it
    with DaemonThread(make_config(tmp_path, device, broker.port)):
        logging.getLogger("agent.test").warning("contact ops@example.com about vehicle 1HGCM82633A004352")
        endpoint.add_job(THING, "bad", job_doc(world, "v3-bad"))
        ex = endpoint.wait_status(THING, "bad", {"SUCCEEDED", "FAILED", "REJECTED"})
        assert ex.status == "FAILED"
        receipt = wait_for(
            lambda: next((r for r in receipts.messages if r["job_id"] == "bad"), None), what="receipt"
        )
        endpoint.add_job(THING, "pull", {"operation": "tidegate.log-pull", "lines": 200})
        pulled = endpoint.wait_status(THING, "pull", {"SUCCEEDED", "FAILED", "REJECTED"})
        uploaded = wait_for(
            lambda: next((m for m in logs.messages if m["job_id"] == "pull"), None), what="log"
        )
    receipts.close()
    logs.close()
    tail = receipt["log_tail"]
    assert tail and len(tail) <= 50 and sum(len(t) + 1 for t in tail) <= 8192
    assert any("rolled back" in line or "self-test" in line for line in tail), tail
    assert not any("ops@example.com" in line for line in tail)  # before the install: not its tail
    assert pulled.status == "SUCCEEDED" and pulled.details["reason"].startswith("uploaded ")
    text = "\n".join(uploaded["lines"])
    assert "contact redacted:" in text and "ops@example.com" not in text and "1HGCM82633A004352" not in text
    stamped = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ "  # times are kept, not taken for phone numbers
    assert all(re.match(stamped, line) for line in uploaded["lines"])
    assert len(text.encode()) <= 64 * 1024


def test_corrupt_config_fails_at_start(tmp_path: Path) -> None:
    cases = {
        "bad.toml": ("[mqtt\nport = 1", "not valid TOML"),
        "field.toml": ("[mqtt]\nport = 99999\n", "mqtt.port"),
        "unknown.toml": ("[mqtt]\nprot = 1\n", "mqtt.prot"),
    }
    for name, (text, needle) in cases.items():
        (tmp_path / name).write_text(text)
        p = subprocess.run(
            [sys.executable, "-m", "tidegate", "agent", "run", "--config", str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode != 0
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_mutual_tls_with_a_device_certificate(world: World, tmp_path: Path) -> None:
    import ssl

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from shared.pki import issue, make_ca

    pki = tmp_path / "pki"
    pki.mkdir()
    ca = make_ca("tidegate test CA")
    server = issue(ca, "broker", server_names=["127.0.0.1", "localhost"], client=False)
    device_cert = issue(ca, THING)
    files = {}
    for name, pair in (("ca", ca), ("server", server), ("device", device_cert)):
        (pki / f"{name}.pem").write_bytes(pair.cert_pem)
        (pki / f"{name}.key").write_bytes(pair.key_pem)
        files[name] = (pki / f"{name}.pem", pki / f"{name}.key")
    broker = Broker(tmp_path / "tls-broker", tls=(files["ca"][0], *files["server"])).start()
    endpoint = JobsEndpoint(broker.port)  # the service side on the plain localhost listener
    try:
        device, _ = world.copy(tmp_path)
        mqtt_cfg = {
            "port": broker.tls_port,
            "ca_file": str(files["ca"][0]),
            "cert_file": str(files["device"][0]),
            "key_file": str(files["device"][1]),
        }
        with DaemonThread(make_config(tmp_path, device, broker.port, mqtt=mqtt_cfg)):
            endpoint.add_job(THING, "tls", job_doc(world, "v2"))
            assert endpoint.wait_status(THING, "tls", {"SUCCEEDED", "FAILED"}).status == "SUCCEEDED"
        # a certificate from another CA is refused at the handshake
        rogue_ca = make_ca("rogue")
        rogue = issue(rogue_ca, THING)
        (pki / "rogue.pem").write_bytes(rogue.cert_pem)
        (pki / "rogue.key").write_bytes(rogue.key_pem)
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id="rogue", protocol=mqtt.MQTTv5
        )
        c.tls_set(
            ca_certs=str(files["ca"][0]),
            certfile=str(pki / "rogue.pem"),
            keyfile=str(pki / "rogue.key"),
            cert_reqs=ssl.CERT_REQUIRED,
        )
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            c.connect("127.0.0.1", broker.tls_port)
            c.loop_start()
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and not c.is_connected():
                time.sleep(0.05)
            c.loop_stop()
            if not c.is_connected():
                raise ConnectionError("refused")
    finally:
        endpoint.close()
        broker.stop()


def test_a_taken_over_session_backs_off_and_refused_subscriptions_are_named(broker: Broker) -> None:
    """Two connections with one client id: the older is closed with "session taken over" and
    waits the longest backoff instead of taking it back at once (no flapping)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from agent.mqtt import MqttSettings, PahoTransport, refused_subscriptions

    async def go() -> tuple[PahoTransport, PahoTransport]:
        settings = MqttSettings(port=broker.port, client_id="car-9", reconnect_min_s=1, reconnect_max_s=30)
        first, second = PahoTransport(settings), PahoTransport(settings)
        first.set_handlers(lambda t, p: None, lambda: None)
        second.set_handlers(lambda t, p: None, lambda: None)
        await first.start()
        for _ in range(100):
            if first.connected:
                break
            await asyncio.sleep(0.05)
        await second.start()
        await asyncio.sleep(6)  # without the backoff the two would take the id back and forth each second
        return first, second

    first, second = asyncio.run(go())
    try:
        # one took the id from the other; the one closed waits 2 s, then 4 s: no flap
        assert first.taken_over + second.taken_over in (1, 2, 3)
        assert first.connects + second.connects <= 5  # a flap at the 1 s backoff would be a dozen
    finally:
        asyncio.run(first.stop())
        asyncio.run(second.stop())
    granted = ReasonCode(PacketTypes.SUBACK, identifier=1)
    refused = ReasonCode(PacketTypes.SUBACK, identifier=0x87)  # not authorized
    assert refused_subscriptions(["a", "b"], [granted, refused]) == {"b": "Not authorized"}
