"""Signing through a PKCS#11 token (SoftHSM2 from Debian's package), end to end: `repo init`
with the release role's key on the token, publish, rotate to a second token key, a device
installs; and a token without the key is a one-line error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.device import DeviceConfig, DeviceRoot
from agent.engine import Agent
from tests.helpers import build_bundle

SOFTHSM = Path("/usr/lib/softhsm/libsofthsm2.so")
PIN = "4321"


@pytest.fixture
def token(tmp_path: Path) -> dict[str, str]:
    if shutil.which("softhsm2-util") is None or not SOFTHSM.exists():
        pytest.skip("softhsm2 is not installed (.ci/run installs it)")
    pkcs11 = pytest.importorskip("pkcs11")
    from pkcs11.util.ec import encode_named_curve_parameters

    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf), "PYKCS11LIB": str(SOFTHSM), "TIDEGATE_SIGNER_PIN": PIN}
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "tidegate", "--pin", PIN, "--so-pin", "8765"],
        env=env,
        check=True,
        capture_output=True,
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)  # the library reads it at load, in this process too
    try:
        tok = pkcs11.lib(str(SOFTHSM)).get_token(token_label="tidegate")
        with tok.open(rw=True, user_pin=PIN) as session:
            for keyid in (b"\x02", b"\x03"):
                params = session.create_domain_parameters(
                    pkcs11.KeyType.EC,
                    {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                    local=True,
                )
                params.generate_keypair(store=True, id=keyid, label=f"release-{keyid[0]}")
    finally:
        del os.environ["SOFTHSM2_CONF"]
    return env


def _repo(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidegate", "repo", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_release_key_on_a_token_init_publish_rotate_install(
    token: dict[str, str], tmp_path: Path, sample_payload: Path
) -> None:
    repo, offline = tmp_path / "repo", tmp_path / "offline"
    proc = _repo(
        token, "init", str(repo), "--offline-keys", str(offline), "--key", "release=hsm:2?label=tidegate"
    )
    assert proc.returncode == 0, proc.stderr
    assert not (repo / "keys" / "release").exists()  # the key never left the token
    assert "hsm:2?label=tidegate" in (repo / "repo.json").read_text()
    v1 = build_bundle(sample_payload, tmp_path / "v1.bundle")
    proc = _repo(token, "add", str(repo), str(v1))
    assert (
        proc.returncode == 0 and "published classifier/1.0.0/edge-cpu.bundle in role release" in proc.stdout
    ), proc.stdout + proc.stderr
    proc = _repo(
        token,
        "rotate",
        str(repo),
        "--role",
        "release",
        "--key",
        "hsm:3?label=tidegate",
        "--offline-keys",
        str(offline),
    )
    assert proc.returncode == 0, proc.stderr
    v2 = build_bundle(sample_payload, tmp_path / "v2.bundle", version="2.0.0")
    assert _repo(token, "add", str(repo), str(v2)).returncode == 0
    device = tmp_path / "device"
    DeviceRoot.provision(
        device, DeviceConfig(device_id="d", sku="edge-cpu"), (repo / "metadata" / "1.root.json").read_bytes()
    )
    r = Agent(device).install(repository=str(repo), target="classifier/2.0.0/edge-cpu.bundle")
    assert r.ok, r
    # The signature on the published role is ECDSA P-256 from the token, not a file key.
    assert "ecdsa-sha2-nistp256" in (repo / "metadata" / "targets.json").read_text()


def test_a_token_without_the_key_is_a_one_line_error(token: dict[str, str], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    proc = _repo(
        token,
        "init",
        str(repo),
        "--offline-keys",
        str(tmp_path / "off"),
        "--key",
        "release=hsm:9?label=tidegate",
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: signer hsm:9?label=tidegate:"), proc.stderr
    assert "could not find ECDSA key" in lines[0] or "No keys found" in lines[0]
    assert not repo.exists() or not any(repo.iterdir())
    wrong_pin = {**token, "TIDEGATE_SIGNER_PIN": "0000"}
    proc = _repo(
        wrong_pin,
        "init",
        str(repo),
        "--offline-keys",
        str(tmp_path / "off"),
        "--key",
        "release=hsm:2?label=nope",
    )
    assert proc.returncode != 0 and "No PKCS#11 token found for label nope" in proc.stderr
