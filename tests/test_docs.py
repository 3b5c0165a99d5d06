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
