"""The bench runner against real targets: this machine, and a rig over real SSH (an
asyncssh server started here, which runs the probe's commands and serves SFTP)."""

from __future__ import annotations

import asyncio
import hashlib
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

from builder.samples import make_hanging_classifier
from hil import runner
from hil.report import write_all
from hil.targets import LocalTarget
from shared.benchreport import generate, public_text
from shared.trust import UpdateRepository
from tests.agent_world import _variant
from tests.helpers import build_bundle, self_test
from tidegate.cli import main

SKU = "edge-cpu"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _st(budget_ms: float = 200.0) -> dict[str, Any]:
    return self_test(latency_budget_ms=budget_ms)


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
    hung_payload = shutil.copytree(sample_payload, d / "payload-hung")
    make_hanging_classifier(hung_payload / "model.onnx")
    hung = build_bundle(
        hung_payload, d / "hung.bundle", name="classifier", version="1.3.0", skus=[SKU], self_test=_st()
    )
    arm = build_bundle(
        sample_payload,
        d / "arm.bundle",
        name="classifier",
        version="1.4.0",
        skus=["edge-cpu-arm64-int8"],
        self_test=_st(),
    )
    (d / "bench.pub").write_text(public_text(generate(d / "bench.key")))
    return {
        "v1": v1,
        "v2": v2,
        "altered": altered,
        "hung": hung,
        "arm": arm,
        "repo": d / "repo",
        "dir": d,
        "key": d / "bench.key",
        "public": d / "bench.pub",
    }


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    if "--out" not in argv:  # never the default ./hil-report: the tests write in temp dirs only
        import tempfile

        argv = [*argv, "--out", tempfile.mkdtemp(prefix="hil-test-report-")]
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
            "--signing-key",
            str(bench["key"]),
        ],
        capsys,
    )
    assert code == 0, text
    assert "(signed)" in text
    assert "[5/6] thermal" in text and "install cycle: roll back" in text  # progress shown
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["complete"] and report["started"]
    assert report["preflight"]["verdict"] == "passed" and report["signature"]["alg"] == "ed25519"
    assert report["bundle"]["sha256"] == hashlib.sha256(bench["v2"].read_bytes()).hexdigest()
    assert (
        report["rig"]["machine"]
        and report["rig"]["tidegate"]
        and report["rig"]["thermal_source"] == "simulated"
    )
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
    app = fleet_app(
        db,
        repository=UpdateRepository.init(tmp_path / "fleet-repo"),
        bench_keys={"bench-1": bench["public"].read_text()},
        bench_simulated_thermal_skus=[SKU],
    )
    served = ServedApp(app, port).start()
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
        # a hand-edited report is refused (the signature), and so is nothing else yet
        edited = json.loads((out / "report.json").read_text())
        edited["results"][1]["figures"]["p95_ms"] = 0.001  # a faster bench than the one that ran
        (tmp_path / "edited").mkdir()
        (tmp_path / "edited" / "report.json").write_text(json.dumps(edited))
        assert (
            main(["hil", "upload", "--report", str(tmp_path / "edited"), "--server", url, "--token", token])
            == 2
        )
        assert "changed after the bench signed it" in capsys.readouterr().err
        with db.session() as s:
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
    assert code == 2 and "cannot connect" in text and "nothing listens on 127.0.0.1 port" in text
    report = json.loads((out / "report.json").read_text())
    assert not report["complete"] and "cannot connect" in report["incomplete_reason"]
    # a failed connection never overwrites an earlier report in the same --out
    (out / "report.json").write_text('{"passed": true}')
    code, _ = _run(
        ["--bundle", str(bench["v2"]), "--target", f"ssh://bench@127.0.0.1:{free_port()}", "--out", str(out)],
        capsys,
    )
    assert code == 2 and (out / "report.json").read_text() == '{"passed": true}'
    refused = json.loads((out / "not-started" / "report.json").read_text())
    assert "cannot connect" in refused["incomplete_reason"]


