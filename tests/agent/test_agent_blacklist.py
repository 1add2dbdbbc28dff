"""The vendor's signed blacklist file: enforced after its delay, never rolled back."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import pytest
from agent_support import (
    LOCKING_ID,
    MACHINE_FACTS,
    OTHER_LOCKING_ID,
    PRODUCT,
    START,
    make_license,
)

from tessera.agent import Agent, AgentState, StaleBlacklist
from tessera.core import SigningKey, locking_id_for
from tessera.core.blacklist import Blacklist, BlacklistEntry, sign_blacklist
from tessera.core.clock import ManualClock
from tessera.core.errors import FormatError, SignatureError, UnknownKeyError


def _blacklist(
    vendor: SigningKey,
    sequence: int,
    *,
    containers: tuple[BlacklistEntry, ...] = (),
    serials: tuple[BlacklistEntry, ...] = (),
) -> str:
    return sign_blacklist(Blacklist(START, sequence, containers, serials), vendor)


def test_a_listed_container_is_locked_after_the_delay(
    open_agent: Callable[..., Agent], vendor: SigningKey, clock: ManualClock
) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, connect=False))
    listed = _blacklist(vendor, 3, containers=(BlacklistEntry(LOCKING_ID, START.date(), 14),))
    assert agent.import_blacklist(listed) == 3
    assert agent.status().state is AgentState.NORMAL and agent.check("uniplex")
    clock.advance(timedelta(days=13))
    assert agent.reload().state is AgentState.NORMAL
    clock.advance(timedelta(days=1))
    status = agent.reload()
    assert status.state is AgentState.LOCKED and "blacklisted" in (status.message or "")
    assert not agent.check("uniplex")
    # A fresh process on the same state keeps it locked; re-importing a license does not help.
    again = open_agent()
    assert again.status().state is AgentState.LOCKED


def test_a_clock_set_back_does_not_postpone_the_lock(
    open_agent: Callable[..., Agent], vendor: SigningKey, clock: ManualClock
) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, connect=False))
    clock.advance(timedelta(days=10))
    agent.reload()  # the high-water mark is now day 10
    agent.import_blacklist(_blacklist(vendor, 1, containers=(BlacklistEntry(LOCKING_ID, START.date(), 5),)))
    clock.set(START)
    assert agent.reload().state is AgentState.LOCKED


def test_other_containers_and_new_copies_are_untouched(
    open_agent: Callable[..., Agent], vendor: SigningKey
) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, connect=False))
    listed = _blacklist(
        vendor,
        1,
        containers=(BlacklistEntry(OTHER_LOCKING_ID, START.date(), 0),),
        # recovered on the day the file was issued: this copy (issued that day) is the new one
        serials=(BlacklistEntry("2026-000001", START.date(), 0),),
    )
    agent.import_blacklist(listed)
    assert agent.status().state is AgentState.NORMAL


def test_a_recovered_license_is_withdrawn_but_the_container_is_not_locked(
    open_agent: Callable[..., Agent], vendor: SigningKey, clock: ManualClock
) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, connect=False))
    recovered_on = START.date() + timedelta(days=1)
    agent.import_blacklist(_blacklist(vendor, 1, serials=(BlacklistEntry("2026-000001", recovered_on, 0),)))
    clock.advance(timedelta(days=1))  # the file is issued after the recovery day
    status = agent.reload()
    assert status.state is AgentState.UNLICENSED and "recovered" in (status.message or "")


def _moved_away(locking_id: str, moved: datetime, delay_days: int = 0) -> BlacklistEntry:
    return BlacklistEntry.moved_away("2026-000001", locking_id, moved, delay_days)


def test_a_copy_the_old_container_got_on_the_day_of_the_move_is_withdrawn(
    open_agent: Callable[..., Agent], vendor: SigningKey, clock: ManualClock
) -> None:
    """Activated (or updated at a check-in) in the morning, moved away in the afternoon:
    a day-grain entry (issued before the day of the move) let this machine keep working."""
    agent = open_agent()
    agent.import_license(make_license(vendor, connect=False))  # issued 10:00
    moved = START + timedelta(hours=5)
    clock.set(moved + timedelta(hours=1))
    listed = _blacklist(vendor, 1, serials=(_moved_away(LOCKING_ID, moved),))
    assert listed.startswith("[BLACKLIST]\nformat = tessera/2\n")
    agent.import_blacklist(listed)
    status = agent.status()
    assert status.state is AgentState.UNLICENSED and "recovered" in (status.message or "")
    assert not agent.check("uniplex")


def test_the_delay_of_a_container_scoped_entry_counts_in_days_of_trusted_time(
    open_agent: Callable[..., Agent], vendor: SigningKey, clock: ManualClock
) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, connect=False))
    moved = START + timedelta(hours=13)  # 23:00 on the 22nd: enforced from the 24th
    clock.set(moved)
    agent.import_blacklist(_blacklist(vendor, 1, serials=(_moved_away(LOCKING_ID, moved, 2),)))
    clock.set(datetime(2026, 11, 23, 23, 59, 59, tzinfo=UTC))
    assert agent.reload().state is AgentState.NORMAL
    clock.set(datetime(2026, 11, 24, 2, tzinfo=UTC))
    assert agent.reload().state is AgentState.UNLICENSED
    clock.set(datetime(2026, 11, 23, 12, tzinfo=UTC))  # back by 14 hours: within tolerance
    assert agent.reload().state is AgentState.UNLICENSED  # trusted time is still the 24th


def test_another_seats_copy_of_a_moved_license_keeps_working(
    open_agent: Callable[..., Agent], vendor: SigningKey, clock: ManualClock
) -> None:
    """A multi-seat license, one seat moved with "revoke only": this machine's copy, issued
    days before, is no copy of the container that seat left."""
    agent = open_agent()
    agent.import_license(make_license(vendor, connect=False))
    moved = START + timedelta(days=3)
    clock.set(moved)
    agent.import_blacklist(_blacklist(vendor, 1, serials=(_moved_away(OTHER_LOCKING_ID, moved),)))
    clock.advance(timedelta(days=30))
    assert agent.reload().state is AgentState.NORMAL and agent.check("uniplex")


def test_the_new_containers_copy_is_untouched_even_if_its_hardware_matches_the_old_one(
    open_agent: Callable[..., Agent], vendor: SigningKey, clock: ManualClock
) -> None:
    """Support moved the license from this machine as it was before a disk swap (the two
    Locking IDs match at medium): the new copy is issued in the second of the move."""
    facts = [(k, "disk-serial-2" if k == "d" else v) for k, v in MACHINE_FACTS]
    old_container = str(locking_id_for(facts, PRODUCT))
    agent = open_agent()
    agent.import_license(make_license(vendor, connect=False))  # the new copy, issued at START
    agent.import_blacklist(_blacklist(vendor, 1, serials=(_moved_away(old_container, START),)))
    assert agent.status().state is AgentState.NORMAL
    # ... while an older copy bound to the old Locking ID, kept in a backup, is withdrawn.
    agent.import_license(make_license(vendor, connect=False, issued=START - timedelta(hours=1)))
    assert agent.status().state is AgentState.UNLICENSED


def test_a_copy_issued_after_the_move_back_to_the_old_container_is_untouched(
    open_agent: Callable[..., Agent], vendor: SigningKey, clock: ManualClock
) -> None:
    agent = open_agent()
    clock.set(START + timedelta(days=2))
    agent.import_license(make_license(vendor, connect=False, issued=START + timedelta(days=1)))
    agent.import_blacklist(_blacklist(vendor, 1, serials=(_moved_away(LOCKING_ID, START),)))
    assert agent.status().state is AgentState.NORMAL


def test_forged_altered_and_replayed_files_are_refused_and_change_nothing(
    open_agent: Callable[..., Agent], vendor: SigningKey
) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, connect=False))
    entry = BlacklistEntry(LOCKING_ID, date(2026, 11, 22), 0)
    with pytest.raises(UnknownKeyError):
        agent.import_blacklist(_blacklist(SigningKey.generate(), 9, containers=(entry,)))
    genuine = _blacklist(vendor, 5)
    altered = genuine.replace("[CONTAINERS]\n", f"[CONTAINERS]\n{LOCKING_ID} = 2026-11-22, 0\n")
    with pytest.raises(SignatureError):
        agent.import_blacklist(altered)
    with pytest.raises(FormatError):
        agent.import_blacklist("[BLACKLIST]\nformat = nonsense\n")
    assert agent.import_blacklist(genuine) == 5
    assert agent.import_blacklist(genuine) == 5  # the same file again is fine
    with pytest.raises(StaleBlacklist, match="older"):
        agent.import_blacklist(_blacklist(vendor, 4, containers=(entry,)))
    with pytest.raises(StaleBlacklist, match="same sequence"):
        agent.import_blacklist(_blacklist(vendor, 5, containers=(entry,)))
    assert agent.status().state is AgentState.NORMAL


def test_the_list_shipped_with_the_product_is_an_agent_option(
    open_agent: Callable[..., Agent], vendor: SigningKey, tmp_path: object
) -> None:
    first = open_agent()
    first.import_license(make_license(vendor, connect=False))
    first.import_blacklist(_blacklist(vendor, 7))
    first.close()
    listed = _blacklist(vendor, 6, containers=(BlacklistEntry(LOCKING_ID, START.date(), 0),))
    older = open_agent(blacklist=listed)  # an older shipped list does not replace a newer one
    assert older.status().state is AgentState.NORMAL
    older.close()
    newer = _blacklist(vendor, 8, containers=(BlacklistEntry(LOCKING_ID, START.date(), 0),))
    assert open_agent(blacklist=newer).status().state is AgentState.LOCKED


def test_a_listed_container_whose_hardware_drifted_a_little_is_still_caught(
    open_agent: Callable[..., Agent], vendor: SigningKey
) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, connect=False))
    facts = [(k, "disk-serial-2" if k == "d" else v) for k, v in MACHINE_FACTS]
    listed_as = str(locking_id_for(facts, PRODUCT))  # as listed, before its disk was replaced
    assert listed_as != LOCKING_ID
    agent.import_blacklist(_blacklist(vendor, 1, containers=(BlacklistEntry(listed_as, START.date(), 0),)))
    assert agent.status().state is AgentState.LOCKED


def test_restoring_an_older_backup_keeps_the_newer_blacklist(
    open_agent: Callable[..., Agent], vendor: SigningKey
) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, connect=False))
    agent.import_blacklist(_blacklist(vendor, 1))
    backup = agent.backup(with_license=True)
    agent.import_blacklist(_blacklist(vendor, 2, containers=(BlacklistEntry(LOCKING_ID, START.date(), 0),)))
    assert agent.status().state is AgentState.LOCKED
    assert agent.restore(backup).state is AgentState.LOCKED
    with pytest.raises(StaleBlacklist):
        agent.import_blacklist(_blacklist(vendor, 1))
