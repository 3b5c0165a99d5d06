"""The documentation that is generated from code is current, and the docs the README and the
security model point to exist."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_configuration_reference_is_generated_from_the_settings_models() -> None:
    render = runpy.run_path(str(ROOT / "docs" / "generate_config.py"))["render"]
    assert (ROOT / "docs" / "CONFIGURATION.md").read_text() == render(), "run python docs/generate_config.py"
    text = render()
    for key in ("TIDEGATE_DATABASE_URL", "mqtt.transport", "gateway.api_keys_sha256", "models.<name>.alerts"):
        assert f"`{key}`" in text


def test_every_local_link_in_the_docs_resolves() -> None:
    for doc in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to a missing {target}"


def test_the_security_model_names_only_tests_that_exist() -> None:
    tests = {p.stem: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    text = (ROOT / "docs" / "SECURITY.md").read_text()
    named = set(re.findall(r"`(?:(test_\w+)(?:\.py)?::)?(test_\w+)(?:\[\w+\])?`", text))
    assert len(named) > 20
    for module, name in named:
        if module:
            assert module in tests and f"def {name}" in tests[module], (module, name)
        else:
            assert name in tests or any(f"def {name}" in src for src in tests.values()), name


def test_the_systemd_units_run_commands_the_cli_has() -> None:
    """Each unit's Exec lines name `tidegate` commands and options that exist (checked by
    asking the CLI for their help), so a renamed option cannot leave a unit that fails."""
    import shlex
    import subprocess
    import sys

    units = [
        ROOT / "agent/packaging/tidegate-agent.service",
        ROOT / "fleet_server/packaging/tidegate-fleet-server.service",
    ]
    for unit in units:
        execs = [ln.split("=", 1)[1] for ln in unit.read_text().splitlines() if ln.startswith("Exec")]
        assert execs, unit
        for line in execs:
            argv = shlex.split(line)
            assert argv[0].endswith("/tidegate"), line
            words = [a for a in argv[1:] if not a.startswith("-")][:2]
            command = [sys.executable, "-m", "tidegate", *words, "--help"]
            helped = subprocess.run(command, capture_output=True, text=True, timeout=60)
            assert helped.returncode == 0, (unit.name, line, helped.stderr)
            for option in (a.split("=")[0] for a in argv[1:] if a.startswith("--")):
                assert option in helped.stdout, (unit.name, option)


def test_the_vehicle_state_example_in_the_readme_is_what_the_agent_reads() -> None:
    import json

    from agent.vehicle import VehicleState

    text = (ROOT / "README.md").read_text()
    example = text.split("The vehicle integration keeps", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    state = VehicleState.model_validate(json.loads(example))
    assert set(json.loads(example)) == set(VehicleState.model_fields)  # every field shown, none invented
    assert state.parked is True and state.battery_pct == 81
