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
