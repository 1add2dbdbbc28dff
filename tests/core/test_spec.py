"""License specs (``tessera license sign``): what a vendor may write for ``issued``."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tessera.core.errors import FormatError
from tessera.core.fingerprint import locking_id_for
from tessera.core.spec import load_spec

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)
LOCKING_ID = locking_id_for([("m", "machine-1"), ("u", "uuid-1")], "cortex")
BODY = (
    'licensee = "A, B"\nserial = "2026-1"\nproduct = "cortex"\nversion = "4.*"\n'
    f'locking-id = "{LOCKING_ID}"\n'
)
LOCATION = "\n[locations.abc]\nuniplex = 5\n"


@pytest.mark.parametrize(
    ("line", "issued"),
    [
        ("", NOW),
        ('issued = "2026-01-02T03:04:05Z"', datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("issued = 2026-01-02T03:04:05Z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("issued = 2026-01-02T03:04:05.250+01:00", datetime(2026, 1, 2, 2, 4, 5, tzinfo=UTC)),
    ],
)
def test_issued_is_a_timestamp_or_now(line: str, issued: datetime) -> None:
    assert load_spec(BODY + line + LOCATION, NOW).issued == issued


@pytest.mark.parametrize("value", ["2026-01-02", "20260102", "true", "[2026]", "{ at = 1 }", "10:00:00"])
def test_an_issued_that_is_no_timestamp_is_a_format_error(value: str) -> None:
    # A TOML date or time, a number or a table used to end in an AttributeError (a
    # traceback from ``tessera license sign``); the fuzz test found the date.
    with pytest.raises(FormatError, match="'issued' must be a timestamp"):
        load_spec(BODY + f"issued = {value}" + LOCATION, NOW)


@pytest.mark.parametrize("value", ['"off"', '"no"', '"on"', "0", "1", '""'])
def test_connect_must_be_a_toml_boolean(value: str) -> None:
    # A string is truthy: `connect = "off"` used to sign `connect = on`.
    with pytest.raises(FormatError, match="'connect' must be true or false"):
        load_spec(BODY + f"connect = {value}" + LOCATION, NOW)


@pytest.mark.parametrize(("value", "connect"), [("true", True), ("false", False)])
def test_connect_booleans(value: str, connect: bool) -> None:
    assert load_spec(BODY + f"connect = {value}" + LOCATION, NOW).connect is connect


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("version = 4", "'version' must be a string"),
        ("licensee = 12", "'licensee' must be a string"),
        ("issued = 2026-01-02T03:04:05", "'issued' needs a time zone"),
    ],
)
def test_no_silent_conversions(line: str, needle: str) -> None:
    body = BODY.replace('version = "4.*"\n', "").replace('licensee = "A, B"\n', "")
    extra = "" if line.startswith("version") else 'version = "4.*"\n'
    extra += "" if line.startswith("licensee") else 'licensee = "A, B"\n'
    with pytest.raises(FormatError, match=needle):
        load_spec(body + extra + line + LOCATION, NOW)


@pytest.mark.parametrize("value", ['"uniplex"', '"ctxjs"', "1", "[1]", '{ a = "uniplex" }'])
def test_emergency_must_be_a_list_of_codes(value: str) -> None:
    # A string used to be split into characters: "ctxjs" signed `emergency = c, t, x, j, s`.
    with pytest.raises(FormatError, match="'emergency' must be a list"):
        load_spec(BODY + f"emergency = {value}" + LOCATION, NOW)


def test_emergency_features_must_be_entitled() -> None:
    with pytest.raises(FormatError, match="does not grant: ctxjs"):
        load_spec(BODY + 'emergency = ["uniplex", "ctxjs"]' + LOCATION, NOW)
    assert load_spec(BODY + 'emergency = ["uniplex"]' + LOCATION, NOW).emergency == ("uniplex",)


@pytest.mark.parametrize(
    "entry",
    [
        'uniplex = "5, 20270115"',
        'uniplex = "5, 2027-W03-1"',
        'uniplex = "5, 2027-013"',
        'uniplex = { count = 5, expiry = "20270115" }',
        'uniplex = { count = 5, expiry = "2027-W03-1" }',
        'uniplex = "٥, 2027-01-15"',
    ],
)
def test_expiry_is_only_yyyy_mm_dd(entry: str) -> None:
    with pytest.raises(FormatError, match="uniplex"):
        load_spec(BODY + f"\n[locations.abc]\n{entry}\n", NOW)


def test_expiry_forms_that_stay() -> None:
    for entry in ('uniplex = "5, 2027-01-15"', 'uniplex = { count = 5, expiry = "2027-01-15" }'):
        lic = load_spec(BODY + f"\n[locations.abc]\n{entry}\n", NOW)
        assert str(lic.locations[0].entitlements[0].expiry) == "2027-01-15"
