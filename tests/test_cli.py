"""The `tidegate` CLI as users run it: real processes, real files, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.trust.http import RepoHTTPServer


def run(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidegate", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert needle in lines[0]


def test_help_for_every_group() -> None:
    top = run("--help")
    assert top.returncode == 0
    for group in ("agent", "repo", "bundle", "server", "sim", "demo"):
        assert group in top.stdout
    for cmd in (
        ["repo", "init"],
        ["repo", "add"],
        ["repo", "rotate"],
        ["repo", "verify"],
        ["bundle", "pack"],
        ["bundle", "inspect"],
    ):
        proc = run(*cmd, "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout, cmd


def test_pack_publish_rotate_verify_over_http_and_dir(sample_payload: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "c.bundle"
    proc = run(
        "bundle",
        "pack",
        str(sample_payload),
        "--name",
        "classifier",
        "--version",
        "1.2.0",
        "--sku",
        "edge-cpu",
        "--sku",
        "edge-gpu",
        "--zstd",
        "-o",
        str(bundle),
    )
    assert proc.returncode == 0, proc.stderr
    proc = run("bundle", "inspect", str(bundle), "--json")
    assert json.loads(proc.stdout)["skus"] == ["edge-cpu", "edge-gpu"]

    repo, offline = tmp_path / "repo", tmp_path / "offline"
    assert (
        run(
            "repo",
            "init",
            str(repo),
            "--offline-keys",
            str(offline),
            "--root-keys",
            "3",
            "--root-threshold",
            "2",
            "--expiry",
            "timestamp=2",
        ).returncode
        == 0
    )
    assert json.loads((repo / "repo.json").read_text())["expiry_days"]["timestamp"] == 2
    proc = run("repo", "add", str(repo), str(bundle))
    assert proc.returncode == 0, proc.stderr
    assert "classifier/1.2.0/edge-cpu+edge-gpu.bundle" in proc.stdout
    root = repo / "metadata" / "1.root.json"
    assert_one_line_error(run("repo", "rotate", str(repo), "--role", "timestamp"), "offline keys")
    for role in ("targets", "root", "release"):
        proc = run("repo", "rotate", str(repo), "--role", role, "--offline-keys", str(offline))
        assert proc.returncode == 0, proc.stderr
    assert run("repo", "refresh", str(repo)).returncode == 0
    listing = json.loads(run("repo", "list", str(repo), "--json").stdout)
    assert listing[0]["custom"]["version"] == "1.2.0"

    target = "classifier/1.2.0/edge-cpu+edge-gpu.bundle"
    out = tmp_path / "dir.bundle"
    proc = run(
        "repo",
        "verify",
        "--repo",
        str(repo),
        "--trusted-root",
        str(root),
        "--target",
        target,
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "c1"),
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == bundle.read_bytes()
    with RepoHTTPServer(repo) as server:
        out2 = tmp_path / "http.bundle"
        proc = run(
            "repo",
            "verify",
            "--repo",
            server.url,
            "--trusted-root",
            str(root),
            "--target",
            target,
            "--out",
            str(out2),
            "--cache",
            str(tmp_path / "c2"),
        )
        assert proc.returncode == 0, proc.stderr
        assert "every file verified" in proc.stdout


def test_errors_are_one_line(sample_payload: Path, tmp_path: Path) -> None:
    assert_one_line_error(run("bundle", "inspect", str(tmp_path / "missing.bundle")), "no such bundle file")
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"junk" * 200)
    assert_one_line_error(run("bundle", "inspect", str(junk)), "bundle")
    assert_one_line_error(
        run(
            "bundle",
            "pack",
            str(sample_payload),
            "--name",
            "c",
            "--version",
            "1.0",
            "--sku",
            "s",
            "-o",
            str(tmp_path / "x.bundle"),
        ),
        "not a semantic version",
    )
    assert not (tmp_path / "x.bundle").exists()

    repo = tmp_path / "repo"
    run("repo", "init", str(repo), "--offline-keys", str(tmp_path / "offline"))
    bundle = tmp_path / "c.bundle"
    run(
        "bundle",
        "pack",
        str(sample_payload),
        "--name",
        "c",
        "--version",
        "1.0.0",
        "--sku",
        "s",
        "-o",
        str(bundle),
    )
    for key in (repo / "keys" / "release").glob("*.pem"):
        key.unlink()
    assert_one_line_error(run("repo", "add", str(repo), str(bundle)), "no such key file")
    assert_one_line_error(run("repo", "refresh", str(tmp_path / "nowhere")), "no such repository")
    assert_one_line_error(run("repo", "rotate", str(repo), "--role", "admin"), "no delegated role 'admin'")

    other = tmp_path / "other"
    run("repo", "init", str(other), "--offline-keys", str(tmp_path / "other-offline"))
    proc = run(
        "repo",
        "verify",
        "--repo",
        str(repo),
        "--trusted-root",
        str(other / "metadata" / "1.root.json"),
        "--cache",
        str(tmp_path / "cache"),
    )
    assert_one_line_error(proc, "signature")
    assert_one_line_error(
        run("repo", "verify", "--repo", str(repo), "--trusted-root", str(tmp_path / "none.json")),
        "cannot read trusted root",
    )


def test_debug_shows_traceback(tmp_path: Path) -> None:
    proc = run("--debug", "bundle", "inspect", str(tmp_path / "missing.bundle"))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


@pytest.mark.slow
def test_the_cli_loads_no_heavy_package_before_a_command_needs_it() -> None:
    """`tidegate agent run` is the same entry point as the builder and the servers: importing
    the CLI must not pull in their stacks (the agent's memory ceiling pays for every module)."""
    code = "import sys, tidegate.cli; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert not loaded & {
        "onnx",
        "cyclonedx",
        "jsonschema",
        "fastapi",
        "uvicorn",
        "opentelemetry",
        "tritonclient",
        "scipy",
        "asyncssh",
    }


