"""checkpoint.overdue: a machine of a checkpoint license that stopped checking in is reported
once per lapse, on every backend."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from tessera.server import activation, checkpoints, webhooks
from tessera.server.app import ServerState
from tessera.server.checkpoints import sweep
from tessera.server.models import LicenseRow, WebhookDelivery
from tessera.server.tokens import Principal

from .conftest import START
from .helpers import agent, setup_license


def _overdue_events(state: ServerState) -> list[dict[str, object]]:
    with state.db.read() as session:
        rows = session.execute(
            select(WebhookDelivery.payload).where(WebhookDelivery.event == "checkpoint.overdue")
        ).scalars()
        return [json.loads(p)["data"] for p in rows]


def test_overdue_once_per_lapse_and_cleared_by_a_checkin(state: ServerState, admin: Principal) -> None:
    with state.db.write() as session:
        webhooks.add_endpoint(
            session,
            url="http://127.0.0.1:9/hook",
            secret=None,
            events=[],
            ca_pem=None,
            pepper=state.pepper,
            now=START,
        )
    serial, key = setup_license(state, admin, START, checkpoint_days=2)
    plain_serial, plain_key = setup_license(state, admin, START)
    a, b = agent(1), agent(2)
    with state.db.write() as session:
        activation.activate(session, a.activation(key), START, state.signing_key, state.pepper)
        activation.activate(session, b.activation(plain_key), START, state.signing_key, state.pepper)

    assert sweep(state.db, START + timedelta(days=1)) == 0  # within the checkpoint
    assert sweep(state.db, START + timedelta(days=3)) == 1
    assert sweep(state.db, START + timedelta(days=4)) == 0  # once per lapse
    events = _overdue_events(state)
    assert [e["serial"] for e in events] == [serial]
    assert events[0]["locking_id"] == a.locking_id and events[0]["checkpoint_days"] == 2

    # A check-in renews the checkpoint and re-arms the notice.
    with state.db.write() as session:
        activation.checkin(
            session, a.checkin(key), START + timedelta(days=4), state.signing_key, state.pepper
        )
    assert sweep(state.db, START + timedelta(days=5)) == 0
    assert sweep(state.db, START + timedelta(days=7)) == 1
    assert len(_overdue_events(state)) == 2
    assert plain_serial not in {e["serial"] for e in _overdue_events(state)}


def test_machines_not_yet_due_never_hide_the_due_ones(
    state: ServerState, admin: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints, "BATCH", 1)  # one machine a page
    _, patient_key = setup_license(state, admin, START, checkpoint_days=30)
    _, due_key = setup_license(state, admin, START, checkpoint_days=2)
    with state.db.write() as session:
        for n, key in ((1, patient_key), (2, due_key)):
            activation.activate(session, agent(n).activation(key), START, state.signing_key, state.pepper)
    assert sweep(state.db, START + timedelta(days=3)) == 1


def test_licenses_without_connect_are_never_overdue(state: ServerState, admin: Principal) -> None:
    """A license with connect off never checks in, so a checkpoint on it (issue and update
    refuse the pair now; rows made before remain) can never be met: the sweep skips it."""
    serial, key = setup_license(state, admin, START, checkpoint_days=2)
    with state.db.write() as session:
        activation.activate(session, agent(1).activation(key), START, state.signing_key, state.pepper)
        session.execute(update(LicenseRow).where(LicenseRow.serial == serial).values(connect=False))
    assert sweep(state.db, START + timedelta(days=3)) == 0
    assert _overdue_events(state) == []
