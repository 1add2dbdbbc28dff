from __future__ import annotations

import base64
import contextlib
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.core import Keyring, SigningKey, locking_id_for
from tessera.core.blacklist import Blacklist, BlacklistEntry, parse_blacklist, sign_blacklist
from tessera.core.errors import FormatError, SignatureError, UnknownKeyError
from tessera.core.model import Binding, Entitlement, License, Location, MatchLevel
from tessera.core.versions import VersionRange

from .strategies import locking_ids, serials, timestamps

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


MOVED = datetime(2026, 11, 21, 15, 4, 5, tzinfo=UTC)
FACTS = [("m", "machine-1"), ("u", "uuid-1"), ("n", "nic-1"), ("d", "disk-1"), ("c", "cpu"), ("h", "host")]
OLD = str(locking_id_for(FACTS, "cortex"))
#: the old machine after a new disk: still the same machine at medium, not at strict
DRIFTED = str(locking_id_for([(k, "disk-2" if k == "d" else v) for k, v in FACTS], "cortex"))
SEAT = str(locking_id_for([("m", "machine-2"), ("u", "uuid-2"), ("c", "cpu"), ("h", "host-2")], "cortex"))


def sample_2() -> Blacklist:
    """A file with a license moved away from one container: needs tessera/2."""
    return Blacklist(
        datetime(2026, 11, 22, 10, 0, tzinfo=UTC),
        8,
        containers=(BlacklistEntry(LID, date(2026, 11, 20), 14),),
        serials=(
            BlacklistEntry("2026-000123", date(2026, 11, 21), 0),
            BlacklistEntry.moved_away("2026-000124", OLD, MOVED, 3),
            BlacklistEntry.moved_away("2026-000124", SEAT, MOVED + timedelta(days=2)),
        ),
    )


def copy(
    issued: datetime, locking_id: str | None = OLD, serial: str = "2026-000124", **kw: object
) -> License:
    """A copy of the license as some machine holds it."""
    instance = locking_id is None
    return License(
        licensee="myCompany, City",
        serial=serial,
        product="cortex",
        version=VersionRange.parse("4.*"),
        issued=issued,
        locations=(Location("main", (Entitlement("uniplex", 5, None),)),),
        binding=Binding.INSTANCE if instance else Binding.MACHINE,
        locking_id=locking_id,
        instance_id="inst-00000001" if instance else None,
        **kw,  # type: ignore[arg-type]
    )


def test_round_trip_and_verify() -> None:
    text = sign_blacklist(sample(), VENDOR)
    assert parse_blacklist(text).verify(KEYRING) == sample()


def test_a_file_without_container_scoped_entries_is_tessera_1_as_before() -> None:
    """Shipped agents read only tessera/1: what they could read is still written that way."""
    assert sample().serialize_body() == (
        "[BLACKLIST]\nformat = tessera/1\nissued = 2026-11-22T10:00:00Z\nsequence = 7\n"
        f"[CONTAINERS]\n{LID} = 2026-11-20, 14\n[SERIALS]\n2026-000123 = 2026-11-21, 0\n"
    )


def test_container_scoped_entries_are_tessera_2_and_round_trip() -> None:
    text = sign_blacklist(sample_2(), VENDOR)
    assert text.startswith("[BLACKLIST]\nformat = tessera/2\n")
    assert (
        "[SERIALS]\n2026-000123 = 2026-11-21, 0\n"
        f"2026-000124 = 2026-11-21T15:04:05Z, 3, {OLD}\n2026-000124 = 2026-11-23T15:04:05Z, 0, {SEAT}\n"
    ) in text
    listed = parse_blacklist(text).verify(KEYRING)
    assert listed == sample_2() and listed.format == "tessera/2"
    assert [e.locking_id for e in listed.serial_entries("2026-000124")] == [OLD, SEAT]
    entry = listed.serial_entries("2026-000124")[0]
    assert entry.since == MOVED.date() and entry.enforced_from() == date(2026, 11, 24)


def _signed(body: str) -> str:
    sig = base64.b64encode(VENDOR.sign(body.encode())).decode()
    return f"{body}[SIGNATURE]\nkey-id = {VENDOR.key_id}\ned25519 = {sig}\n"


def test_each_format_has_exactly_one_spelling() -> None:
    # A container-scoped entry in a tessera/1 file: a shape tessera/1 does not have.
    v2 = sample_2().serialize_body()
    with pytest.raises(FormatError, match="line 9: expected 'since, delay-days'"):
        parse_blacklist(_signed(v2.replace("tessera/2", "tessera/1")))
    # A tessera/2 file that needs nothing of tessera/2 is not canonical: signed or not.
    with pytest.raises(FormatError, match=r"line 2: not in canonical form .*tessera/1"):
        parse_blacklist(_signed(sample().serialize_body().replace("tessera/1", "tessera/2")))
    with pytest.raises(FormatError, match="unsupported format"):
        parse_blacklist(_signed(v2.replace("tessera/2", "tessera/3")))


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("15:04:05Z, 3,", "15:04:05Z, 03,", "moved, delay-days, Locking ID"),
        ("15:04:05Z, 3,", "15:04:05Z,", "moved, delay-days, Locking ID"),
        ("2026-11-21T15:04:05Z", "2026-11-21", "not a UTC timestamp"),
        ("2026-11-21T15:04:05Z", "2026-11-21T15:04:05+01:00", "not a UTC timestamp"),
        (f"3, {OLD}", "3, TL1-XYZ", "Locking ID"),
        (f"3, {OLD}", f"3, {OLD}, 1", "moved, delay-days, Locking ID"),
        ("2026-11-23T15:04:05Z, 0", "2026-11-21T15:04:05Z, 3", "listed twice"),
    ],
)
def test_malformed_container_scoped_entries_name_the_problem(old: str, new: str, message: str) -> None:
    body = sample_2().serialize_body()
    if "listed twice" in message:
        body = body.replace(f"{SEAT}\n", f"{OLD}\n")
    bad = _signed(body.replace(old, new, 1))
    with pytest.raises(FormatError, match=message):
        parse_blacklist(bad)


