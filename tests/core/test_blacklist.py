from __future__ import annotations

import contextlib
from datetime import UTC, date, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.core import Keyring, SigningKey
from tessera.core.blacklist import Blacklist, BlacklistEntry, parse_blacklist, sign_blacklist
from tessera.core.errors import FormatError, SignatureError, UnknownKeyError

from .strategies import locking_ids

VENDOR = SigningKey.from_raw(bytes(range(32)))
STRANGER = SigningKey.from_raw(bytes(range(5, 37)))
KEYRING = Keyring([VENDOR.public])
LID = "TL1-MN5F5RR7ZNUDCUDRKWSW3QJFJJ3AG"


def sample() -> Blacklist:
    return Blacklist(
        datetime(2026, 11, 22, 10, 0, tzinfo=UTC),
        7,
        containers=(BlacklistEntry(LID, date(2026, 11, 20), 14),),
        serials=(BlacklistEntry("2026-000123", date(2026, 11, 21), 0),),
    )


def test_round_trip_and_verify() -> None:
    text = sign_blacklist(sample(), VENDOR)
    assert parse_blacklist(text).verify(KEYRING) == sample()


def test_delay_is_honoured() -> None:
    entry = sample().container_entry(LID)
    assert entry is not None
    assert not entry.enforced_on(date(2026, 12, 3))
    assert entry.enforced_on(date(2026, 12, 4))


def test_forged_or_altered_lists_are_refused() -> None:
    with pytest.raises(UnknownKeyError):
        parse_blacklist(sign_blacklist(sample(), STRANGER)).verify(KEYRING)
    altered = sign_blacklist(sample(), VENDOR).replace(", 14\n", ", 0\n")
    with pytest.raises(SignatureError):
        parse_blacklist(altered).verify(KEYRING)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (", 14\n", ", x\n", "since, delay-days"),
        ("2026-11-20", "2026-02-30", "day is out of range"),
        ("[SERIALS]", "[SERIAL]", r"expected \[SERIALS\]"),
        ("sequence = 7", "sequence = 07", "bad sequence"),
        (LID, "TL1-XYZ", "Locking ID"),
    ],
)
def test_malformed_lists_name_the_problem(old: str, new: str, message: str) -> None:
    bad = sign_blacklist(sample(), VENDOR).replace(old, new)
    with pytest.raises(FormatError, match=message):
        parse_blacklist(bad)


@given(st.binary(max_size=1024))
def test_random_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        parse_blacklist(data)


@given(st.lists(locking_ids(), max_size=5, unique=True), st.integers(1, 10**6))
def test_any_list_round_trips(lids: list[str], sequence: int) -> None:
    bl = Blacklist(
        datetime(2026, 1, 1, tzinfo=UTC),
        sequence,
        tuple(BlacklistEntry(x, date(2026, 1, 2), 3) for x in lids),
    )
    assert parse_blacklist(sign_blacklist(bl, VENDOR)).verify(KEYRING) == bl