def test_an_interrupted_run_leaves_a_partial_report_marked_incomplete(
    bench: dict[str, Path], tmp_path: Path
) -> None:
    target = LocalTarget()
    report, manifest = runner.start(
        bench["v2"], target, "full", {"thermal": {"soak_s": 60}, "repo": str(bench["repo"])}
    )
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
    statuses = [(r["name"], r["status"]) for r in saved["results"]]
    assert statuses[:4] == [(n, "passed") for n in ("contract", "latency", "memory", "determinism")]
    assert statuses[4:] == [("thermal", "not_run"), ("install", "not_run")]
    page = (tmp_path / "partial" / "report.html").read_text()
    assert "INCOMPLETE" in page and "not_run" in page


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
            # As sshd does: the command's output is forwarded to its end, then its exit status.
            proc = await asyncio.create_subprocess_shell(
                process.command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )

            async def copy(src: asyncio.StreamReader, dst: Any) -> None:
                while chunk := await src.read(65536):
                    dst.write(chunk.decode(errors="replace"))

            assert proc.stdout is not None and proc.stderr is not None
            await asyncio.gather(copy(proc.stdout, process.stdout), copy(proc.stderr, process.stderr))
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

    def args(self, target: str | None = None) -> list[str]:
        """`tidegate hil run` options that reach this rig as bench@127.0.0.1."""
        target = target or f"ssh://bench@127.0.0.1:{self.port}"
        return ["--target", target, "--identity", str(self.identity), "--known-hosts", str(self.known_hosts)]

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
                *rig.args(),
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
            "--repo",
            str(bench["repo"]),
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
    assert [r["name"] for r in saved["results"] if r["status"] == "passed"] == [
        "contract",
        "latency",
        "memory",
        "determinism",
    ]
    assert "Traceback" not in rest and "CancelledError" not in rest


# ---- the former false passes, each now refused ---------------------------------------------------


