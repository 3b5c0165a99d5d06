"""Every ``TIDEGATE_*`` environment variable the product reads, so that one it does not read (a
misspelling: ``TIDEGATE_DATABSE_URL``) is reported at start instead of silently ignored while
the default quietly applies."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

PREFIX = "TIDEGATE_"

#: Variables read outside the fleet server's settings (those come from `Settings` itself).
ELSEWHERE: dict[str, str] = {
    "TIDEGATE_DEBUG": "tracebacks for errors, any command",
    "TIDEGATE_TOKEN": "operator token for `tidegate fleet`, `tidegate sim` and `tidegate hil upload`",
    "TIDEGATE_SERVER_URL": "the fleet server `tidegate fleet` talks to (with TIDEGATE_TOKEN)",
    "TIDEGATE_PROFILE": "the `tidegate fleet` profile to use",
    "TIDEGATE_FLEET_CONFIG": "the `tidegate fleet` profiles file (default ~/.config/tidegate/fleet.toml)",
    "TIDEGATE_REGISTRY_TOKEN": "the gateway's token for the fleet server's registry",
    "TIDEGATE_SHADOW_AUTHKEY": "the key a gateway and its shadow worker share",
    "TIDEGATE_SIGNER_PIN": "PIN of a PKCS#11 token named by an hsm: signer URI",
    "TIDEGATE_BENCH_KEY": "the bench host's report-signing key (`tidegate hil run`)",
    "TIDEGATE_RIG_FILE": "the HIL rig file (default /etc/tidegate/rig.toml)",
    "TIDEGATE_FAULT_KILL_AT": "fault injection for the agent's crash tests",
    "TIDEGATE_TEST_PG_URL": "PostgreSQL for the test suite",
    # Set by the agent for device hooks (agent.hooks), not read by it:
    "TIDEGATE_HOOK_STAGE": "a device hook's stage",
    "TIDEGATE_HOOK_TARGET": "the target a device hook's install is of",
    "TIDEGATE_HOOK_VERSION": "the version a device hook's install is of",
    "TIDEGATE_HOOK_SLOT": "the slot a device hook's install writes",
    "TIDEGATE_HOOK_REASON": "why an install rolled back (on-rollback hooks)",
    "TIDEGATE_BENCH_PG_URL": "PostgreSQL for the benchmarks",
    "TIDEGATE_BENCH_MB": "benchmark: bundle size",
    "TIDEGATE_BENCH_INSTALL_MB": "benchmark: install sizes",
    "TIDEGATE_BENCH_IDLE_S": "benchmark: agent idle time",
    "TIDEGATE_BENCH_DEVICES": "benchmark: campaign size",
    "TIDEGATE_BENCH_WAVES": "benchmark: campaign waves",
    "TIDEGATE_BENCH_VERBOSE": "benchmark: progress output",
}


def known_variables() -> set[str]:
    from fleet_server.settings import Settings

    return {PREFIX + name.upper() for name in Settings.model_fields} | set(ELSEWHERE)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per ``TIDEGATE_*`` variable nothing reads, with the nearest known name."""
    names = sorted(n for n in environ if n.startswith(PREFIX))
    if not names:
        return []
    known = known_variables()
    lines = []
    for name in names:
        if name in known:
            continue
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        hint = f"; did you mean {near[0]}?" if near else ""
        lines.append(f"{name} is not a Tidegate setting and is ignored{hint}")
    return lines
