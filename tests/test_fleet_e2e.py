"""`tidegate server run` (API, jobs over MQTT, scheduler) as its own process, and `tidegate sim`
driving a simulated fleet through a campaign; the helpers here (the server process, an admin
token made with the CLI) also serve the chaos suite (test_chaos.py), where the server is
SIGKILLed mid-campaign."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.procs import stop_process
from tests.mqtt_helpers import MOSQUITTO, Broker, free_port

pytestmark = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto binary not installed")


class Server:
    def __init__(self, db_url: str, mqtt_port: int, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.env = None if env is None else {**os.environ, **env}
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
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env
        )
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
        if self.proc is not None:
            stop_process(self.proc)


@pytest.fixture
def server_env(tmp_path: Path) -> Iterator[tuple[Broker, str]]:
    broker = Broker(tmp_path / "broker").start()
    yield broker, f"sqlite:///{tmp_path / 'fleet.db'}"
    broker.stop()


def admin_token(db_url: str) -> str:
    """An admin token made the way an operator makes one: with the CLI, after `migrate` created
    the database (no other command starts from an empty one)."""
    for args in (
        ["server", "migrate", "--db", db_url],
        ["server", "token", "create", "--role", "admin", "--name", "ops", "--db", db_url],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "tidegate", *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    return out


def wait(pred: Any, timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := pred():
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out: {what}")


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


def test_a_second_server_on_one_sqlite_database_is_refused_with_the_reason(
    server_env: tuple[Broker, str],
) -> None:
    """SQLite serves one replica: a second `server run` on the same file would tick every
    campaign twice, so it stops at once and says why (and who holds it)."""
    broker, db_url = server_env
    admin_token(db_url)
    first = Server(db_url, broker.port).start()
    try:
        second = Server(db_url, broker.port)
        proc = subprocess.run(second.args, capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert f"another fleet server (pid {first.proc.pid})" in proc.stderr  # type: ignore[union-attr]
        assert "SQLite serves one replica; use PostgreSQL" in proc.stderr
    finally:
        first.stop()
    again = Server(db_url, broker.port).start()  # the lock went with the first process
    again.stop()
