from __future__ import annotations

import pytest

from shared.semver import InvalidVersionError, SemVer


def test_ordering_follows_semver_org() -> None:
    order = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.1",
        "1.2.0",
        "2.0.0",
    ]
    parsed = [SemVer.parse(v) for v in order]
    assert sorted(reversed(parsed)) == parsed
    assert SemVer.parse("1.0.0+build.1") == SemVer.parse("1.0.0+other")
    assert str(SemVer.parse("1.2.3-rc.1+sha.5")) == "1.2.3-rc.1+sha.5"


@pytest.mark.parametrize("bad", ["1.0", "v1.0.0", "01.0.0", "1.0.0-", "1.0.0-01", "", "1.0.0.0"])
def test_refuses_non_semver(bad: str) -> None:
    with pytest.raises(InvalidVersionError, match="not a semantic version"):
        SemVer.parse(bad)
