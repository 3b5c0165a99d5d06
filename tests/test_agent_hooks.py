"""Device hooks: the owner's scripts before download, before install, after commit and on
rollback, run by the real install engine (and the daemon) against a real repository."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from agent.engine import Agent, Outcome
from tests import test_agent_runtime as _runtime
from tests.agent_world import World, build_world, device_view
from tests.mqtt_helpers import MOSQUITTO, Broker, JobsEndpoint
from tests.test_agent_runtime import THING, DaemonThread, job_doc, make_config

broker, endpoint = _runtime.broker, _runtime.endpoint  # the same fixtures: a broker and a jobs service


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, sample_payload: Path) -> World:
    return build_world(tmp_path_factory.mktemp("world"), sample_payload)


def with_hooks(world: World, tmp_path: Path, timeout_s: float = 10.0) -> tuple[Path, Path, Path]:
    device, repo = world.copy(tmp_path / "dev")
    hooks = tmp_path / "hooks.d"
    hooks.mkdir()
    cfg = json.loads((device / "device.json").read_text())
    cfg.update(hooks_dir=str(hooks), hook_timeout_s=timeout_s)
    (device / "device.json").write_text(json.dumps(cfg))
    return device, repo, hooks


def slots(device: Path) -> tuple[str, dict[str, object]]:
    """The active version and both slots' records: what an install that stopped must not touch."""
    view = device_view(device)
    return view["version"], view["status"]["slots"]


def hook(hooks: Path, name: str, body: str, executable: bool = True) -> Path:
    path = hooks / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755 if executable else 0o644)
    return path


def test_retry_later_defers_with_the_slot_untouched_and_the_next_attempt_installs(
    world: World, tmp_path: Path
) -> None:
    device, repo, hooks = with_hooks(world, tmp_path)
    marker = tmp_path / "asked-once"
    script = f'[ -e {marker} ] && exit 0; touch {marker}; echo "not parked"; exit 21'
    hook(hooks, "before-download.10-parked", script)
    before = slots(device)
    first = Agent(device).install(repository=str(repo), target=world.targets["v2"])
    assert first.deferred and first.retry_later and not first.refused
    assert "asked to retry later: not parked" in first.reason
    assert slots(device) == before  # nothing downloaded into, nothing flipped
    second = Agent(device).install(repository=str(repo), target=world.targets["v2"])
    assert second.outcome is Outcome.COMMITTED and device_view(device)["version"] == "2.0.0"


def test_a_refusing_hook_stops_the_install_and_names_itself(world: World, tmp_path: Path) -> None:
    device, repo, hooks = with_hooks(world, tmp_path)
    hook(hooks, "before-install", 'echo "checking"; echo "battery at 12 %" >&2; exit 3')
    before = slots(device)
    report = Agent(device).install(repository=str(repo), target=world.targets["v2"])
    assert report.outcome is Outcome.FAILED and report.refused and not report.deferred
    assert "hook before-install refused (exit 3): battery at 12 %" in report.reason
    assert slots(device) == before


def test_a_hanging_hook_is_killed_at_its_timeout_with_what_it_started(world: World, tmp_path: Path) -> None:
    device, repo, hooks = with_hooks(world, tmp_path, timeout_s=1.0)
    pids = tmp_path / "pids"
    hook(hooks, "before-download", f"sleep 60 & echo $! > {pids}; wait")
    t0 = time.monotonic()
    report = Agent(device).install(repository=str(repo), target=world.targets["v2"])
    assert time.monotonic() - t0 < 30  # not the hook's 60 s
    assert report.refused and "hook before-download timed out after 1 s" in report.reason
    child = int(pids.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the hook's child outlived its timeout")


def test_after_commit_and_on_rollback_hooks_run_and_their_output_is_logged(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device, repo, hooks = with_hooks(world, tmp_path)
    seen = tmp_path / "seen"
    script = f'echo "committed $TIDEGATE_HOOK_VERSION into $TIDEGATE_HOOK_SLOT" | tee -a {seen}'
    hook(hooks, "after-commit", script)
    hook(hooks, "on-rollback", f'echo "rolled back: $TIDEGATE_HOOK_REASON" | tee -a {seen}; exit 1')
    caplog.set_level(logging.INFO, logger="tidegate.agent.hooks")
    assert Agent(device).install(repository=str(repo), target=world.targets["v2"]).ok
    bad = Agent(device).install(repository=str(repo), target=world.targets["v3-bad"])
    assert bad.outcome is Outcome.ROLLED_BACK  # a failing on-rollback hook changes nothing
    lines = seen.read_text().splitlines()
    assert lines[0].startswith("committed 2.0.0 into ")
    assert lines[1].startswith("rolled back: self-test failed")
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("hook after-commit: committed 2.0.0") for m in logged)
    assert any("on-rollback hook: hook on-rollback refused (exit 1)" in m for m in logged)


def test_a_hook_that_cannot_run_refuses_installs_and_the_daemon_start(world: World, tmp_path: Path) -> None:
    from tidegate.cli import main

    device, repo, hooks = with_hooks(world, tmp_path)
    hook(hooks, "before-install", "exit 0", executable=False)
    report = Agent(device).install(repository=str(repo), target=world.targets["v2"])
    assert report.refused and "is not an executable file (chmod +x it, or remove it)" in report.reason
    config = make_config(tmp_path, device, 1)
    assert main(["agent", "run", "--config", str(config)]) != 0  # refused at start, one line


@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto binary not installed")
def test_the_daemon_retries_a_deferred_install_after_the_hook_retry_interval(
    world: World, tmp_path: Path, broker: Broker, endpoint: JobsEndpoint
) -> None:
    device, _, hooks = with_hooks(world, tmp_path)
    marker = tmp_path / "asked-once"
    hook(hooks, "before-download", f"[ -e {marker} ] && exit 0; touch {marker}; exit 21")
    with DaemonThread(make_config(tmp_path, device, broker.port, jobs={"hook_retry_s": 1.0})):
        endpoint.add_job(THING, "hooked", job_doc(world, "v2"))
        ex = endpoint.wait_status(THING, "hooked", {"SUCCEEDED", "FAILED", "REJECTED"})
    assert ex.status == "SUCCEEDED" and marker.exists()
    assert device_view(device)["version"] == "2.0.0"
