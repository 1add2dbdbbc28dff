from __future__ import annotations

import pytest

from tessera.core.versions import VersionRange


@pytest.mark.parametrize(
    ("spec", "version", "ok"),
    [
        ("4.*", "4.0", True),
        ("4.*", "4.12.3", True),
        ("4.*", "5.0", False),
        ("4.*", "3.9", False),
        ("4.2", "4.2.0", True),
        ("4.2", "4.2.1", False),
        (">=4.1, <5", "4.1", True),
        (">=4.1, <5", "4.9.9", True),
        (">=4.1, <5", "5.0.0", False),
        ("*", "0.0.1", True),
        (">4", "4.0.1", True),
        ("<=2", "2.0", True),
    ],
)
def test_contains(spec: str, version: str, ok: bool) -> None:
    assert VersionRange.parse(spec).contains(version) is ok


@pytest.mark.parametrize("spec", ["", "4.x", ">=", ">=4.*", "4..1", ",", "01.2", "4,,5"])
def test_malformed(spec: str) -> None:
    with pytest.raises(ValueError):
        VersionRange.parse(spec)


def test_canonical_spelling_round_trips() -> None:
    for spec in ["4.*", ">=4.1, <5", "4.2", "*"]:
        assert str(VersionRange.parse(spec)) == spec
    assert str(VersionRange.parse(">=4.1,<5")) == ">=4.1, <5"
