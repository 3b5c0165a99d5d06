"""Chaos in the middle of a running campaign, every part a real process: the broker restarts,
the fleet server is SIGKILLed and restarted, an agent is SIGKILLed and restarted, and another
loses power mid-install (it SIGKILLs itself after flipping its slot; the restarted daemon
runs `recover` first). In the end every device runs the new version, committed; every
execution has exactly one terminal transition; and every device's install receipt arrived."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from agent.engine import Agent
from fleet_server.campaigns.models import CampaignDecision
from fleet_server.campaigns.planner import order_members
from fleet_server.db import Database
from fleet_server.jobs.models import ExecutionEvent, JobExecution
from fleet_server.telemetry.models import TelemetryRecord
from shared.procs import stop_process
from tests.agent_world import build_world, device_view
from tests.mqtt_helpers import MOSQUITTO, Broker
from tests.test_agent_runtime import make_config
from tests.test_fleet_e2e import Server, admin_token, wait

pytestmark = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto binary not installed")

THINGS = ["car-0", "car-1", "car-2", "car-3"]
POWER_CUT = "car-3"  # loses power right after flipping to the new slot
KILLED = "car-2"  # SIGKILLed while its job is queued or running


class AgentProcess:
    """`tidegate agent run` in its own process, as systemd would run it."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config, self.env = config, {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **env: str) -> AgentProcess:
        args = [sys.executable, "-m", "tidegate", "agent", "run", "--config", str(self.config)]
        self.proc = subprocess.Popen(
            args, env={**self.env, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s=30)


@pytest.fixture
def agents() -> Iterator[dict[str, AgentProcess]]:
    running: dict[str, AgentProcess] = {}
    yield running
    for a in running.values():
        a.stop()


def test_broker_restart_server_sigkill_agent_sigkill_and_power_cut_mid_campaign(
    tmp_path: Path, sample_payload: Path, agents: dict[str, AgentProcess]
) -> None:
    broker = Broker(tmp_path / "broker").start()
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    world = build_world(tmp_path / "world", sample_payload)
    h = {"Authorization": f"Bearer {admin_token(db_url)}"}
    server = Server(db_url, broker.port).start()
    try:
        for thing in THINGS:
            device, _ = world.copy(tmp_path / thing)
            cfg = json.loads((device / "device.json").read_text())
            cfg["device_id"] = thing
            (device / "device.json").write_text(json.dumps(cfg))
            r = httpx.post(
                server.url + "/api/v1/devices", json={"thing_name": thing, "sku": "edge-cpu"}, headers=h
            )
            assert r.status_code == 201
            agent = AgentProcess(make_config(tmp_path / thing, device, broker.port))
            agents[thing] = agent.start(
                **({"TIDEGATE_FAULT_KILL_AT": "after:pointer"} if thing == POWER_CUT else {})
            )
        spec = {
            "name": "v2 through chaos",
            "target": world.targets["v2"],
            "repository": str(world.repo),
            "cohort": {"sku": "edge-cpu"},
            "waves": [{"count": 1, "soak_s": 2}, {"percent": 100}],
            "max_concurrent": 2,
            "success_gate": {
                "conditions": [
                    {"metric": "success_rate", "comparator": ">=", "threshold": 1.0, "min_samples": 1}
                ]
            },
        }
        # The first wave must be a device that neither dies nor loses power: the chaos starts
        # once it has succeeded.
        spec["seed"] = next(
            seed for seed in range(1000) if order_members(THINGS, seed)[0] not in (POWER_CUT, KILLED)
        )
        cid = httpx.post(server.url + "/api/v1/campaigns", json=spec, headers=h).json()["id"]
        httpx.post(f"{server.url}/api/v1/campaigns/{cid}/submit", headers=h).raise_for_status()
        httpx.post(
            f"{server.url}/api/v1/campaigns/{cid}/approve", json={"override_reason": "chaos rig"}, headers=h
        ).raise_for_status()

        def campaign() -> dict[str, object]:
            return dict(httpx.get(f"{server.url}/api/v1/campaigns/{cid}", headers=h, timeout=10).json())

        wait(lambda: campaign()["waves"][0]["counts"].get("SUCCEEDED") == 1, what="first wave")  # type: ignore[index]
        broker.stop()  # 1. the broker goes away mid-campaign (persistent sessions kept on disk)
        time.sleep(1.5)
        broker.start()
        server.kill()  # 2. the server dies without a chance to clean up
        server = Server(db_url, broker.port).start()
        agents[KILLED].kill()  # 3. an agent dies the same way, and systemd restarts it
        agents[KILLED].start()
        # 4. the power cut: the agent kills itself right after the flip, when its wave reaches it
        wait(lambda: agents[POWER_CUT].proc.poll() is not None, timeout=120, what="power cut")  # type: ignore[union-attr]
        assert agents[POWER_CUT].proc.returncode == -9  # type: ignore[union-attr]
        assert Agent(tmp_path / POWER_CUT / "device").status()["state"] != "idle"  # caught mid-install
        agents[POWER_CUT].start()  # boots: recover, then the same execution comes back
        wait(lambda: campaign()["state"] == "completed", timeout=180, what="campaign completed")

        def receipts_in() -> bool:  # each agent's outbox drains to the server once it reconnects
            with Database(db_url).session() as s:
                got = s.scalars(select(TelemetryRecord).where(TelemetryRecord.kind == "receipt")).all()
            return {r.thing_name for r in got if r.payload.get("outcome") == "committed"} >= set(THINGS)

        wait(receipts_in, timeout=60, what="every device's install receipt")
    finally:
        server.stop()
        broker.stop()
    db = Database(db_url)
    with db.session() as s:
        rows = s.scalars(select(JobExecution).where(JobExecution.job_id == cid)).all()
        assert sorted(r.thing_name for r in rows) == THINGS
        assert {r.status for r in rows} == {"SUCCEEDED"}
        for r in rows:  # one terminal transition each: nothing lost, nothing counted twice
            terminal = s.scalar(
                select(func.count())
                .select_from(ExecutionEvent)
                .where(ExecutionEvent.execution_id == r.id, ExecutionEvent.to_status == "SUCCEEDED")
            )
            assert terminal == 1, r.thing_name
        kinds = [
            d.kind for d in s.scalars(select(CampaignDecision).where(CampaignDecision.campaign_id == cid))
        ]  # the restarted server resumed the campaign: it did not start it again
        assert kinds.count("started") == 1 and kinds.count("advanced") == 1 and kinds[-1] == "completed"
    for thing in THINGS:
        assert device_view(tmp_path / thing / "device")["version"] == "2.0.0"  # committed, verified
