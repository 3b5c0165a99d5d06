"""Fault injection: SIGKILL the installing process at >= 100 points, run recover, and
check that every device is on the old or the new version, committed and verified."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from agent.engine import Agent
from shared.bundle import verify_bundle
from tests.agent_world import World, build_world, device_view, install_killed_at
from tests.test_agent_install import BAD_POINTS, GOOD_POINTS

KILL_STATS: dict[str, int] = {"kill_points": 0, "killed": 0, "old": 0, "new": 0, "bricked": 0}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, sample_payload: Path) -> World:
    return build_world(tmp_path_factory.mktemp("faults"), sample_payload)


def _kill_plan(world: World) -> list[tuple[str, str]]:
    total = verify_bundle(world.bundles["v2"]).total_size
    rng = random.Random(2026)
    offsets = sorted(rng.sample(range(1, total), 90))
    plan = [("v2", p) for p in GOOD_POINTS] + [("v3-bad", p) for p in BAD_POINTS]
    plan += [("v2", f"bytes:{o}") for o in offsets]
    return plan


def test_sigkill_at_every_transition_and_random_write_offsets(world: World, tmp_path: Path) -> None:
    plan = _kill_plan(world)
    assert len(plan) >= 100
    failures = []
    for i, (key, point) in enumerate(plan):
        device, repo = world.copy(tmp_path / f"run-{i}")
        killed = install_killed_at(device, repo, world.targets[key], point)
        KILL_STATS["kill_points"] += 1
        KILL_STATS["killed"] += killed is not None
        Agent(device).recover()
        try:
            view = device_view(device)
        except AssertionError as exc:
            KILL_STATS["bricked"] += 1
            failures.append(f"{key} {point}: {exc}")
            continue
        expected_new = "2.0.0" if key == "v2" else None
        if view["version"] == "1.0.0":
            KILL_STATS["old"] += 1
        elif view["version"] == expected_new:
            KILL_STATS["new"] += 1
        else:
            failures.append(f"{key} {point}: ended on {view['version']}")
    assert not failures, failures
    assert KILL_STATS["killed"] == len(plan)  # every kill point was actually reached
    assert KILL_STATS["bricked"] == 0
