"""The whole control loop: `tidegate server run` (API, jobs over MQTT, scheduler) drives real
agent daemons through a campaign on Mosquitto; the server is SIGKILLed mid-campaign and
restarted, and nothing is lost or counted twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from fleet_server.campaigns.models import CampaignDecision
from fleet_server.db import Database
from fleet_server.jobs.models import ExecutionEvent, JobExecution
from tests.agent_world import build_world, device_view
from tests.mqtt_helpers import MOSQUITTO, Broker, free_port
from tests.test_agent_runtime import DaemonThread, make_config

pytestmark = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto binary not installed")


class Server:
    def __init__(self, db_url: str, mqtt_port: int) -> None:
        self.port = free_port()
        self.args = [
            sys.executable,
            "-m",
            "tidegate",
            "server",
            "run",
            "--db",
            db_url,
            "--port",
            str(self.port),
            "--mqtt-port",
            str(mqtt_port),
            "--tick-s",
            "0.2",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


@pytest.fixture
def server_env(tmp_path: Path) -> Iterator[tuple[Broker, str]]:
    broker = Broker(tmp_path / "broker").start()
    yield broker, f"sqlite:///{tmp_path / 'fleet.db'}"
    broker.stop()


def admin_token(db_url: str) -> str:
    """An admin token made the way an operator makes one: with the CLI."""
    args = ["server", "token", "create", "--role", "admin", "--name", "ops", "--db", db_url]
    return subprocess.run(
        [sys.executable, "-m", "tidegate", *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def wait(pred: Any, timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := pred():
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out: {what}")


def test_campaign_survives_a_server_sigkill(
    tmp_path: Path, sample_payload: Path, server_env: tuple[Broker, str]
) -> None:
    broker, db_url = server_env
    world = build_world(tmp_path / "world", sample_payload)
    token = admin_token(db_url)
    h = {"Authorization": f"Bearer {token}"}
    server = Server(db_url, broker.port).start()
    things = [f"car-{i}" for i in range(3)]
    with ExitStack() as stack:
        for thing in things:
            device, _ = world.copy(tmp_path / thing)
            cfg = json.loads((device / "device.json").read_text())
            cfg["device_id"] = thing
            (device / "device.json").write_text(json.dumps(cfg))
            stack.enter_context(DaemonThread(make_config(tmp_path / thing, device, broker.port)))
            assert (
                httpx.post(
                    server.url + "/api/v1/devices", json={"thing_name": thing, "sku": "edge-cpu"}, headers=h
                ).status_code
                == 201
            )
        spec = {
            "name": "v2 to the fleet",
            "target": world.targets["v2"],
            "repository": str(world.repo),
            "cohort": {"sku": "edge-cpu"},
            "waves": [{"count": 1, "soak_s": 3}, {"percent": 100}],
            "success_gate": {
                "conditions": [
                    {"metric": "success_rate", "comparator": ">=", "threshold": 1.0, "min_samples": 1}
                ]
            },
        }
        cid = httpx.post(server.url + "/api/v1/campaigns", json=spec, headers=h).json()["id"]
        httpx.post(f"{server.url}/api/v1/campaigns/{cid}/submit", headers=h).raise_for_status()
        httpx.post(
            f"{server.url}/api/v1/campaigns/{cid}/approve", json={"override_reason": "test rig"}, headers=h
        ).raise_for_status()

        def first_wave_done() -> bool:
            body = httpx.get(f"{server.url}/api/v1/campaigns/{cid}", headers=h).json()
            return body["waves"][0]["counts"].get("SUCCEEDED") == 1

        wait(first_wave_done, what="first wave")
        server.kill()  # mid-campaign: wave 1 soaking, wave 2 not started
        server = Server(db_url, broker.port).start()  # same database and broker, a new process
        try:
            wait(
                lambda: (
                    httpx.get(f"{server.url}/api/v1/campaigns/{cid}", headers=h).json()["state"]
                    == "completed"
                ),
                what="campaign completed after restart",
            )
        finally:
            server.stop()
    db = Database(db_url)
    with db.session() as s:
        rows = s.scalars(select(JobExecution).where(JobExecution.job_id == cid)).all()
        assert sorted(r.thing_name for r in rows) == things and {r.status for r in rows} == {"SUCCEEDED"}
        for r in rows:  # exactly one terminal transition each: nothing lost, nothing counted twice
            terminal = s.scalar(
                select(func.count())
                .select_from(ExecutionEvent)
                .where(ExecutionEvent.execution_id == r.id, ExecutionEvent.to_status == "SUCCEEDED")
            )
            assert terminal == 1
        kinds = [
            d.kind for d in s.scalars(select(CampaignDecision).where(CampaignDecision.campaign_id == cid))
        ]
        assert kinds.count("started") == 1 and kinds.count("advanced") == 1 and kinds[-1] == "completed"
    for thing in things:
        assert device_view(tmp_path / thing / "device")["version"] == "2.0.0"


def test_the_sim_cli_runs_a_fleet_through_a_campaign(server_env: tuple[Broker, str]) -> None:
    """`tidegate sim`: registers its devices in batches, then answers jobs as agents do; a
    campaign over them completes, with the simulated failures recorded as FAILED."""
    broker, db_url = server_env
    token = admin_token(db_url)
    h = {"Authorization": f"Bearer {token}"}
    server = Server(db_url, broker.port).start()
    args = ["--devices", "300", "--server", server.url, "--sku", "sim-sku", "--mqtt-port", str(broker.port)]
    sim = subprocess.Popen(
        [sys.executable, "-m", "tidegate", "sim", *args, "--fail-rate", "0.02", "--duration-s", "120"],
        env={**os.environ, "TIDEGATE_TOKEN": token},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait(
            lambda: (
                len(httpx.get(server.url + "/api/v1/devices?sku=sim-sku&limit=1000", headers=h).json()) == 300
            ),
            what="the simulator registered its devices",
        )
        time.sleep(1.5)  # its MQTT session is up once registration is done
        spec = {
            "name": "sim",
            "target": "m.bundle",
            "repository": "http://repo",
            "cohort": {"sku": "sim-sku"},
            "waves": [{"percent": 10}, {"percent": 100}],
            "success_gate": {
                "conditions": [{"metric": "success_rate", "comparator": ">=", "threshold": 0.9}]
            },
            "error_gate": {"conditions": [{"metric": "failure_rate", "comparator": "<=", "threshold": 0.1}]},
        }
        cid = httpx.post(server.url + "/api/v1/campaigns", json=spec, headers=h).json()["id"]
        httpx.post(f"{server.url}/api/v1/campaigns/{cid}/submit", headers=h).raise_for_status()
        httpx.post(f"{server.url}/api/v1/campaigns/{cid}/approve", json={"override_reason": "sim"}, headers=h)
        body = wait(
            lambda: (
                (b := httpx.get(f"{server.url}/api/v1/campaigns/{cid}", headers=h).json())["state"]
                == "completed"
                and b
            ),
            timeout=90,
            what="the campaign completed",
        )
        counts: dict[str, int] = {}
        for w in body["waves"]:
            for k, v in w["counts"].items():
                counts[k] = counts.get(k, 0) + v
        assert counts.get("SUCCEEDED", 0) + counts.get("FAILED", 0) == 300
        assert 0 < counts.get("FAILED", 0) <= 20  # 2 % simulated, seeded
        assert "simulated" in "".join(body["errors"])
    finally:
        sim.terminate()
        out, err = sim.communicate(timeout=30)
        server.stop()
    assert "300 simulated devices (sim-sku) online" in out, err
