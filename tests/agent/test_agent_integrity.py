"""Broken (the machine changed) versus invalid (the stored file or state was altered)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_support import LICENSE_KEY, OTHER_LOCKING_ID, FakeServer, make_license

from tessera.agent import Agent, AgentState, BackupError, StateError
from tessera.agent.store import MARKER_NAME
from tessera.core import SigningKey


def _licensed(open_agent: Callable[..., Agent], vendor: SigningKey) -> Path:
    agent = open_agent()
    agent.import_license(make_license(vendor, connect=False))
    agent.assign("uniplex", "alice")
    agent.close()
    return agent.state_dir


def test_new_mainboard_is_broken(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    state_dir = _licensed(open_agent, vendor)
    agent = open_agent(state_dir, locking_id=OTHER_LOCKING_ID)
    status = agent.status()
    assert status.state is AgentState.BROKEN
    assert "rehost" in status.message and "locking-id" in status.message
    assert not agent.check("uniplex")
    assert status.to_json()["serial"] == "2026-000001"
    assert status.to_json()["licensee"] == "myCompany, City"


def test_one_replaced_nic_is_tolerated(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    from agent_support import MACHINE_FACTS, PRODUCT

    from tessera.core import locking_id_for

    state_dir = _licensed(open_agent, vendor)
    facts = [(k, "11:22:33:44:55:66" if k == "n" else v) for k, v in MACHINE_FACTS]
    agent = open_agent(state_dir, locking_id=str(locking_id_for(facts, PRODUCT)))
    assert agent.status().state is AgentState.NORMAL


def _edit(state_dir: Path, name: str, change: Callable[[str], str]) -> None:
    db = sqlite3.connect(state_dir / "state.db")
    (value,) = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    db.execute("UPDATE meta SET value = ? WHERE name = ?", (change(value), name))
    db.commit()
    db.close()


def test_edited_license_in_the_state_is_invalid(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    state_dir = _licensed(open_agent, vendor)
    _edit(state_dir, "license", lambda text: text.replace("uniplex = 5", "uniplex = 500"))
    status = open_agent(state_dir).status()
    assert status.state is AgentState.INVALID
    assert "altered" in status.message and "import" in status.message


def test_file_and_state_disagree_is_invalid(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    state_dir = _licensed(open_agent, vendor)
    other = make_license(vendor, {"uniplex": (50, None)}, serial="2026-000999", connect=False)
    _edit(state_dir, "license", lambda _text: other)  # a validly signed file swapped in
    assert open_agent(state_dir).status().state is AgentState.INVALID


def test_invalid_is_repaired_by_importing_the_original(
    open_agent: Callable[..., Agent], vendor: SigningKey
) -> None:
    state_dir = _licensed(open_agent, vendor)
    _edit(state_dir, "license", lambda text: text.replace("uniplex = 5", "uniplex = 500"))
    agent = open_agent(state_dir)
    assert agent.import_license(make_license(vendor, connect=False)).state is AgentState.NORMAL
    assert agent.seats()["uniplex"].subjects == ("alice",)


def test_product_mismatch_and_missing_secret(
    open_agent: Callable[..., Agent], vendor: SigningKey, tmp_path: Path, keyring: object
) -> None:
    state_dir = _licensed(open_agent, vendor)
    with pytest.raises(StateError, match="belongs to product"):
        Agent(state_dir, keyring, "other", "1.0", locking_id=OTHER_LOCKING_ID)  # type: ignore[arg-type]
    (state_dir / "installation.key").unlink()
    with pytest.raises(StateError, match="installation secret"):
        open_agent(state_dir)


def _sql(state_dir: Path, statement: str) -> None:
    db = sqlite3.connect(state_dir / "state.db")
    db.execute(statement)
    db.commit()
    db.close()


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM meta WHERE name = 'locked'",
        "UPDATE meta SET value = '2027-06-01T00:00:00Z' WHERE name = 'last_success'",
        "DELETE FROM meta WHERE name = 'state_mac'",
        "UPDATE meta SET value = '2099-01-01T00:00:00Z' WHERE name = 'installed_at'",
    ],
)
def test_edited_protected_state_is_invalid(
    activated: Agent, server: FakeServer, open_agent: Callable[..., Agent], statement: str
) -> None:
    server.directives = ("lock",)
    assert activated.connect().state is AgentState.LOCKED
    state_dir = activated.state_dir
    activated.close()
    _sql(state_dir, statement)
    agent = open_agent(state_dir)
    status = agent.status()
    assert status.state is AgentState.INVALID and "edited outside the agent" in status.message
    assert not agent.check("uniplex")
    agent.close()
    # Writing (the trusted-time mark, on open) does not launder the edit.
    assert open_agent(state_dir).status().state is AgentState.INVALID


def test_a_revision_that_disagrees_with_the_file_is_invalid(
    open_agent: Callable[..., Agent], vendor: SigningKey
) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, revision=2, connect=False))
    agent.close()
    _sql(agent.state_dir, "UPDATE meta SET value = '7' WHERE name = 'license_revision'")
    assert open_agent(agent.state_dir).status().state is AgentState.INVALID


def test_reactivation_repairs_an_edited_state(
    activated: Agent, server: FakeServer, open_agent: Callable[..., Agent]
) -> None:
    state_dir = activated.state_dir
    activated.close()
    _sql(state_dir, "UPDATE meta SET value = '2027-06-01T00:00:00Z' WHERE name = 'last_success'")
    agent = open_agent(state_dir)
    assert agent.status().state is AgentState.INVALID
    with pytest.raises(BackupError, match="edited outside the agent"):
        agent.restore(agent.backup(with_license=True))
    assert agent.activate("https://license.example", LICENSE_KEY).state is AgentState.NORMAL


def _as_before_the_seal(state_dir: Path, *, with_marker: bool = False) -> None:
    """What an agent older than the seal left: schema 1, no state_mac, and (unless
    ``with_marker``: the downgrade of a sealed state) no state.sealed beside the key."""
    _sql(state_dir, "DELETE FROM meta WHERE name = 'state_mac'")
    _sql(state_dir, "UPDATE meta SET value = '1' WHERE name = 'schema'")
    if not with_marker:
        (state_dir / MARKER_NAME).unlink()


def test_a_state_from_before_the_seal_is_sealed_on_first_open(
    open_agent: Callable[..., Agent], vendor: SigningKey
) -> None:
    state_dir = _licensed(open_agent, vendor)
    _as_before_the_seal(state_dir)
    agent = open_agent(state_dir)
    assert agent.status().state is AgentState.NORMAL
    agent.close()
    assert (state_dir / MARKER_NAME).exists()  # sealed now, and marked so
    _sql(state_dir, "UPDATE meta SET value = '2020-01-01T00:00:00Z' WHERE name = 'grace_start'")
    assert open_agent(state_dir).status().state is AgentState.INVALID


@pytest.mark.parametrize(
    "downgrade",
    [
        [],  # schema back to 1, state_mac deleted
        [
            "DELETE FROM meta WHERE name NOT IN ('schema', 'system_id')",
            "DELETE FROM seats",
            "UPDATE meta SET value = '2' WHERE name = 'schema'",
        ],  # "new"
    ],
    ids=["schema-1", "emptied"],
)
def test_a_sealed_state_made_to_look_older_or_new_is_not_sealed_again(
    activated: Agent, server: FakeServer, open_agent: Callable[..., Agent], downgrade: list[str]
) -> None:
    """Setting schema back to 1 and deleting state_mac got a locked state re-sealed as
    it was edited (and emptying the state got a new grace period): the marker beside the
    key says this installation was sealed before, so the edit stays visible."""
    server.directives = ("lock",)
    assert activated.connect().state is AgentState.LOCKED
    state_dir = activated.state_dir
    activated.close()
    assert (state_dir / MARKER_NAME).exists()
    _as_before_the_seal(state_dir, with_marker=True)
    _sql(state_dir, "DELETE FROM meta WHERE name = 'locked'")
    for statement in downgrade:
        _sql(state_dir, statement)
    for _ in range(2):  # opening (which writes) does not launder it either
        agent = open_agent(state_dir)
        status = agent.status()
        assert status.state is AgentState.INVALID and "edited outside the agent" in status.message
        assert not agent.check("uniplex")
        agent.close()


def test_a_state_sealed_before_the_marker_existed_gets_it_on_first_open(
    open_agent: Callable[..., Agent], vendor: SigningKey
) -> None:
    state_dir = _licensed(open_agent, vendor)
    (state_dir / MARKER_NAME).unlink()  # sealed (schema 2) by an agent that wrote no marker
    assert open_agent(state_dir).status().state is AgentState.NORMAL
    assert (state_dir / MARKER_NAME).exists()
    _as_before_the_seal(state_dir, with_marker=True)
    assert open_agent(state_dir).status().state is AgentState.INVALID


def test_a_marker_of_another_installation_key_counts_for_nothing(
    open_agent: Callable[..., Agent], vendor: SigningKey
) -> None:
    """A new installation in a directory where only the old marker was left behind."""
    state_dir = _licensed(open_agent, vendor)
    for name in ("state.db", "state.db-wal", "state.db-shm", "installation.key"):
        (state_dir / name).unlink(missing_ok=True)
    agent = open_agent(state_dir)
    assert agent.status().state is AgentState.UNLICENSED
    agent.import_license(make_license(vendor, connect=False))
    assert agent.status().state is AgentState.NORMAL
