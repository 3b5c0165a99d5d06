"""The broker's guard plugin (`mosquitto_guard.c`), built on the broker's host against its
own Mosquitto headers: what Mosquitto's configuration cannot refuse (at CONNECT, a
certificate name outside the thing-naming rule or a client id that is not the name; then
`$share/…` subscriptions and devices publishing faster than a rate, before the acl_file).
Mosquitto plugins are C; there is no pure-Python hook in the broker, so `tidegate server ca
broker-config` compiles this one file (a few seconds) and the generated configuration loads
it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from fleet_server.pki.service import PkiError

SOURCE = Path(__file__).with_name("mosquitto_guard.c")
PLUGIN = "tidegate_guard.so"
#: What the broker loses without the guard, for the message that refuses to go on without it.
WITHOUT = (
    "without it the broker accepts certificate names with MQTT wildcards at connect, grants "
    "devices' $share subscriptions (delivering nothing), and does not limit a device's publish rate"
)


class GuardBuildError(PkiError):
    """The guard plugin could not be built here (no compiler, no Mosquitto headers)."""


def build_guard(directory: Path, *, cc: str | None = None, timeout_s: float = 120.0) -> Path:
    """Compile the plugin into `directory` (replaced atomically: a broker reloading meanwhile
    reads the old file or the new one, never half of one)."""
    compiler = cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise GuardBuildError(
            f"no C compiler to build the broker's guard plugin (install gcc), or give --no-guard: {WITHOUT}"
        )
    out = directory / PLUGIN
    tmp = directory / f".{PLUGIN}.tmp"
    cmd = [
        compiler,
        "-std=c99",
        "-D_POSIX_C_SOURCE=200809L",
        "-O2",
        "-Wall",
        "-Werror",
        "-shared",
        "-fPIC",
        "-o",
        str(tmp),
        str(SOURCE),
        "-lcrypto",
    ]
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuardBuildError(f"building the broker's guard plugin failed: {exc}") from exc
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        if any(h in done.stderr for h in ("mosquitto_broker.h", "mosquitto.h", "openssl/", "-lcrypto")):
            raise GuardBuildError(
                "the broker's guard plugin needs Mosquitto's and OpenSSL's headers (Debian: apt-get "
                f"install mosquitto-dev libmosquitto-dev libssl-dev), or give --no-guard: {WITHOUT}"
            )
        raise GuardBuildError(f"building the broker's guard plugin failed:\n{done.stderr.strip()}")
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return out