def test_a_container_scoped_entry_reaches_exactly_the_old_containers_copies() -> None:
    entry = BlacklistEntry.moved_away("2026-000124", OLD, MOVED)
    same_day = MOVED - timedelta(hours=5)
    assert entry.reaches(copy(same_day))  # issued on the day of the move: reached now
    assert entry.reaches(copy(MOVED))  # even in the second of the move, bound to exactly it
    assert not entry.reaches(copy(MOVED + timedelta(seconds=1)))  # moved back there later
    assert entry.reaches(copy(same_day, DRIFTED))  # an older copy from before a new disk
    assert not entry.reaches(copy(same_day, DRIFTED, match=MatchLevel.STRICT))
    # A target that matches the old container only tolerantly: its first copy is issued
    # in the second of the move and must keep working.
    assert not entry.reaches(copy(MOVED, DRIFTED))
    assert not entry.reaches(copy(same_day - timedelta(days=30), SEAT))  # another seat
    assert not entry.reaches(copy(same_day, serial="2026-000125"))
    assert not entry.reaches(copy(same_day, locking_id=None))  # instance-bound: no container
    # A tessera/1 entry keeps its meaning: every copy issued before the day.
    day = BlacklistEntry("2026-000124", MOVED.date())
    assert day.reaches(copy(same_day - timedelta(days=1), SEAT))
    assert not day.reaches(copy(same_day)) and day.reaches(copy(same_day - timedelta(days=1), None))


def test_the_earliest_enforced_entry_withdraws_a_copy() -> None:
    later = BlacklistEntry.moved_away("2026-000124", OLD, MOVED + timedelta(days=5))
    first = BlacklistEntry.moved_away("2026-000124", OLD, MOVED, 10)
    listed = Blacklist(datetime(2026, 12, 1, tzinfo=UTC), 1, serials=(later, first))
    assert listed.withdrawing(copy(MOVED)) == later  # day 26 before day 31
    assert listed.withdrawing(copy(MOVED + timedelta(days=1))) == later
    assert listed.withdrawing(copy(MOVED, SEAT)) is None


@pytest.mark.parametrize(
    "build",
    [
        lambda: BlacklistEntry("2026-000124", MOVED.date(), 0, OLD),  # container without the time
        lambda: BlacklistEntry("2026-000124", MOVED.date() + timedelta(days=1), 0, OLD, MOVED),
        lambda: BlacklistEntry.moved_away("2026-000124", OLD, MOVED.replace(microsecond=5)),
        lambda: BlacklistEntry.moved_away("2026-000124", "TL1-XYZ", MOVED),
        lambda: Blacklist(MOVED, 1, containers=(BlacklistEntry.moved_away(LID, OLD, MOVED),)),
        lambda: Blacklist(MOVED, 1, serials=(BlacklistEntry.moved_away("x", OLD, MOVED),) * 2),
    ],
)
def test_inconsistent_entries_cannot_be_built(build: object) -> None:
    with pytest.raises(ValueError):
        build()  # type: ignore[operator]


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


moved_entries = st.builds(BlacklistEntry.moved_away, serials, locking_ids(), timestamps, st.integers(0, 3650))
day_entries = st.builds(
    BlacklistEntry, serials, st.dates(min_value=date(2000, 1, 1), max_value=date(2199, 12, 31)),
    st.integers(0, 3650),
)  # fmt: skip


@given(
    st.lists(day_entries, max_size=4, unique_by=lambda e: e.subject),
    st.lists(moved_entries, max_size=5, unique_by=lambda e: (e.subject, e.locking_id, e.moved)),
    st.integers(1, 10**6),
)
def test_any_list_with_container_scoped_entries_round_trips(
    days: list[BlacklistEntry], moved: list[BlacklistEntry], sequence: int
) -> None:
    bl = Blacklist(datetime(2026, 1, 1, tzinfo=UTC), sequence, serials=(*days, *moved))
    text = sign_blacklist(bl, VENDOR)
    assert text.startswith(f"[BLACKLIST]\nformat = tessera/{2 if moved else 1}\n")
    assert parse_blacklist(text).verify(KEYRING) == bl


@given(st.data())
def test_line_edits_of_a_tessera_2_file_are_format_or_signature_errors(data: st.DataObject) -> None:
    lines = sign_blacklist(sample_2(), VENDOR).split("\n")
    i = data.draw(st.integers(0, len(lines) - 1))
    edit = data.draw(st.sampled_from(["replace", "splice", "drop"]))
    if edit == "drop":
        del lines[i]
    elif edit == "replace":
        lines[i] = data.draw(st.text(max_size=80))
    else:  # a plausible field, spliced into a plausible line
        parts = lines[i].split(", ")
        j = data.draw(st.integers(0, len(parts)))
        parts.insert(
            j, data.draw(st.sampled_from(["0", "07", OLD, "2026-11-21", "2026-11-21T00:00:00Z", ""]))
        )
        lines[i] = ", ".join(parts)
    with contextlib.suppress(FormatError, SignatureError):
        got = parse_blacklist("\n".join(lines)).verify(KEYRING)
        assert got == sample_2()  # only an edit that changed nothing gets through
