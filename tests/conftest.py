from __future__ import annotations

from pathlib import Path

import pytest

from builder.samples import make_sample_payload


@pytest.fixture(scope="session")
def sample_payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real payload: ONNX classifier, inference config and golden self-test data."""
    return make_sample_payload(tmp_path_factory.mktemp("payload"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.test_agent_faults import KILL_STATS

    if KILL_STATS["kill_points"]:
        terminalreporter.write_line(
            "agent fault injection: {kill_points} SIGKILL points, {killed} reached, devices ended on "
            "old {old} / new {new}, left without a committed verified slot: {bricked}".format(**KILL_STATS)
        )
