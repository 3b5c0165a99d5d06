"""A self-contained probe: `tidegate hil probe-package` writes one zipapp with the code the
measuring side runs (`hil.probe` and the parts of `agent` and `shared` it imports), so a rig
needs a Python with the probe's third-party packages, not the Tidegate distribution with its
server stack. `tidegate hil run --probe FILE` copies it to the rig and runs suites from it.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from shared.fsutil import atomic_write_bytes
from shared.version import TIDEGATE_VERSION

# What the probe imports besides the standard library (see README: setting up a rig).
REQUIREMENTS = (
    "numpy",
    "onnxruntime",
    "pydantic",
    "zstandard",
    "tuf==7.0.1",
    "securesystemslib[crypto]==1.6.0",
    "cryptography",
    "urllib3",
)
PACKAGES = ("agent", "shared", "hil")
# The rest of `hil` runs on the bench host, and these parts of `shared` only on servers.
LEAVE_OUT = {"hil/cli.py", "hil/runner.py", "hil/report.py", "hil/rig.py", "hil/targets.py", "hil/package.py"}

MAIN = '''"""Tidegate's HIL probe as one file: python tidegate-probe.pyz SUITE --bundle F --params JSON."""
import os
import sys

# A suite's own children (the agent's self-test runs in one) import from this file too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (sys.path[0], os.environ.get("PYTHONPATH")) if p)

from hil.probe import main  # noqa: E402

sys.exit(main())
'''


def build_probe(out: Path) -> Path:
    """Write the zipapp to `out` (atomically): Python sources only, in a fixed order with
    fixed timestamps, so the same checkout gives the same bytes."""
    root = Path(__file__).resolve().parent.parent
    members: list[tuple[str, bytes]] = [("__main__.py", MAIN.encode())]
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel in LEAVE_OUT or "__pycache__" in rel:
                continue
            data = path.read_bytes()
            if rel == "shared/version.py":  # the rig may have no installed distribution to ask
                data = f'TIDEGATE_VERSION = "{TIDEGATE_VERSION}"\n'.encode()
            members.append((rel, data))
    buf = io.BytesIO()
    buf.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buf, "a", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, data)
    atomic_write_bytes(out, buf.getvalue())
    out.chmod(0o755)
    return out
