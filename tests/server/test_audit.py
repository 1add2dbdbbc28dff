"""The audit log: every license change lands in it, and tampering is detected."""

from __future__ import annotations

import json

from sqlalchemy import delete, select, update

from tessera.server import audit, licenses
from tessera.server.app import ServerState
from tessera.server.models import AuditEntry
from tessera.server.schemas import LicenseUpdate
from tessera.server.tokens import Principal

from .conftest import START
from .helpers import setup_license


def _history(state: ServerState, admin: Principal) -> str:
    serial, _ = setup_license(state, admin, START)
    for count in (6, 7, 8):
        with state.db.write() as session:
            licenses.update_license(
                session,
                admin,
                serial,
                LicenseUpdate.model_validate({"entitlements": [{"feature": "uniplex", "count": count}]}),
                START,
            )
    return serial


def test_every_change_is_logged_with_who_what_when(state: ServerState, admin: Principal) -> None:
    serial = _history(state, admin)
    with state.db.read() as session:
        entries = session.execute(select(AuditEntry).order_by(AuditEntry.id)).scalars().all()
        report = audit.verify_chain(session)
        assert [e.action for e in entries] == ["license.issue"] + ["license.update"] * 3
        assert all(e.actor == "admin:test-admin" and e.target == serial for e in entries)
        changes = json.loads(entries[-1].details)["changes"]
        assert changes == {
            "locations": {
                "from": {
                    "main": {
                        "backup": {"count": 1, "expiry": "permanent"},
                        "uniplex": {"count": 7, "expiry": "permanent"},
                    }
                },
                "to": {
                    "main": {
                        "backup": {"count": 1, "expiry": "permanent"},
                        "uniplex": {"count": 8, "expiry": "permanent"},
                    }
                },
            }
        }
        assert report.ok and report.rows == 4 and report.head == entries[-1].hash


def test_a_no_op_update_is_not_a_change(state: ServerState, admin: Principal) -> None:
    serial, _ = setup_license(state, admin, START)
    with state.db.write() as session:
        row = licenses.update_license(session, admin, serial, LicenseUpdate(), START)
        assert row.revision == 1
    with state.db.read() as session:
        assert audit.verify_chain(session).rows == 1


def test_an_edited_row_is_detected(state: ServerState, admin: Principal) -> None:
    _history(state, admin)
    with state.db.write() as session:
        second = session.execute(
            select(AuditEntry.id).order_by(AuditEntry.id).offset(1).limit(1)
        ).scalar_one()
        session.execute(update(AuditEntry).where(AuditEntry.id == second).values(actor="admin:someone-else"))
    with state.db.read() as session:
        report = audit.verify_chain(session)
    assert not report.ok
    assert report.problems == [f"entry {second}: content does not match its hash (row edited)"]


def test_an_edited_row_with_a_recomputed_hash_is_detected(state: ServerState, admin: Principal) -> None:
    _history(state, admin)
    with state.db.write() as session:
        entry = session.execute(select(AuditEntry).order_by(AuditEntry.id).offset(1).limit(1)).scalar_one()
        entry.details = '{"forged":true}'
        entry.hash = audit.entry_hash(
            entry.prev_hash, entry.at, entry.actor, entry.action, entry.target, entry.details
        )
        edited = entry.id
    with state.db.read() as session:
        report = audit.verify_chain(session)
    assert not report.ok
    assert any("link to the previous entry is broken" in p for p in report.problems)
    assert all(str(edited) not in p for p in report.problems if "edited" in p)


def test_a_removed_row_is_detected(state: ServerState, admin: Principal) -> None:
    _history(state, admin)
    with state.db.write() as session:
        ids = session.execute(select(AuditEntry.id).order_by(AuditEntry.id)).scalars().all()
        session.execute(delete(AuditEntry).where(AuditEntry.id == ids[1]))
    with state.db.read() as session:
        report = audit.verify_chain(session)
    assert not report.ok
    assert report.problems == [f"entry {ids[2]}: link to the previous entry is broken (row removed?)"]