def test_an_arm64_bundle_on_an_x86_rig_does_not_start_and_keeps_the_earlier_report(
    bench: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    code, _ = _run(
        ["--bundle", str(bench["v2"]), "--suite", "latency", "--runs", "20", "--out", str(out)], capsys
    )
    assert code == 0
    earlier = (out / "report.json").read_text()
    code, text = _run(
        [
            "--bundle",
            str(bench["arm"]),
            "--suite",
            "smoke",
            "--out",
            str(out),
            "--signing-key",
            str(bench["key"]),
        ],
        capsys,
    )
    assert code == 2, text
    assert "FAILED architecture" in text and "SKU edge-cpu-arm64-int8 is arm64" in text
    assert (out / "report.json").read_text() == earlier  # a run that did not start never replaces one
    refused = json.loads((out / "not-started" / "report.json").read_text())
    assert refused["started"] is False and refused["preflight"]["verdict"] == "failed"
    assert {r["status"] for r in refused["results"]} == {"not_run"} and not refused["passed"]
    assert refused["bundle"]["sha256"] == hashlib.sha256(bench["arm"].read_bytes()).hexdigest()
    # a rig that declares which SKUs it stands for refuses the others
    rig = tmp_path / "rig.toml"
    rig.write_text('name = "bench-7"\nskus = ["edge-cpu-x86"]\n')
    import os

    os.environ["TIDEGATE_RIG_FILE"] = str(rig)
    try:
        code, text = _run(
            ["--bundle", str(bench["v2"]), "--suite", "latency", "--out", str(tmp_path / "r2")], capsys
        )
    finally:
        del os.environ["TIDEGATE_RIG_FILE"]
    assert code == 2 and "FAILED rig" in text and "bench-7" in text


def test_thermal_without_zones_and_full_without_repo_do_not_start(
    bench: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = _run(
        [
            "--bundle",
            str(bench["v2"]),
            "--suite",
            "thermal",
            "--thermal-root",
            str(tmp_path / "no-such-thermal"),
        ],
        capsys,
    )
    assert code == 2 and "FAILED thermal" in text and "0 readable zone(s)" in text
    (tmp_path / "empty").mkdir()
    code, text = _run(
        ["--bundle", str(bench["v2"]), "--suite", "thermal", "--thermal-root", str(tmp_path / "empty")],
        capsys,
    )
    assert code == 2 and "FAILED thermal" in text
    code, text = _run(["--bundle", str(bench["v2"]), "--suite", "full", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "FAILED install" in text and "needs --repo" in text
    code, text = _run(
        [
            "--bundle",
            str(bench["v2"]),
            "--suite",
            "install",
            "--repo",
            "http://127.0.0.1:9/repo",
            "--out",
            str(tmp_path / "u"),
        ],
        capsys,
    )
    assert code == 2 and "give --trusted-root" in text
    # and the judge never passes a soak that read nothing
    from hil.judge import Budgets, thermal

    ok, why = thermal(
        {
            "thresholds_c": [70.0],
            "trace": [],
            "max_temp_c": None,
            "soak_s": 5,
            "simulated": False,
            "throttled_p95_ms": None,
        },
        Budgets(latency_p95_ms=10, memory_ceiling_mb=100, throttled_factor=2, max_jitter_fraction=0.5),
    )
    assert not ok and "read no temperature" in why


def test_a_hung_model_fails_each_suite_alone_at_its_timeout(
    bench: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    out = tmp_path / "r"
    t0 = time.monotonic()
    code, text = _run(
        ["--bundle", str(bench["hung"]), "--suite", "smoke", "--suite-timeout-s", "3", "--out", str(out)],
        capsys,
    )
    took = time.monotonic() - t0
    assert code == 1, text  # suites failed; the run itself finished
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["started"] and not report["passed"]
    assert [r["status"] for r in report["results"]] == ["error"] * 4
    assert all("did not finish within 3 s and was killed" in r["reason"] for r in report["results"])
    assert took < 40
    assert report["workdir"] and not Path(report["workdir"]).exists()  # the killed probes left nothing
    import subprocess

    assert (
        str(bench["hung"].name)
        not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    )


def test_a_rig_without_tidegate_could_not_start_and_ssh_errors_say_what_to_do(
    bench: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import getpass

    from hil.targets import SshTarget

    with _SshRig(tmp_path) as rig:
        base = [
            "--target",
            f"ssh://127.0.0.1:{rig.port}",  # no user: the local one, as ssh does
            "--identity",
            str(rig.identity),
            "--known-hosts",
            str(rig.known_hosts),
        ]
        code, text = _run(
            [
                "--bundle",
                str(bench["v2"]),
                *base,
                "--remote-python",
                "/nonexistent/python3",
                "--out",
                str(tmp_path / "r"),
            ],
            capsys,
        )
        assert code == 2, text
        assert "FAILED probe" in text and "cannot run the probe" in text
        report = json.loads((tmp_path / "r" / "report.json").read_text())
        assert (
            not report["started"]
            and not report["passed"]
            and report["target"].startswith(f"ssh://{getpass.getuser()}@")
        )
        # doctor: the same pre-flight alone
        doctor = ["hil", "doctor", *base, "--remote-python", sys.executable, "--suite", "smoke"]
        assert main([*doctor, "--sku", "edge-cpu"]) == 0
        assert "is fit to bench edge-cpu" in capsys.readouterr().out
        assert (
            main(["hil", "doctor", *base, "--remote-python", sys.executable, "--sku", "edge-cpu-arm64-int8"])
            == 2
        )
        wrong = tmp_path / "wrong_known_hosts"
        import asyncssh

        other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
        wrong.write_text(f"[127.0.0.1]:{rig.port} {other}")
        code, text = _run(
            [
                "--bundle",
                str(bench["v2"]),
                "--target",
                f"ssh://bench@127.0.0.1:{rig.port}",
                "--identity",
                str(rig.identity),
                "--known-hosts",
                str(wrong),
            ],
            capsys,
        )
        assert code == 2 and f"ssh-keyscan -p {rig.port} 127.0.0.1" in text
    assert SshTarget.from_url("ssh://rig.example:2222").username == getpass.getuser()


def test_ctrl_c_over_ssh_with_a_quiet_probe_stops_within_seconds_and_cleans_both_sides(
    bench: dict[str, Path], tmp_path: Path
) -> None:
    """A hung model over SSH: the probe prints nothing; one SIGINT ends the run, kills the
    probe on the rig, removes the rig's work directory, writes the partial report."""
    import os
    import signal
    import subprocess
    import time

    with _SshRig(tmp_path) as rig:
        out = tmp_path / "r"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tidegate",
                "hil",
                "run",
                "--bundle",
                str(bench["hung"]),
                *rig.args(),
                "--remote-python",
                sys.executable,
                "--suite",
                "smoke",
                "--out",
                str(out),
            ],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert proc.stderr is not None
        for line in proc.stderr:
            if "[1/4] contract" in line:
                break
        time.sleep(2)  # the probe is loading and hangs in the model, quiet
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 130, rest
        took = time.monotonic() - t0
    print(f"\nCtrl-C over SSH with a quiet probe: exit 130 after {took:.2f} s")
    assert took < 2.0, took
    assert "Traceback" not in rest and "CancelledError" not in rest
    saved = json.loads((out / "report.json").read_text())
    assert not saved["complete"] and "interrupted" in saved["incomplete_reason"]
    assert {r["status"] for r in saved["results"]} == {"not_run"}
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "hil.probe contract" not in ps  # killed on the rig
    assert saved["workdir"].startswith("/tmp/tidegate-hil-") and not Path(saved["workdir"]).exists()


def test_a_self_contained_probe_benches_a_rig_without_the_distribution(
    bench: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The probe side as one file: it imports none of the server stack, and a rig runs every
    suite from it over SSH (its Python started isolated, so only the file's code is Tidegate)."""
    import subprocess

    pyz = tmp_path / "tidegate-probe.pyz"
    assert main(["hil", "probe-package", "--out", str(pyz)]) == 0
    assert "pip install" in capsys.readouterr().out
    check = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(pyz)!r}); import hil.probe, agent.engine, shared.trust; "
            "print(hil.probe.__file__); "
            "print([m for m in ('fastapi', 'sqlalchemy', 'uvicorn', 'typer', 'httpx', 'scipy', 'builder') "
            "if m in sys.modules])",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert check.returncode == 0, check.stderr
    where, heavy = check.stdout.splitlines()
    assert where.startswith(str(pyz)) and heavy == "[]"
    isolated = tmp_path / "python-isolated"
    isolated.write_text(f'#!/bin/sh\nexec {sys.executable} -I "$@"\n')
    isolated.chmod(0o755)
    with _SshRig(tmp_path) as rig:
        out = tmp_path / "r"
        code, text = _run(
            [
                "--bundle",
                str(bench["v2"]),
                *rig.args(),
                "--remote-python",
                str(isolated),
                "--probe",
                str(pyz),
                "--suite",
                "full",
                "--repo",
                str(bench["repo"]),
                "--soak-s",
                "3",
                "--runs",
                "30",
                "--out",
                str(out),
            ],
            capsys,
        )
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    assert (
        report["probe"][0].endswith("tidegate-probe.pyz")
        and report["rig"]["tidegate"] == report["bench_host"]["tidegate"]
    )
    assert [r["status"] for r in report["results"]] == ["passed"] * 6


def test_the_probe_reads_a_cgroups_cpu_quota_and_memory_limit_in_either_layout(tmp_path: Path) -> None:
    """A container rig's limits as the probe sees them (a directory laid out like
    /sys/fs/cgroup): v2's cpu.max and memory.max, v1's cfs quota and limit_in_bytes, and
    "no limit" in each (v2's max, v1's -1 and its near-2^63 limit)."""
    from hil.probe import _cgroup_limits

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    (v2 / "memory.max").write_text(f"{512 * 1024 * 1024}\n")
    assert _cgroup_limits(v2) == {"cpu_limit": 1.5, "memory_limit_mb": 512.0}
    (v2 / "cpu.max").write_text("max 100000\n")
    (v2 / "memory.max").write_text("max\n")
    assert _cgroup_limits(v2) == {"cpu_limit": None, "memory_limit_mb": None}
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "memory").mkdir()
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{384 * 1024 * 1024}\n")
    assert _cgroup_limits(v1) == {"cpu_limit": 0.5, "memory_limit_mb": 384.0}
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert _cgroup_limits(v1) == {"cpu_limit": None, "memory_limit_mb": None}
    assert _cgroup_limits(tmp_path / "none") == {"cpu_limit": None, "memory_limit_mb": None}
