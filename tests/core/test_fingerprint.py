from __future__ import annotations

import base64
import binascii
import contextlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.core.fingerprint import (
    LicensedMachine,
    LockingId,
    _b32decode,
    collect_facts,
    locking_id_for,
    match_locking_ids,
)
from tessera.core.model import MatchLevel

from .strategies import machine_pairs

MAC1 = "52:54:00:12:34:56".replace("52", "00", 1)
MAC2 = "00:1b:21:aa:bb:cc"


def fake_machine(
    root: Path,
    *,
    machine_id: str | None = "4c4c4544004d3510804bb4c04f564d32",
    uuid: str | None = "4C4C4544-004D-3510-804B-B4C04F564D32",
    board: str | None = "MB-123456",
    macs: dict[str, str] | None = None,
    disks: dict[str, str] | None = None,
    cpu: str | None = "Intel(R) Xeon(R) CPU E5-2680",
    hostname: str | None = "srv01",
) -> Path:
    def write(rel: str, text: str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")

    if machine_id:
        write("etc/machine-id", machine_id)
    if uuid:
        write("sys/class/dmi/id/product_uuid", uuid)
    if board:
        write("sys/class/dmi/id/board_serial", board)
    for name, mac in (macs if macs is not None else {"eth0": MAC1, "eth1": MAC2}).items():
        write(f"sys/class/net/{name}/address", mac)
    for name, serial in (disks if disks is not None else {"sda": "WD-WCC4N0123456"}).items():
        write(f"sys/block/{name}/device/serial", serial)
    if cpu:
        write("proc/cpuinfo", f"processor\t: 0\nmodel name\t: {cpu}\nprocessor\t: 1\nmodel name\t: {cpu}")
    if hostname:
        write("etc/hostname", hostname)
    return root


def lid(root: Path, product: str = "cortex") -> LockingId:
    return locking_id_for(collect_facts(str(root)), product)


def test_all_sources_become_components(tmp_path: Path) -> None:
    facts = collect_facts(str(fake_machine(tmp_path)))
    assert sorted({k for k, _ in facts}) == ["b", "c", "d", "h", "m", "n", "u"]
    assert len([k for k, _ in facts if k == "n"]) == 2


def test_no_raw_value_appears_in_the_locking_id(tmp_path: Path) -> None:
    text = str(lid(fake_machine(tmp_path)))
    assert text.startswith("TL1-")
    for raw in ("srv01", "MB-123456", "WD-WCC4N0123456", "4C4C4544"):
        assert raw.lower() not in text.lower()


def test_salt_differs_per_product(tmp_path: Path) -> None:
    root = fake_machine(tmp_path)
    assert str(lid(root, "cortex")) != str(lid(root, "other"))
    assert not match_locking_ids(lid(root, "cortex"), lid(root, "other")).ok


def test_parse_round_trip(tmp_path: Path) -> None:
    value = lid(fake_machine(tmp_path))
    assert LockingId.parse(str(value)) == value


def test_one_replaced_nic_still_matches_medium(tmp_path: Path) -> None:
    before = lid(fake_machine(tmp_path / "a"))
    after = lid(fake_machine(tmp_path / "b", macs={"eth0": "00:1b:21:ff:ff:ff", "eth1": MAC2}))
    assert str(before) != str(after)
    assert match_locking_ids(before, after, MatchLevel.MEDIUM).ok
    assert not match_locking_ids(before, after, MatchLevel.STRICT).ok


def test_one_replaced_disk_still_matches_medium(tmp_path: Path) -> None:
    before = lid(fake_machine(tmp_path / "a"))
    after = lid(fake_machine(tmp_path / "b", disks={"sda": "NEWDISK-1"}))
    assert match_locking_ids(before, after).ok


def test_new_mainboard_does_not_match(tmp_path: Path) -> None:
    before = lid(fake_machine(tmp_path / "a"))
    after = lid(
        fake_machine(
            tmp_path / "b",
            machine_id="ffffeeee004d3510804bb4c04f564d32",
            uuid="11111111-2222-3333-4444-555555555555",
            board="MB-999",
            macs={"eth0": "00:aa:bb:cc:dd:ee"},
        )
    )
    result = match_locking_ids(before, after)
    assert not result.ok
    assert "does not match" in str(result)
    assert match_locking_ids(before, after, MatchLevel.LOOSE).ok is False


def test_container_with_few_sources_works(tmp_path: Path) -> None:
    root = fake_machine(
        tmp_path, uuid=None, board=None, macs={"eth0": "02:42:ac:11:00:02"}, disks={}, machine_id=None
    )
    facts = collect_facts(str(root))
    assert {k for k, _ in facts} == {"c", "h"}  # locally administered MAC ignored
    value = locking_id_for(facts, "cortex")
    assert match_locking_ids(value, value, MatchLevel.STRICT).ok


def test_empty_root_never_crashes(tmp_path: Path) -> None:
    assert collect_facts(str(tmp_path)) == []
    assert len(locking_id_for([], "cortex").components) == 1  # hostname fallback


def test_unreadable_sources_are_skipped(tmp_path: Path) -> None:
    root = fake_machine(tmp_path)
    (root / "sys/class/dmi/id/product_uuid").unlink()
    (root / "sys/class/dmi/id/product_uuid").mkdir()  # reading a directory fails
    assert "u" not in {k for k, _ in collect_facts(str(root))}


def test_placeholder_values_are_ignored(tmp_path: Path) -> None:
    root = fake_machine(tmp_path, board="To be filled by O.E.M.", uuid="00000000-0000-0000-0000-000000000000")
    kinds = {k for k, _ in collect_facts(str(root))}
    assert "b" not in kinds and "u" not in kinds


def test_this_machine_has_a_stable_locking_id() -> None:
    assert str(locking_id_for(collect_facts(), "x")) == str(locking_id_for(collect_facts(), "x"))


@pytest.mark.parametrize("text", ["", "TL1-", "TL2-AAAAAAAA", "TL1-!!!!", "TL1-AAAAAAAAA", "x" * 500])
def test_malformed_locking_ids(text: str) -> None:
    with pytest.raises(ValueError):
        LockingId.parse(text)


@given(st.text(max_size=120))
def test_random_locking_id_text_never_crashes(text: str) -> None:
    with contextlib.suppress(ValueError):
        LockingId.parse("TL1-" + text)


@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ234567a1=", max_size=48))
def test_fast_base32_accepts_exactly_what_the_standard_library_spells_so(body: str) -> None:
    """The parser's own base32 decoder against ``base64``: same bytes for every canonical
    spelling, and a refusal (bad characters or not canonical) for everything else."""
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
        expected: bytes | None = raw if base64.b32encode(raw).decode().rstrip("=") == body else None
    except (binascii.Error, ValueError):
        expected = None
    try:
        decoded, canonical = _b32decode(body)
        got = decoded if canonical else None
    except ValueError:
        got = None
    assert got == expected


@given(st.one_of(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ234567 ", max_size=60), st.text(max_size=60)))
def test_check_accepts_exactly_what_parse_accepts(body: str) -> None:
    """``check`` (the server's per-request test) and ``parse`` never disagree on an ID."""
    for text in ("TL1-" + body, body):
        try:
            LockingId.parse(text)
            parsed = True
        except ValueError:
            parsed = False
        try:
            LockingId.check(text)
            checked = True
        except ValueError:
            checked = False
        assert checked == parsed


def test_check_accepts_real_locking_ids(tmp_path: Path) -> None:
    text = str(lid(fake_machine(tmp_path)))
    LockingId.check(text)
    LockingId.check(f" {text} ")  # parse strips too


@given(pair=machine_pairs(), level=st.sampled_from(list(MatchLevel)))
def test_a_prepared_licensed_machine_gives_match_locking_ids_verdicts(
    pair: tuple[LockingId, LockingId], level: MatchLevel
) -> None:
    """The server's slot scan matches through :class:`LicensedMachine`; it must never
    decide otherwise than :func:`match_locking_ids`."""
    licensed, current = pair
    assert (
        LicensedMachine(licensed).matches(current.keys, level)
        == match_locking_ids(licensed, current, level).ok
    )


def test_a_prepared_licensed_machine_at_each_level(tmp_path: Path) -> None:
    """One NIC replaced (a known case): medium and loose still match, strict does not; a
    wholly other machine matches at no level."""
    before = lid(fake_machine(tmp_path / "a"))
    after = lid(fake_machine(tmp_path / "b", macs={"eth0": "00:1b:21:ff:ff:ff", "eth1": MAC2}))
    other = lid(fake_machine(tmp_path / "c", machine_id="0" * 32, uuid=None, board="X", macs={}, disks={}))
    licensed = LicensedMachine(before)
    verdicts = {level: licensed.matches(after.keys, level) for level in MatchLevel}
    assert verdicts == {MatchLevel.STRICT: False, MatchLevel.MEDIUM: True, MatchLevel.LOOSE: True}
    assert licensed.matches(before.keys, MatchLevel.STRICT)
    assert not any(licensed.matches(other.keys, level) for level in MatchLevel)
