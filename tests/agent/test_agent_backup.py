"""Backups with license (this installation only) and without (portable), seed 001's migration."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_support import OTHER_LOCKING_ID, FakeServer, make_license

from tessera.agent import Agent, AgentState, BackupError, StateError
from tessera.core import SigningKey
from tessera.core.errors import VerificationError


def test_backup_with_license_restores_here_only(
    open_agent: Callable[..., Agent], vendor: SigningKey, tmp_path: Path
) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, connect=False))
    agent.assign("uniplex", "alice")
    backup = agent.backup(with_license=True)
    assert b"alice" not in backup and b"uniplex" not in backup  # encrypted
    agent.unassign("uniplex", "alice")
    agent.import_license(make_license(vendor, {"other": (1, None)}, serial="2026-000002", connect=False))
    status = agent.restore(backup)
    assert status.state is AgentState.NORMAL and agent.check("uniplex")
    assert agent.seats()["uniplex"].subjects == ("alice",)

    elsewhere = open_agent(tmp_path / "elsewhere")
    with pytest.raises(BackupError, match="another installation"):
        elsewhere.restore(backup)
    assert elsewhere.status().state is AgentState.UNLICENSED


def test_backup_keeps_the_agent_key(activated: Agent, server: FakeServer) -> None:
    backup = activated.backup(with_license=True)
    activated.restore(backup)
    assert activated.connect().state is AgentState.NORMAL  # same agent key as registered


def test_seed_001_migration(open_agent: Callable[..., Agent], vendor: SigningKey, tmp_path: Path) -> None:
    old = open_agent(tmp_path / "old")
    old.import_license(make_license(vendor, {"uniplex": (5, None), "backup": (2, None)}))
    for feature, who in (("uniplex", "alice"), ("uniplex", "bob"), ("backup", "if-backup-1")):
        old.assign(feature, who)
    portable = old.backup(with_license=False)
    assert b"BEGIN" not in portable and b"[LICENSE]" not in portable
    before = {code: s.subjects for code, s in old.seats().items()}

    new = open_agent(tmp_path / "new", locking_id=OTHER_LOCKING_ID)
    new.restore(portable)
    assert new.status().state is AgentState.UNLICENSED
    new.import_license(
        make_license(
            vendor,
            {"uniplex": (5, None), "backup": (2, None)},
            serial="2026-000002",
            locking_id=OTHER_LOCKING_ID,
        )
    )
    assert {code: s.subjects for code, s in new.seats().items()} == before
    assert new.holds("uniplex", "alice") and new.holds("backup", "if-backup-1")


@pytest.mark.parametrize("data", [b"", b"{}", b"[1]", b'{"format": "tessera-agent-backup/1"}'])
def test_bad_backup_files(open_agent: Callable[..., Agent], data: bytes) -> None:
    with pytest.raises(BackupError):
        open_agent().restore(data)


def test_restore_after_losing_state_db_keeps_the_system_id(
    open_agent: Callable[..., Agent], server: FakeServer
) -> None:
    agent = open_agent()
    agent.activate("https://license.example", "K7QXM-2VDRT-9HFNA-PC4WE-8BZJY")
    system_id = agent.system_id
    backup = agent.backup(with_license=True)
    state_dir = agent.state_dir
    agent.close()
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (state_dir / name).unlink(missing_ok=True)
    with pytest.raises(StateError, match="restore a --with-license backup"):
        open_agent(state_dir)
    assert not (state_dir / "state.db").exists()  # nothing created
    restored = open_agent(state_dir, restoring=True)
    restored.restore(backup)
    assert restored.system_id == system_id
    assert restored.connect().state is AgentState.NORMAL
    assert server.bodies[-1]["system_id"] == system_id


def test_restore_keeps_a_lock_in_force(activated: Agent, server: FakeServer) -> None:
    backup = activated.backup(with_license=True)
    server.directives = ("lock",)
    assert activated.connect().state is AgentState.LOCKED
    assert activated.restore(backup).state is AgentState.LOCKED
    assert not activated.check("uniplex")


def test_restore_keeps_a_newer_revision(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, {"uniplex": (5, None)}, revision=2, connect=False))
    agent.assign("uniplex", "alice")
    backup = agent.backup(with_license=True)
    agent.import_license(make_license(vendor, {"uniplex": (1, None)}, revision=3, connect=False))
    agent.unassign("uniplex", "alice")
    status = agent.restore(backup)
    assert status.state is AgentState.NORMAL and status.features["uniplex"].count == 1
    assert agent.seats()["uniplex"].subjects == ("alice",)  # the rest of the backup is back
    with pytest.raises(VerificationError, match="older than the one in force"):
        agent.import_license(make_license(vendor, {"uniplex": (5, None)}, revision=2, connect=False))


def test_restore_keeps_a_revoked_license_revoked(activated: Agent, server: FakeServer) -> None:
    backup = activated.backup(with_license=True)
    server.directives = ("revoke",)
    assert activated.connect().state is AgentState.UNLICENSED
    status = activated.restore(backup)
    assert status.state is AgentState.UNLICENSED and "revoked" in status.message
    assert not activated.check("uniplex")


def test_an_empty_state_db_is_lost_state_not_a_new_installation(
    open_agent: Callable[..., Agent], vendor: SigningKey
) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, connect=False))
    portable = agent.backup(with_license=False)
    state_dir = agent.state_dir
    agent.close()
    for name in ("state.db-wal", "state.db-shm"):
        (state_dir / name).unlink(missing_ok=True)
    (state_dir / "state.db").write_bytes(b"")
    with pytest.raises(StateError, match=r"state\.db is missing or empty"):
        open_agent(state_dir)
    waiting = open_agent(state_dir, restoring=True)
    with pytest.raises(BackupError, match="only a --with-license backup"):
        waiting.restore(portable)
    waiting.close()
    with pytest.raises(StateError, match="missing or empty"):  # still lost, not fresh
        open_agent(state_dir)


@pytest.mark.parametrize(
    ("settings", "seat", "field"),
    [
        ({"server_url": "http://license.example"}, {}, "server_url"),
        ({"server_url": 123}, {}, "server_url"),
        ({"server_url": "https://"}, {}, "server_url"),
        ({"server_ca": "garbage"}, {}, "server_ca"),
        ({"server_ca": 123}, {}, "server_ca"),
        ({"server_ca": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}, {}, "server_ca"),
        ({}, {"assigned_at": "notadate"}, "assigned_at"),
        ({}, {"assigned_at": 5}, "assigned_at"),
    ],
)
def test_portable_restore_checks_settings_and_seats(
    open_agent: Callable[..., Agent], settings: dict[str, object], seat: dict[str, object], field: str
) -> None:
    agent = open_agent()
    doc = {
        "format": "tessera-agent-backup/1",
        "kind": "without-license",
        "product": "cortex",
        "settings": settings,
        "seats": [{"feature": "uniplex", "subject": "alice", **seat}],
    }
    with pytest.raises(BackupError, match=field):
        agent.restore(json.dumps(doc).encode())
    assert agent.seats() == {} and agent.backup(with_license=False).count(b"server") == 0


def test_portable_restore_keeps_valid_settings(open_agent: Callable[..., Agent], tmp_path: Path) -> None:
    from agent_support import make_tls

    ca_pem, _cert, _key = make_tls(tmp_path)
    settings = {"server_url": "https://license.example:7790", "server_ca": ca_pem.decode()}
    doc = {"format": "tessera-agent-backup/1", "kind": "without-license", "product": "cortex"}
    agent = open_agent(tmp_path / "new")
    agent.restore(json.dumps({**doc, "settings": settings, "seats": []}).encode())
    assert json.loads(agent.backup(with_license=False))["settings"] == settings
