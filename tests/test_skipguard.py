"""The CI skip guard: under CI=true a skip other than a GPU one fails the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.skipguard import disallowed

ROOT = Path(__file__).resolve().parent.parent


def test_only_gpu_skips_are_allowed_under_ci(tmp_path: Path) -> None:
    assert disallowed([("a", "could not import 'tensorrt'"), ("b", "mosquitto not installed")]) == [
        ("b", "mosquitto not installed")
    ]
    case = tmp_path / "test_case.py"
    case.write_text(
        "import pytest\n\n"
        "def test_ok():\n    assert len('ok') == 2\n\n"
        "@pytest.mark.skip(reason='headless Chromium not installed')\n"
        "def test_browser():\n    pass\n"
    )

    def run(ci: str | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "CI"}
        if ci is not None:
            env["CI"] = ci
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "tests.skipguard", "-c", os.devnull, str(case)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**env, "PYTHONPATH": str(ROOT)},
        )

    under_ci = run("true")
    assert under_ci.returncode == 1, under_ci.stdout
    assert "skipped without a GPU reason" in under_ci.stdout and "test_browser" in under_ci.stdout
    assert run(None).returncode == 0
    case.write_text(case.read_text().replace("headless Chromium", "tensorrt (a GPU)"))
    assert run("true").returncode == 0
