"""`tidegate fleet` against a running fleet server, as an operator uses it: a profile saved by
`login`, a campaign created from a TOML spec, approved, paused, resumed and watched to
completion, every step a real `tidegate` process whose exit code a script could branch on."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.mqtt_helpers import MOSQUITTO, Broker
from tests.test_fleet_e2e import Server, admin_token, wait

pytestmark = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto binary not installed")

SPEC = """
name = "cli rollout"
target = "m.bundle"
repository = "http://repo"
waves = [{percent = 10, soak_s = 15}, {percent = 100}]

[cohort]
sku = "cli-sku"

[success_gate]
conditions = [{metric = "success_rate", comparator = ">=", threshold = 0.9}]
"""


def fleet(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidegate", "fleet", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_a_campaign_run_entirely_through_the_fleet_cli(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker").start()
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    token = admin_token(db_url)
    server = Server(db_url, broker.port).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
    env["TIDEGATE_FLEET_CONFIG"] = str(tmp_path / "fleet.toml")
    sim = None
    try:
        # No profile yet: a one-line error naming the fix, and nothing else.
        p = fleet(env, "device", "list")
        assert p.returncode == 1 and p.stderr.startswith("error: no fleet server configured")
        assert fleet(env, "login", "--url", server.url, "--token", "tg_wrong").returncode == 5  # 401
        assert not (tmp_path / "fleet.toml").exists()
        assert fleet(env, "login", "--url", server.url, "--token", token).returncode == 0
        assert stat.S_IMODE((tmp_path / "fleet.toml").stat().st_mode) == 0o600

        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tidegate",
                "sim",
                "--devices",
                "40",
                "--server",
                server.url,
                "--sku",
                "cli-sku",
                "--mqtt-port",
                str(broker.port),
                "--duration-s",
                "120",
            ],
            env={**os.environ, "TIDEGATE_TOKEN": token},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        h = {"Authorization": f"Bearer {token}"}
        wait(
            lambda: len(httpx.get(server.url + "/api/v1/devices?sku=cli-sku", headers=h).json()) == 40,
            what="the simulator registered its devices",
        )
        time.sleep(1.5)
        listed = fleet(env, "device", "list", "--sku", "cli-sku", "--limit", "1000", "--json")
        assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 40

        bad = tmp_path / "bad.toml"
        bad.write_text(SPEC.replace('name = "cli rollout"', 'name = "x"\nsurprise = true'))
        p = fleet(env, "campaign", "create", "-f", str(bad))
        assert p.returncode == 1 and f"{bad}:3: surprise: Extra inputs are not permitted" in p.stderr

        spec = tmp_path / "rollout.toml"
        spec.write_text(SPEC)
        created = fleet(env, "campaign", "create", "-f", str(spec), "--json")
        assert created.returncode == 0, created.stderr
        cid = json.loads(created.stdout)["id"]
        assert json.loads(created.stdout)["state"] == "waiting_for_approval"
        assert fleet(env, "campaign", "resume", cid).returncode == 4  # not paused: refused, exit 4
        approved = fleet(env, "campaign", "approve", cid, "--override-reason", "test fleet: no bench")
        assert approved.returncode == 0, approved.stderr
        wait(
            lambda: fleet(env, "campaign", "show", cid, "--json").stdout.count('"SUCCEEDED"') > 0,
            what="the first wave ran",
        )
        # The first wave soaks for 15 s, so the pause lands before the second wave even on a loaded
        # machine (a 3 s soak let a slow runner finish the campaign first, and the pause was refused).
        paused = fleet(env, "campaign", "pause", cid, "--reason", "checking the first wave", "--json")
        assert paused.returncode == 0, paused.stdout + paused.stderr
        assert json.loads(paused.stdout)["state"] == "paused"
        watched = fleet(env, "campaign", "watch", cid, "--interval", "0.2")
        assert watched.returncode == 7 and "paused: checking the first wave" in watched.stdout
        assert fleet(env, "campaign", "resume", cid).returncode == 0
        watched = fleet(env, "campaign", "watch", cid, "--interval", "0.3", "--timeout", "90", "--json")
        assert watched.returncode == 0, watched.stderr
        final = json.loads(watched.stdout)
        assert final["state"] == "completed"
        assert sum(w["counts"].get("SUCCEEDED", 0) for w in final["waves"]) == 40
        shown = fleet(env, "campaign", "show", cid)
        assert "wave 2: 36 devices" in shown.stdout and "checking the first wave" in shown.stdout

        audit = json.loads(fleet(env, "audit", "list", "--target", cid, "--json").stdout)
        assert {"campaign.create", "campaign.approve", "campaign.pause", "campaign.resume"} <= {
            a["action"] for a in audit
        }
        assert fleet(env, "campaign", "show", "c-nothing").returncode == 3  # not found: exit 3
        made = fleet(env, "token", "create", "--name", "ci", "--role", "viewer")
        assert made.returncode == 0 and made.stdout.startswith("tg_")
        tokens = json.loads(fleet(env, "token", "list", "--json").stdout)
        ci = next(t for t in tokens if t["name"] == "ci")
        assert fleet(env, "token", "revoke", str(ci["id"])).returncode == 0
        as_ci = {**env, "TIDEGATE_SERVER_URL": server.url, "TIDEGATE_TOKEN": made.stdout.strip()}
        assert fleet(as_ci, "device", "list").returncode == 5  # revoked: refused, exit 5
    finally:
        if sim is not None:
            sim.terminate()
            sim.wait(30)
        server.stop()
        broker.stop()


def test_profiles_are_checked_before_anything_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleet_server.client.api import ProfileError, load_profile

    for var in ("TIDEGATE_SERVER_URL", "TIDEGATE_TOKEN", "TIDEGATE_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    config = tmp_path / "fleet.toml"
    monkeypatch.setenv("TIDEGATE_FLEET_CONFIG", str(config))
    config.write_text('default = "prod"\n[profiles.prod]\nurl = "https://fleet.example"\n')
    config.chmod(0o600)
    with pytest.raises(ProfileError, match="profile 'prod' in .* has no token"):
        load_profile()
    config.chmod(0o644)
    with pytest.raises(ProfileError, match="is mode 644: it holds tokens, make it 0600"):
        load_profile()
    config.chmod(0o600)
    with pytest.raises(ProfileError, match="no profile 'staging'"):
        load_profile("staging")
