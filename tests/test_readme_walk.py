"""README's "Running it for real", run as written: the repository with offline keys, the
schema, the device PKI and the broker configuration Mosquitto starts from, the fleet server
on mutual TLS, a registered and provisioned device running the real agent, a published
bundle and a campaign created, approved and watched to completion with `tidegate fleet`.

Only what cannot be the same here is moved: paths into a temporary directory, ports to free
ones, host names to this machine. Every other word is the README's, so the steps cannot
drift from what works."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from shared.net import free_port
from tests.helpers import build_bundle
from tests.mqtt_helpers import MOSQUITTO

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto binary not installed")


def section_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block in README's "Running it for real"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Running it for real", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def commands(block: str) -> list[str]:
    joined = block.replace("\\\n", " ")
    out = []
    for raw in joined.splitlines():
        line = re.split(r"\s+#\s", " " + raw, maxsplit=1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


def test_running_it_for_real_works_as_written(tmp_path: Path, sample_payload: Path) -> None:
    blocks = section_blocks()
    langs = [lang for lang, _ in blocks]
    assert langs[:4] == ["sh", "toml", "toml", "sh"], langs
    reachable = Path(tempfile.mkdtemp(prefix="tidegate-pki-"))  # the broker's user must reach it
    reachable.chmod(0o711)
    ports = {"8883": free_port(), "8700": free_port(), "9810": free_port()}
    moved = {
        "postgresql+psycopg://tidegate@db.internal/tidegate": f"sqlite:///{tmp_path / 'fleet.db'}",
        "/srv/tidegate/repo": str(tmp_path / "repo"),
        "/media/offline/tidegate": str(tmp_path / "offline"),
        "/etc/tidegate/pki": str(reachable / "pki"),
        "/etc/tidegate/agent.toml": str(tmp_path / "agent.toml"),
        "/var/lib/tidegate": str(tmp_path / "device"),
        "broker.internal": "localhost",
        "fleet.internal": "127.0.0.1",
        **{port: str(new) for port, new in ports.items()},
    }

    def move(text: str) -> str:
        for was, now in moved.items():
            text = text.replace(was, now)
        return text

    (tmp_path / "agent.toml").write_text(move(blocks[1][1]))
    (tmp_path / "rollout.toml").write_text(move(blocks[2][1]))
    build_bundle(sample_payload, tmp_path / "classifier-1.0.0-edge-cpu.bundle")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
    env["TIDEGATE_FLEET_CONFIG"] = str(tmp_path / "fleet.toml")
    background: list[subprocess.Popen[bytes]] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def argv(line: str) -> list[str]:
        words = shlex.split(_expand(line, env))
        if words[0] == "tidegate":
            return [sys.executable, "-m", "tidegate", *words[1:]]
        if words[0] == "mosquitto":
            return [MOSQUITTO, *words[1:]]
        return words

    def run(line: str) -> str:
        line = move(line)
        if m := re.fullmatch(r"export (.+)", line):
            for pair in shlex.split(m.group(1)):
                key, _, value = pair.partition("=")
                env[key] = value
            return ""
        target = None
        if m := re.fullmatch(r"(\w+)=\$\((.+)\)", line):
            target, line = m.group(1), m.group(2)
        words = argv(line)
        if line.startswith(("mosquitto ", "tidegate server run", "tidegate agent run")):
            log = (logs / f"{len(background)}.log").open("wb")
            background.append(subprocess.Popen(words, env=env, cwd=tmp_path, stdout=log, stderr=log))
            if line.startswith("mosquitto"):
                wait_port(ports["8883"])
            elif line.startswith("tidegate server run"):
                wait_port(ports["8700"])
            else:
                time.sleep(2.0)  # the agent connects and asks for its jobs
            return ""
        proc = subprocess.run(words, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}\n{_tails(logs)}"
        if target is not None:
            env[target] = proc.stdout.strip()
        if line.startswith("tidegate fleet campaign create"):
            env["CAMPAIGN"] = re.search(r"\bc-[0-9a-f]{12}\b", proc.stdout).group(0)  # type: ignore[union-attr]
        return proc.stdout

    try:
        for line in commands(blocks[0][1]):
            run(line)
        assert httpx.get(f"http://127.0.0.1:{ports['8700']}/healthz", timeout=5).status_code == 200
        watched = ""
        for line in commands(blocks[3][1]):
            watched = run(line)
        assert f"campaign {env['CAMPAIGN']} completed" in watched
        device = str(tmp_path / "device")
        status = subprocess.run(
            [sys.executable, "-m", "tidegate", "agent", "status", "--root", device, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert '"active_version": "1.0.0"' in status.stdout, status.stdout
    finally:
        for proc in reversed(background):
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(reachable, ignore_errors=True)


def _expand(line: str, env: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), line)


def _tails(logs: Path) -> str:
    files = sorted(logs.glob("*.log"))
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in files)
