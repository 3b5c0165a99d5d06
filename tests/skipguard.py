"""Under CI (CI=true), a skipped test fails the run unless it needs a GPU: the suite's tools
(Mosquitto, Chromium, skopeo, SoftHSM2, Prometheus) are installed by `.ci/run`, so a skip
there means a proof that did not run. Loaded by tests/conftest.py (and by `-p` in its test)."""

from __future__ import annotations

import os
import re

import pytest

GPU_ONLY = re.compile(r"tensorrt|pycuda|\bgpu\b|cuda", re.IGNORECASE)
_skipped: list[tuple[str, str]] = []


def disallowed(skips: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The skips CI does not accept: every one whose reason is not a missing GPU."""
    return [(node, why) for node, why in skips if not GPU_ONLY.search(why)]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        why = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, str(why)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") != "true" or hasattr(session.config, "workeroutput"):
        return  # not CI, or an xdist worker: the controller sees every report
    bad = disallowed(_skipped)
    if bad:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for node, why in bad:
            line = f"CI=true: skipped without a GPU reason (install the tool in .ci/run): {node}: {why}"
            if reporter is not None:
                reporter.write_line(line, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