def test_a_database_without_a_schema_is_refused_until_migrate_creates_it(tmp_path: Path) -> None:
    """A misspelt database URL must not quietly become a new, empty fleet: only `migrate`
    starts from nothing, and nothing else creates the file."""
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    proc = run("server", "token", "create", "--role", "admin", "--name", "ops", "--db", url)
    assert_one_line_error(
        proc, f"there is no file {tmp_path / 'fleet.db'}; create it with `tidegate server migrate"
    )
    assert not (tmp_path / "fleet.db").exists()
    (tmp_path / "empty.db").write_bytes(b"")  # a file, but no schema in it
    proc = run("server", "device-add", "car-1", "--sku", "x", "--db", f"sqlite:///{tmp_path / 'empty.db'}")
    assert_one_line_error(proc, "it holds no Tidegate schema")
    assert run("server", "migrate", "--db", url).returncode == 0
    proc = run("server", "token", "create", "--role", "admin", "--name", "ops", "--db", url)
    assert proc.returncode == 0 and proc.stdout.strip()


def test_an_unknown_tidegate_variable_is_reported_with_the_name_it_resembles(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "TIDEGATE_DATABSE_URL": "sqlite:///elsewhere.db", "TIDEGATE_MQTT_PORT": "1883"}
    proc = subprocess.run(
        [sys.executable, "-m", "tidegate", "--version"], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0
    assert proc.stderr.splitlines() == [
        "warning: TIDEGATE_DATABSE_URL is not a Tidegate setting and is ignored; "
        "did you mean TIDEGATE_DATABASE_URL?"
    ]  # TIDEGATE_MQTT_PORT is a setting: not reported


def test_every_tidegate_variable_the_code_reads_is_known() -> None:
    """The list the check above reads from stays true: a new variable read anywhere in the
    product (or its tests and benches) without being added to it fails here."""
    import re

    from tidegate.envcheck import known_variables

    root = Path(__file__).parent.parent
    read = set()
    for folder in (
        "agent",
        "builder",
        "cloud_serving",
        "fleet_server",
        "hil",
        "shared",
        "tidegate",
        "bench",
        "tests",
    ):
        for path in (root / folder).rglob("*.py"):
            read |= set(re.findall(r"[\"'$](TIDEGATE_[A-Z0-9_]+)\b(?!\s*=)", path.read_text()))
    read -= {"TIDEGATE_VERSION", "TIDEGATE_DATABSE_URL"}  # a Python constant; the misspelling above
    assert read and read <= known_variables(), read - known_variables()


def test_usage_errors_are_one_line_too() -> None:
    """An unknown command or option reads like every other error: one line naming the help to
    look at, exit 2 (not a drawn box)."""
    for args, needle in (
        (("bogus",), "error: No such command 'bogus'. (see tidegate --help)"),
        (("agent", "install", "--nope"), "No such option: --nope (see tidegate agent install --help)"),
    ):
        proc = run(*args)
        assert_one_line_error(proc, needle)
        assert proc.returncode == 2
