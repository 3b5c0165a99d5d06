"""`tidegate demo`, the README's main command, as a user runs it: to the end, and stopped
with Ctrl-C in the middle of its campaign."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mqtt_helpers import MOSQUITTO

pytestmark = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="the demo's fleet embeds Mosquitto")


def _processes_under(workdir: Path) -> list[str]:
    """Command lines of live processes that mention the demo's directory (its broker, its
    gateway, its agents)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(workdir) in cmd and int(pid) != os.getpid():
            found.append(cmd)
    return found


def test_the_demo_tells_the_whole_story(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.run(  # a relative --workdir, as `make demo` passes the default `.demo`
        [sys.executable, "-m", "tidegate", "demo", "--workdir", "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,  # a loaded CI host is slow; the demo itself takes well under 5 minutes
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + out[-3000:]
    for n in range(1, 8):
        assert f"== {n}/7 " in out
    # 1: both SKUs built and published, the int8 one measured against fp32
    assert "classifier 1.0.0 for edge-cpu-arm64-int8: int8" in out
    assert "signed and published classifier/1.0.0/edge-cpu-x86.bundle" in out
    # 2: the bench passed every suite and its report opened the gate
    assert "[hil] every suite passed" in out and "the campaign gate opens" in out
    # 4: preconditions and the blackout window held devices back; everyone installed
    assert "vehicle-b waits, reporting 'parked: vehicle not parked'" in out
    assert "open in the device's local time (Asia/Tokyo)" in out
    for v in ("vehicle-a", "vehicle-b", "vehicle-c"):
        assert f"[fleet] {v}: runs 1.0.0 from slot" in out
    # 5: the bad release stopped by the error gate; the one device that got it rolled back
    assert "stopped by the gates" in out and "error gate: failure_rate" in out
    assert "rolled_back: self-test failed" in out
    assert "[tamper] " in out and "refused (HashMismatchError)" in out
    # 6: the hotfix refused at the shadow gate with its per-class table; the retrain through
    # shadow, canary on relative gates, production; an A/B decision, an alert's fallback, drift
    assert "shadow of hotfix 1.1.0" in out and "verdict FAIL" in out and "pedestrian " in out
    assert "shadows run on tidegate serve shadow-worker" in out and "on the shadow worker:" in out
    assert "canary of 1.1.0 refused (HTTP 409)" in out
    assert "shadow of retrain 1.0.1" in out and "verdict PASS" in out
    assert "canary promoted after" in out and "production is 1.0.1" in out and "A/B decided after" in out
    assert "remediation: every request to the fallback" in out and "[drift] DRIFT" in out
    summary = json.loads((workdir / "demo-summary.json").read_text())
    waves = summary["rollout"]["waves"]
    assert sum(w["counts"].get("SUCCEEDED", 0) for w in waves) == sum(w["size"] for w in waves) == 203
    assert summary["bad_release"]["paused_reason"].startswith("error gate")
    ab = json.loads(Path(summary["files"]["ab_summary.json"]).read_text())
    assert ab["decision"] == summary["gateway"]["ab_decision"] != "continue"
    receipts = json.loads((workdir / "records" / "receipts.json").read_text())
    committed = {r["device_id"] for r in receipts if r["outcome"] == "committed" and r["version"] == "1.0.0"}
    assert committed == {"vehicle-a", "vehicle-b", "vehicle-c"}
    assert [r["outcome"] for r in receipts if r["version"] == "1.1.0"] == ["rolled_back"]
    for key in ("HIL report", "drift report", "failure-cohort", "campaign-rollout"):
        assert Path(summary["files"][key]).exists()
    assert not _processes_under(workdir)  # nothing left running


def test_ctrl_c_in_the_middle_of_the_campaign_stops_everything(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidegate", "demo", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "vehicle-b waits" in line:  # broker, server, agents and simulator all running
            break
    assert _processes_under(workdir), "the broker should be running now"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: every process the demo started has been stopped" in err
    assert "Traceback" not in err
    deadline = time.monotonic() + 10
    while _processes_under(workdir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_under(workdir), _processes_under(workdir)
