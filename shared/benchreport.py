"""Bench (HIL) reports as evidence: signed on the bench host, judged strictly by the fleet
server. One module, because both ends must read a report the same way.

A report's signature is ed25519 over its canonical JSON (sorted keys, no whitespace) without
the ``signature`` member; the key id is the first 16 hex digits of the SHA-256 of the raw
public key. `acceptance` is the fleet server's gate as a pure function: every reason a
report cannot open a campaign for a release, or none.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import TidegateError
from shared.fsutil import atomic_write_bytes

# What a campaign's bench gate needs: every suite of the full plan, install included.
REQUIRED_SUITES = ("contract", "latency", "memory", "determinism", "thermal", "install")


class BenchKeyError(TidegateError):
    """A bench signing key that cannot be read, or a public key that cannot be parsed."""

    exit_code = 2


def canonical(report: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in report.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_text(public: Ed25519PublicKey) -> str:
    """The public key as one line: what the fleet server is told (`TIDEGATE_BENCH_KEYS`)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise BenchKeyError(f"not an ed25519 public key (base64 of 32 bytes): {text[:20]!r}") from exc


def generate(path: Path) -> Ed25519PublicKey:
    """A new bench key: the private key in PEM at `path` (mode 0600, never overwritten)."""
    if path.exists():
        raise BenchKeyError(f"{path} exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, pem)
    os.chmod(path, 0o600)
    return key.public_key()


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise BenchKeyError(f"{path}: cannot read the bench key ({exc.strerror})") from exc
    except (ValueError, TypeError) as exc:
        raise BenchKeyError(f"{path}: not a PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BenchKeyError(f"{path}: a bench key is ed25519, not {type(key).__name__}")
    return key


def sign(report: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """`report` with its ``signature`` member (over everything else)."""
    signature = key.sign(canonical(report))
    return {
        **report,
        "signature": {
            "alg": "ed25519",
            "keyid": key_id(key.public_key()),
            "sig": base64.b64encode(signature).decode(),
        },
    }


def verify(report: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> str | None:
    """Why the signature does not hold (None: it verifies under one of `keys`, by key id)."""
    sig = report.get("signature")
    if not isinstance(sig, dict) or sig.get("alg") != "ed25519":
        return "the report is not signed by a bench key"
    key = next((k for k in keys.values() if key_id(k) == sig.get("keyid")), None)
    if key is None:
        return f"the report is signed by key {sig.get('keyid')!r}, which this server does not know"
    try:
        key.verify(base64.b64decode(str(sig.get("sig", "")), validate=True), canonical(report))
    except (InvalidSignature, ValueError):
        return "the report's signature does not verify: it was changed after the bench signed it"
    return None


def acceptance(
    report: Mapping[str, Any],
    *,
    release_sha256: str,
    release_skus: Iterable[str],
    keys: Mapping[str, Ed25519PublicKey],
    simulated_thermal_ok: bool,
) -> list[str]:
    """Every reason `report` cannot count as a passing bench run of this release (empty: it
    can). Nothing is taken on the uploader's word: the verdicts are re-read suite by suite."""
    why: list[str] = []
    if (bad := verify(report, keys)) is not None:
        why.append(bad)
    bundle = report.get("bundle") or {}
    sku = report.get("sku")
    if bundle.get("sha256") != release_sha256:
        why.append(
            f"the report benched bundle sha256 {str(bundle.get('sha256'))[:12]}…, not this release's "
            f"{release_sha256[:12]}…"
        )
    if sku not in set(release_skus):
        why.append(f"the report is for SKU {sku!r}, which this release is not built for")
    preflight = report.get("preflight") or {}
    if preflight.get("verdict") != "passed":
        failed = [c["name"] for c in preflight.get("checks", []) if not c.get("passed")]
        why.append(f"the rig's pre-flight did not pass ({', '.join(failed) or 'not run'})")
    if not report.get("complete"):
        why.append(f"the run is incomplete ({report.get('incomplete_reason') or 'no reason given'})")
    results = {r.get("name"): r for r in report.get("results", []) if isinstance(r, dict)}
    for suite in REQUIRED_SUITES:
        r = results.get(suite)
        if r is None:
            why.append(f"suite {suite} did not run")
        elif r.get("status") != "passed":
            why.append(f"suite {suite} is {r.get('status')}: {r.get('reason')}")
    thermal = (results.get("thermal") or {}).get("figures") or {}
    if thermal.get("simulated") and not simulated_thermal_ok:
        why.append(f"the thermal suite read a simulated zone, and SKU {sku} must be benched on real zones")
    return why
