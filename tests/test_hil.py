"""The bench runner against real targets: this machine, and a rig over real SSH (an
asyncssh server started here, which runs the probe's commands and serves SFTP)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import httpx
import pytest

from hil import runner
from hil.report import write_all
from hil.targets import LocalTarget
from shared.trust import UpdateRepository
from tests.agent_world import _variant
from tests.helpers import build_bundle
from tidegate.cli import main

SKU = "edge-cpu"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _st(budget_ms: float = 200.0) -> dict[str, Any]:
    return {
        "inputs": "selftest/inputs.npz",
        "outputs": "selftest/outputs.npz",
        "latency_budget_ms": budget_ms,
        "memory_ceiling_mb": 1024.0,
        "runs": 5,
    }


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory, sample_payload: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hil")
    v1 = build_bundle(
        sample_payload, d / "v1.bundle", name="classifier", version="1.0.0", skus=[SKU], self_test=_st()
    )
    v2 = build_bundle(
        sample_payload, d / "v2.bundle", name="classifier", version="1.1.0", skus=[SKU], self_test=_st()
    )
    bad = _variant(sample_payload, d / "payload-bad", bad_golden=True)
    altered = build_bundle(
        bad, d / "bad.bundle", name="classifier", version="1.2.0", skus=[SKU], self_test=_st()
    )
    repo = UpdateRepository.init(d / "repo")
    for b in (v1, v2):
        repo.add_bundle(b)
    return {"v1": v1, "v2": v2, "altered": altered, "repo": d / "repo", "dir": d}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["hil", "run", *argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_passing_bundle_passes_every_suite_on_this_machine_and_its_report_gates_campaigns(
    bench: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    code, text = _run(
        [
            "--bundle",
            str(bench["v2"]),
            "--suite",
            "full",
            "--repo",
            str(bench["repo"]),
            "--soak-s",
            "6",
            "--runs",
            "100",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, text
    assert "[5/6] thermal" in text and "install cycle: roll back" in text  # progress shown
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["complete"]
    results = {r["name"]: r for r in report["results"]}
    assert [r["status"] for r in report["results"]] == ["passed"] * 6
    assert (
        results["latency"]["figures"]["p95_ms"] <= 200
        and len(results["latency"]["figures"]["latencies_ms"]) == 100
    )
    assert all(results["contract"]["figures"]["bad_inputs_refused"].values())
    # the simulated zone heated past the first limit and the agent's policy throttled
    thermal = results["thermal"]["figures"]
    hot = [p for p in thermal["trace"] if p["temp_c"] >= thermal["thresholds_c"][0]]
    assert hot and all(p["level"] >= 1 for p in hot) and thermal["max_level"] >= 1
    steps = results["install"]["figures"]["steps"]
    assert [(s["step"], s["active_version"]) for s in steps] == [
        ("install previous", "1.0.0"),
        ("install bundle", "1.1.0"),
        ("roll back", "1.0.0"),
        ("re-install bundle", "1.1.0"),
    ]
    junit = ET.fromstring((out / "junit.xml").read_bytes())
    assert junit.get("tests") == "6" and junit.get("failures") == "0" and junit.get("errors") == "0"
    page = (out / "report.html").read_text()
    assert 'id="latency-histogram"' in page and 'id="thermal-trace"' in page and "PASSED" in page

    # upload: the fleet server then lets a campaign for this bundle and SKU through its gate
    from fleet_server.app import create_app as fleet_app
    from fleet_server.auth.service import Role, create_token
    from fleet_server.db import Database
    from fleet_server.migrate import upgrade
    from fleet_server.releases.service import bench_gate
    from tests.helpers import ServedApp
    from tests.mqtt_helpers import free_port

    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    upgrade(db)
    with db.session() as s:
        token = create_token(s, name="bench", role=Role.ADMIN, now=datetime.now(UTC))
    port = free_port()
    served = ServedApp(fleet_app(db, repository=UpdateRepository.init(tmp_path / "fleet-repo")), port).start()
    try:
        url = f"http://127.0.0.1:{port}"
        r = httpx.post(
            url + "/api/v1/releases",
            content=bench["v2"].read_bytes(),
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 201, r.text
        with db.session() as s:
            target = r.json()["target"]
            assert "no bench (HIL) report" in (bench_gate(s, target=target, sku=SKU) or "")
        assert main(["hil", "upload", "--report", str(out), "--server", url, "--token", token]) == 0
        assert "attached a passing bench report" in capsys.readouterr().out
        with db.session() as s:
            assert bench_gate(s, target=target, sku=SKU) is None
    finally:
        served.stop()


def test_a_tight_latency_budget_fails_the_latency_suite_with_its_figures(
    bench: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    code, text = _run(
        [
            "--bundle",
            str(bench["v2"]),
            "--suite",
            "latency",
            "--latency-budget-ms",
            "0.0001",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 1
    assert "p95" in text and "above the budget of 0.0001 ms" in text
    report = json.loads((out / "report.json").read_text())
    assert not report["passed"] and report["results"][0]["status"] == "failed"
    failure = ET.fromstring((out / "junit.xml").read_bytes()).find("testcase/failure")
    assert failure is not None and "above the budget" in (failure.get("message") or "")
    # an incomplete report cannot gate anything
    report["complete"] = False
    (out / "report.json").write_text(json.dumps(report))
    assert (
        main(["hil", "upload", "--report", str(out), "--server", "http://127.0.0.1:9", "--token", "x"]) != 0
    )
    assert "incomplete" in capsys.readouterr().err


def test_altered_golden_outputs_fail_the_contract(
    bench: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = _run(
        ["--bundle", str(bench["altered"]), "--suite", "contract", "--out", str(tmp_path / "r")], capsys
    )
    assert code == 1
    assert "golden self-test failed" in text and "differs from the golden output" in text


def test_bad_runs_say_why_and_exit_non_zero(
    bench: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = _run(["--bundle", str(bench["v2"]), "--suite", "everything"], capsys)
    assert code == 2 and "no suite 'everything'" in text
    corrupt = tmp_path / "corrupt.bundle"
    data = bytearray(bench["v2"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    code, text = _run(["--bundle", str(corrupt), "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "bundle failed verification" in text
    from tests.mqtt_helpers import free_port

    out = tmp_path / "unreachable"
    code, text = _run(
        ["--bundle", str(bench["v2"]), "--target", f"ssh://bench@127.0.0.1:{free_port()}", "--out", str(out)],
        capsys,
    )
    assert code == 2 and "cannot connect" in text
    report = json.loads((out / "report.json").read_text())
    assert not report["complete"] and "cannot connect" in report["incomplete_reason"]


def test_an_interrupted_run_leaves_a_partial_report_marked_incomplete(
    bench: dict[str, Path], tmp_path: Path
) -> None:
    target = LocalTarget()
    report, manifest = runner.start(bench["v2"], target, "full", {"thermal": {"soak_s": 60}})
    seen: list[str] = []

    async def go() -> None:
        task = asyncio.ensure_future(runner.run(report, manifest, bench["v2"], target, progress=seen.append))
        while not any("thermal: " in line for line in seen):  # well into the soak
            await asyncio.sleep(0.1)
        task.cancel()  # what Ctrl-C does to asyncio.run's task
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    write_all(report, tmp_path / "partial")
    saved = json.loads((tmp_path / "partial" / "report.json").read_text())
    assert not saved["complete"] and "interrupted" in saved["incomplete_reason"]
    assert [r["name"] for r in saved["results"]] == ["contract", "latency", "memory", "determinism"]
    assert "INCOMPLETE" in (tmp_path / "partial" / "report.html").read_text()


# ---- over SSH ----------------------------------------------------------------------------------


class _SshRig:
    """An SSH server on a free port that runs commands on this machine and serves SFTP."""

    def __init__(self, base: Path) -> None:
        import asyncssh

        from tests.mqtt_helpers import free_port

        self.port = free_port()
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.identity = base / "id_ed25519"
        self.identity.write_bytes(client_key.export_private_key())
        self.identity.chmod(0o600)
        authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode())
        self.known_hosts = base / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_key.export_public_key().decode()}")
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()

        async def handle(process: Any) -> None:
            proc = await asyncio.create_subprocess_shell(
                process.command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            await process.redirect(stdout=proc.stdout, stderr=proc.stderr)
            process.exit(await proc.wait())

        async def serve() -> None:
            self.server = await asyncssh.listen(
                "127.0.0.1",
                self.port,
                server_host_keys=[host_key],
                authorized_client_keys=authorized,
                process_factory=handle,
                sftp_factory=True,
                allow_scp=False,
            )
            self.ready.set()

        self.thread = threading.Thread(
            target=lambda: (self.loop.run_until_complete(serve()), self.loop.run_forever()), daemon=True
        )

    def __enter__(self) -> _SshRig:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_the_same_suites_pass_on_a_rig_over_ssh(
    bench: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with _SshRig(tmp_path) as rig:
        out = tmp_path / "r"
        code, text = _run(
            [
                "--bundle",
                str(bench["v2"]),
                "--target",
                f"ssh://bench@127.0.0.1:{rig.port}",
                "--identity",
                str(rig.identity),
                "--known-hosts",
                str(rig.known_hosts),
                "--remote-python",
                sys.executable,
                "--suite",
                "full",
                "--repo",
                str(bench["repo"]),
                "--soak-s",
                "4",
                "--runs",
                "50",
                "--out",
                str(out),
            ],
            capsys,
        )
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == f"ssh://bench@127.0.0.1:{rig.port}"
    assert [r["status"] for r in report["results"]] == ["passed"] * 6


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (Debian package chromium) not installed")
def test_the_html_report_renders_in_headless_chromium(
    bench: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    out = tmp_path / "r"
    code, _ = _run(
        ["--bundle", str(bench["v2"]), "--suite", "latency", "--runs", "50", "--out", str(out)], capsys
    )
    assert code == 0
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            page.goto((out / "report.html").as_uri())
            assert page.inner_text("#verdict") == "PASSED"
            box = page.locator("#latency-histogram").bounding_box()
            assert box is not None and box["width"] > 100 and box["height"] > 50
            assert page.locator("#latency-histogram rect").count() == 30
        finally:
            browser.close()


def test_ctrl_c_ends_the_cli_run_cleanly_with_a_partial_report(
    bench: dict[str, Path], tmp_path: Path
) -> None:
    """A real SIGINT to `tidegate hil run` in the middle of a thermal soak."""
    import os
    import signal
    import subprocess

    out = tmp_path / "r"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tidegate",
            "hil",
            "run",
            "--bundle",
            str(bench["v2"]),
            "--suite",
            "full",
            "--soak-s",
            "120",
            "--runs",
            "20",
            "--out",
            str(out),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "thermal: " in line and "[5/6]" not in line:  # the soak's own progress: well into it
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest
    assert "partial report (marked incomplete)" in rest
    saved = json.loads((out / "report.json").read_text())
    assert not saved["complete"] and "interrupted" in saved["incomplete_reason"]
    assert [r["name"] for r in saved["results"]] == ["contract", "latency", "memory", "determinism"]
