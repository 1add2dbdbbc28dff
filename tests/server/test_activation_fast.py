"""The online activation path (:mod:`tessera.server.activations`) against the ORM path.

The ORM path (:func:`tessera.server.activation.activate`) is the reference: two databases
of one backend get the same catalog, the same licenses (same keys), the same blacklist and
the same requests at the same times; one answers through the ORM path, the other through
the :class:`~tessera.server.activations.ActivationWriter`. Every answer and refusal must
agree, and afterwards every row: machines, the whole audit chain (hash for hash),
blacklist hits, the webhook outbox (but for the random event ids).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import DBAPIError, OperationalError

from tessera.core.clock import ManualClock
from tessera.core.fingerprint import LockingId, match_locking_ids
from tessera.core.model import MatchLevel
from tessera.core.passwords import verify_secret
from tessera.core.protocol import MAX_MESSAGE_SIZE, ActivationRequest, ServerResponse, open_checkin_key
from tessera.core.sealing import unseal
from tessera.core.signing import Keyring, SigningKey
from tessera.core.verify import load_signed
from tessera.server import activation, activations, audit, licenses, recovery, webhooks
from tessera.server.activation import checkin_key_for, first_same_hardware, same_hardware
from tessera.server.app import ServerState
from tessera.server.errors import RecordedRefusal, ServiceError
from tessera.server.migrate import upgrade
from tessera.server.models import (
    AuditEntry,
    BlacklistHit,
    LicenseRow,
    Machine,
    WebhookDelivery,
)
from tessera.server.rawsql import Busy, RawTransaction, session_ended
from tessera.server.schemas import LicenseUpdate
from tessera.server.storage import Database
from tessera.server.tokens import Principal, Role, create_token

from ..core.crafted import mixed_order_activation
from ..core.strategies import machine_pairs
from .conftest import START, LiveServer, SchemaTemplates, migrated_database_url
from .helpers import FakeAgent, agent, setup_license

Outcome = tuple[str, Any]


@dataclass
class Side:
    """One database and how it activates."""

    state: ServerState
    admin: Principal
    activate: Callable[[ActivationRequest], bytes]
    keyring: Keyring
    keys: dict[str, str] = field(default_factory=dict)  # license name -> license key
    serials: dict[str, str] = field(default_factory=dict)  # license name -> serial


def _orm(state: ServerState) -> Callable[[ActivationRequest], bytes]:
    def run(request: ActivationRequest) -> bytes:
        with state.db.write() as session:
            return activation.activate(
                session, request, state.now(), state.signing_key, state.pepper
            ).to_json()

    return run


@pytest.fixture
def sides(
    database: Database, tmp_path: Path, schema_templates: SchemaTemplates, clock: ManualClock
) -> Iterator[tuple[Side, Side]]:
    """The ORM side on the test's database, the writer's side on a second (migrated)
    database of its backend."""
    backend = "sqlite" if database.engine.dialect.name == "sqlite" else "postgresql"
    signing_key, pepper = SigningKey.generate(), secrets.token_bytes(32)
    keyring = Keyring([signing_key.public])
    loop = asyncio.new_event_loop()
    writer: activations.ActivationWriter | None = None
    with migrated_database_url(backend, schema_templates, tmp_path / "tessera-fast.db") as other_url:
        other = Database(other_url)
        try:
            made = []
            for db in (database, other):
                state = ServerState(db=db, signing_key=signing_key, pepper=pepper, clock=clock)
                with db.write() as session:
                    row, _ = create_token(session, name="admin", role=Role.ADMIN, now=START)
                    admin = Principal(row.id, row.name, Role.ADMIN)
                made.append((state, admin))
            (orm_state, orm_admin), (fast_state, fast_admin) = made
            writer = activations.ActivationWriter(fast_state.db, signing_key, pepper)

            def fast(request: ActivationRequest) -> bytes:
                assert writer is not None
                return loop.run_until_complete(writer.activate(request, fast_state.now()))

            yield (
                Side(orm_state, orm_admin, _orm(orm_state), keyring),
                Side(fast_state, fast_admin, fast, keyring),
            )
        finally:
            if writer is not None:
                writer.stop()
            loop.close()
            other.dispose()


def _both(sides: tuple[Side, Side], work: Callable[[Side], Any]) -> None:
    for side in sides:
        work(side)


def _outcome(side: Side, request: ActivationRequest) -> Outcome:
    """What the agent sees, normalized where the answer is random by design."""
    try:
        raw = side.activate(request)
    except RecordedRefusal as refusal:
        with side.state.db.write() as session:  # as the app does once the refusal rolled back
            refusal.record(session)
        return _seen(side, request, refusal)
    except ServiceError as exc:
        return _seen(side, request, exc)
    return _seen(side, request, raw)


def _seen(side: Side, request: ActivationRequest, raw: bytes | BaseException) -> Outcome:
    """The agent's view of ``raw``, the response or the refusal it got."""
    if isinstance(raw, ServiceError):
        return ("refused", (raw.status, str(raw)))
    assert isinstance(raw, bytes), raw
    response = ServerResponse.from_json(raw, side.keyring, request.nonce)
    key = request.license_key
    assert response.checkin_key is not None
    agent = _AGENT_KEYS[request.agent_key]
    assert open_checkin_key(response.checkin_key, agent) == checkin_key_for(
        side.state.pepper, request.agent_key
    )
    lic = unseal(load_signed(response.license or "", side.keyring).document, key)
    identity = None
    if response.identity is not None:
        par = load_signed(response.identity, side.keyring).document
        assert verify_secret(key, par.admin_secret)  # type: ignore[union-attr]
        identity = dataclasses.replace(par, admin_secret="scrypt$1$1$1$AA$AA")  # salted: random
    return (
        "ok",
        (
            response.kind,
            response.serial,
            response.server_time,
            response.directives,
            response.message,
            lic,
            identity,
        ),
    )


_AGENT_KEYS: dict[str, SigningKey] = {}


def _facts(hardware: int, nic: int) -> list[tuple[str, str]]:
    return [("m", f"mid-{hardware}"), ("u", f"uuid-{hardware}"), ("n", f"nic-{hardware}-{nic}"), ("c", "cpu")]


def _locking_id(hardware: int, nic: int) -> str:
    return FakeAgent(f"hw{hardware}", "unused-system", facts=_facts(hardware, nic)).locking_id


def _request(
    key: str, hardware: int, install: int, nic: int, product: str | None, *, copied: bool = False
) -> ActivationRequest:
    """An installation on ``hardware``; ``copied``: its state directory came from another
    machine (the same system id on other hardware)."""
    system_id = f"inst-copy-{install}-xx" if copied else f"inst-{hardware}-{install}-xx"
    a = FakeAgent(f"hw{hardware}", system_id, facts=_facts(hardware, nic))
    _AGENT_KEYS[a.key.public.to_base64()] = a.key
    return ActivationRequest.create(key, a.locking_id, a.system_id, a.key, product=product)


def _rows(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    with db.read() as session:
        machines = session.execute(
            select(
                Machine.id, Machine.license_id, Machine.slot, Machine.locking_id, Machine.system_id,
                Machine.agent_key, Machine.activated_at, Machine.last_checkin_at,
                Machine.delivered_revision, Machine.offline, Machine.checkpoint_overdue_at,
            ).order_by(Machine.id)
        ).all()  # fmt: skip
        chain = session.execute(
            select(
                AuditEntry.id, AuditEntry.at, AuditEntry.actor, AuditEntry.action, AuditEntry.target,
                AuditEntry.details, AuditEntry.prev_hash, AuditEntry.hash,
            ).order_by(AuditEntry.id)
        ).all()  # fmt: skip
        hits = session.execute(
            select(
                BlacklistHit.id, BlacklistHit.at, BlacklistHit.locking_id, BlacklistHit.serial,
                BlacklistHit.how, BlacklistHit.action,
            ).order_by(BlacklistHit.id)
        ).all()  # fmt: skip
        outbox = session.execute(
            select(
                WebhookDelivery.id, WebhookDelivery.endpoint_id, WebhookDelivery.event,
                WebhookDelivery.payload, WebhookDelivery.created_at, WebhookDelivery.status,
                WebhookDelivery.attempts, WebhookDelivery.next_attempt_at,
            ).order_by(WebhookDelivery.id)
        ).all()  # fmt: skip
        licenses_ = session.execute(
            select(LicenseRow.id, LicenseRow.serial, LicenseRow.status, LicenseRow.revision).order_by(
                LicenseRow.id
            )
        ).all()
        report = audit.verify_chain(session)
    assert report.ok, report.problems
    return {
        "machines": [tuple(r) for r in machines],
        "audit": [tuple(r) for r in chain],
        "hits": [tuple(r) for r in hits],
        # The event id is random (and in the payload): everything else must agree.
        "outbox": [(*r[:3], _without_id(r[3]), *r[4:]) for r in outbox],
        "licenses": [tuple(r) for r in licenses_],
    }


def _without_id(payload: str) -> str:
    body = json.loads(payload)
    assert body.pop("id").startswith("evt_")
    return json.dumps(body, sort_keys=True)


def _setup(side: Side, with_webhook: bool) -> None:
    """The same catalog, licenses (with the same keys: they are random otherwise) and
    webhook endpoints on each side."""
    state, admin = side.state, side.admin
    now = state.now()
    plans: dict[str, dict[str, Any]] = {
        "two": {"machines": 2},
        "three-strict": {"machines": 3, "match": "strict"},
        "loose": {"machines": 2, "match": "loose"},
        "instance": {"machines": 2, "binding": "instance"},
        "sealed": {"machines": 2, "seal": True, "emergency": ["backup"]},
        "expired": {"entitlements": [{"feature": "uniplex", "count": 1, "expiry": now.date().isoformat()}]},
        "user": {"binding": "user", "machines": 1},
        "versioned": {"machines": 1, "version": "4.*", "checkpoint_days": 7, "recovery_allowance": 1},
    }
    numbers = itertools.count()
    with mock.patch.object(
        licenses, "generate_license_key", lambda: f"{next(numbers):05d}-ABCDE-FGHJK-MNPQR-STVWX"
    ):
        for name, fields in plans.items():
            side.serials[name], side.keys[name] = setup_license(state, admin, now, **fields)
    # Issued licenses never start expired: this one ends in the past by a change.
    ended = LicenseUpdate.model_validate(
        {"entitlements": [{"feature": "uniplex", "count": 1, "expiry": "2026-01-01"}]}
    )
    with state.db.write() as session:
        licenses.update_license(session, admin, side.serials["expired"], ended, now)
    if with_webhook:
        with state.db.write() as session:
            webhooks.add_endpoint(
                session, url="http://127.0.0.1:9/hook", secret="s", events=[], ca_pem=None,
                pepper=state.pepper, now=now,
            )  # fmt: skip
            webhooks.add_endpoint(
                session, url="http://127.0.0.1:9/other", secret="s", events=["license.issued"], ca_pem=None,
                pepper=state.pepper, now=now,
            )  # fmt: skip


def _blacklist(side: Side, locking_id: str, *, recovered_only: bool) -> None:
    with side.state.db.write() as session:
        recovery.add_to_blacklist(
            session, side.admin, locking_id, recovered_only=recovered_only, delay_days=0, reason="test",
            now=side.state.now(),
        )  # fmt: skip


def _revoke(side: Side, name: str) -> None:
    with side.state.db.write() as session:
        licenses.update_license(
            session, side.admin, side.serials[name], LicenseUpdate(status="revoked"), side.state.now()
        )


@pytest.mark.parametrize("seed", range(4))
def test_the_writer_and_the_orm_path_answer_and_record_the_same(
    sides: tuple[Side, Side], clock: ManualClock, seed: int
) -> None:
    rng = random.Random(seed)
    _both(sides, lambda side: _setup(side, with_webhook=seed % 2 == 0))
    names = list(sides[0].keys)
    assert sides[0].keys == sides[1].keys
    steps = 60
    for step in range(steps):
        clock.advance(timedelta(seconds=rng.choice([0, 1, 59, 3600])))
        if step == steps // 3:
            listed = _locking_id(rng.randrange(6), 0)
            _both(sides, lambda side, lid=listed: _blacklist(side, lid, recovered_only=False))
        if step == steps // 2:
            drifted = _locking_id(rng.randrange(6), 1)  # a listed container, one NIC off
            only = rng.random() < 0.5
            _both(sides, lambda side, lid=drifted, o=only: _blacklist(side, lid, recovered_only=o))
        if step == 2 * steps // 3:
            victim = rng.choice(names)
            _both(sides, lambda side, n=victim: _revoke(side, n))
        name = rng.choice(names)
        key = sides[0].keys[name] if rng.random() > 0.03 else "ZZZZZ-ZZZZZ-ZZZZZ-ZZZZZ-ZZZZZ"
        product = rng.choice([None, None, None, "cortex", "reportix"])
        copied = rng.random() < 0.15
        request = _request(key, rng.randrange(6), rng.randrange(3), rng.randrange(2), product, copied=copied)
        expected, got = (_outcome(side, request) for side in sides)
        assert got == expected, f"step {step}: {request}"
    assert _rows(sides[1].state.db) == _rows(sides[0].state.db)


def test_a_blacklist_hit_over_the_writer_is_refused_and_recorded(sides: tuple[Side, Side]) -> None:
    _both(sides, lambda side: _setup(side, with_webhook=True))
    request = _request(sides[0].keys["two"], 1, 0, 0, None)
    _both(sides, lambda side: _blacklist(side, request.locking_id, recovered_only=False))
    expected, got = (_outcome(side, request) for side in sides)
    assert got == expected and got[0] == "refused" and "blacklisted" in got[1][1]
    rows = _rows(sides[1].state.db)
    assert rows == _rows(sides[0].state.db)
    assert [h[4:] for h in rows["hits"]] == [("activation", "refused")]
    assert rows["machines"] == []


@pytest.mark.parametrize("seed", range(3))
def test_a_batch_answers_and_records_as_one_activation_after_the_other(
    sides: tuple[Side, Side], seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer runs the activations it takes at once in one transaction
    (``_activate_batch``). Many of them on a few licenses, with installations activating
    again, the same hardware twice, blacklisted and unknown machines, go through one batch
    on one side and one after the other through the ORM path on the other: every answer
    and refusal, and afterwards every row, must be the same. A refusal's record is written
    after the batch on both sides, as the app writes it."""
    orm, fast = sides
    rng = random.Random(seed)
    _both(sides, lambda side: _setup(side, with_webhook=True))
    listed = _locking_id(5, 0)
    _both(sides, lambda side: _blacklist(side, listed, recovered_only=False))
    names = ["two", "three-strict", "loose", "instance", "sealed", "expired", "user", "versioned"]
    requests = []
    for _ in range(40):
        name = rng.choice(names[:4] * 3 + names[4:])
        key = orm.keys[name] if rng.random() > 0.05 else "ZZZZZ-ZZZZZ-ZZZZZ-ZZZZZ-ZZZZZ"
        product = rng.choice([None, None, None, "reportix"])
        requests.append(_request(key, rng.randrange(6), rng.randrange(2), rng.randrange(2), product))
    now = orm.state.now()

    committed: list[int] = []  # the requests in the order their batches took them
    deferred = 0
    batch_of = activations._activate_batch

    def counted(tx: RawTransaction, batch: Any, *args: Any) -> Any:
        nonlocal deferred
        outcomes = batch_of(tx, batch, *args)
        positions = [next(i for i, r in enumerate(requests) if r is request) for request, _ in batch]
        if not committed:
            assert len(batch) == len(requests)  # one transaction took them all
        committed.extend(
            i for i, o in zip(positions, outcomes, strict=True) if not isinstance(o, activations._Later)
        )
        deferred += sum(isinstance(o, activations._Later) for o in outcomes)
        return outcomes

    monkeypatch.setattr(activations, "_activate_batch", counted)
    writer = activations.ActivationWriter(fast.state.db, fast.state.signing_key, fast.state.pepper)
    loop = asyncio.new_event_loop()
    try:
        jobs = [activations._Job(r, now, loop.create_future(), loop) for r in requests]
        for job in jobs:  # queued before the thread starts: it takes them all at once
            writer._queue.put(job)
        writer._ensure_started()
        results = loop.run_until_complete(asyncio.gather(*(j.future for j in jobs), return_exceptions=True))
    finally:
        writer.stop()
        loop.close()
    assert deferred > 0, "no installation activated twice in one batch: the seed tests too little"
    assert sorted(committed) == list(range(len(requests)))
    for key in {r.license_key for r in requests}:  # each license's activations in their order
        mine = [i for i in committed if requests[i].license_key == key]
        assert mine == sorted(mine), key

    # The ORM path, one activation after the other in the order the batches committed them;
    # the refusals' records after them on both sides, in that order too.
    expected: dict[int, Outcome] = {}
    outcomes: dict[int, bytes | BaseException] = {}
    for i in committed:
        try:
            outcomes[i] = orm.activate(requests[i])
        except ServiceError as exc:
            outcomes[i] = exc
        expected[i] = _seen(orm, requests[i], outcomes[i])
    for side, raws in ((orm, outcomes), (fast, dict(enumerate(results)))):
        with side.state.db.write() as session:
            for i in committed:
                if isinstance(raws[i], RecordedRefusal):
                    raws[i].record(session)  # type: ignore[union-attr]
    got = {i: _seen(fast, requests[i], results[i]) for i in committed}
    assert got == expected
    assert _rows(fast.state.db) == _rows(orm.state.db)


# ------------------------------------------------------------------ the slot scan


@settings(max_examples=300)
@given(pair=machine_pairs(), level=st.sampled_from(list(MatchLevel)))
def test_the_slot_scan_never_changes_a_verdict(pair: tuple[LockingId, LockingId], level: MatchLevel) -> None:
    """The scan over bound machines (a prepared matcher per stored Locking ID) decides as
    :func:`match_locking_ids` does, and a machine that shares no component never matches:
    at every level a match needs some shared weight."""
    licensed, current = pair
    full = match_locking_ids(licensed, current, level).ok
    assert same_hardware(str(licensed), current, level) == full
    assert first_same_hardware([str(licensed)], current, level) == (0 if full else None)
    if set(licensed.components).isdisjoint(current.components):
        assert not full


# ------------------------------------------------------------------ the writer's connection


def test_the_writer_survives_a_lost_connection(
    state: ServerState, admin: Principal, keyring: Keyring
) -> None:
    """Its kept connection killed between two activations: the next one still succeeds
    (as the pool's pre-ping would have made it), and nothing is doubled."""
    _, key = setup_license(state, admin, START, machines=3)
    writer = activations.ActivationWriter(state.db, state.signing_key, state.pepper)
    loop = asyncio.new_event_loop()
    try:
        first, second = FakeAgent("a", "system-a-123456"), FakeAgent("b", "system-b-123456")
        loop.run_until_complete(writer.activate(first.activation(key), START))
        # The test reaches in to break it (SQLite activates on the event loop's connection).
        connection = writer._loop_connection if state.db.is_sqlite else writer._connection
        assert connection is not None
        if state.db.is_sqlite:
            connection.dbapi_connection.close()
        else:
            with state.db.engine.connect() as admin_connection:
                admin_connection.execute(
                    text("SELECT pg_terminate_backend(:pid)"),
                    {"pid": connection.dbapi_connection.info.backend_pid},
                )
        request = second.activation(key)
        raw = loop.run_until_complete(writer.activate(request, START))
        assert ServerResponse.from_json(raw, keyring, request.nonce).serial
    finally:
        writer.stop()
        loop.close()
    with state.db.read() as session:
        slots = session.execute(select(Machine.slot).order_by(Machine.slot)).scalars().all()
        actions = session.execute(select(AuditEntry.action).order_by(AuditEntry.id)).scalars().all()
    assert slots == [0, 1]
    assert actions.count("license.activate") == 2


@pytest.mark.parametrize(
    ("error", "gone"),
    [
        (psycopg.errors.AdminShutdown, True),  # 57P01: the backend terminated, a restart
        (psycopg.errors.IdleSessionTimeout, True),  # 57P05
        (psycopg.errors.ConnectionFailure, True),  # 08006
        (psycopg.errors.QueryCanceled, False),  # 57014: the statement, not the session
        (psycopg.errors.UniqueViolation, False),
    ],
)
def test_an_error_that_ends_the_session_marks_the_connection_gone(error: type[Exception], gone: bool) -> None:
    """PostgreSQL's last word before it closes a connection may reach psycopg as a
    statement's result, before the connection looks broken. The writers must still take
    the connection for dead and run the request once more on a new one (this made
    test_the_writer_survives_a_lost_connection fail now and then)."""
    dialect = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none").dialect  # never connects
    wrapped = RawTransaction(None, None, dialect).wrapped(error("terminating connection"))
    assert wrapped.connection_invalidated is gone
    assert session_ended(error("x")) is gone


@pytest.mark.parametrize("table", ["machines", "audit_log"])
def test_a_postgresql_activation_failing_inside_its_pipeline_leaves_nothing(
    state: ServerState, admin: Principal, keyring: Keyring, db_url: str, table: str
) -> None:
    """PostgreSQL: the writes travel with the next read or with COMMIT, so a failing write
    surfaces later (the machine's insert at the audit chain's read, the audit entry's at
    the end). Either way the activation is refused with the database's error, nothing of
    it stays, and the writer serves the next activation on a new connection."""
    if db_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's pipeline")
    _, key = setup_license(state, admin, START, machines=3)
    with state.db.engine.begin() as c:
        c.execute(
            text(
                "CREATE FUNCTION refuse_row() RETURNS trigger LANGUAGE plpgsql"
                " AS $$ BEGIN RAISE EXCEPTION 'no room for this row'; END $$"
            )
        )
        c.execute(
            text(
                f"CREATE TRIGGER refuse_row BEFORE INSERT ON {table}"
                " FOR EACH ROW EXECUTE FUNCTION refuse_row()"
            )
        )
    with state.db.read() as session:
        entries = session.execute(select(AuditEntry.id)).scalars().all()
    writer = activations.ActivationWriter(state.db, state.signing_key, state.pepper)
    loop = asyncio.new_event_loop()
    try:
        refused = agent(1).activation(key)
        with pytest.raises(DBAPIError, match="no room for this row"):
            loop.run_until_complete(writer.activate(refused, START))
        kept = writer._connection
        with state.db.engine.begin() as c:
            c.execute(text(f"DROP TRIGGER refuse_row ON {table}"))
        with state.db.read() as session:
            assert session.execute(select(Machine)).all() == []
            assert session.execute(select(AuditEntry.id)).scalars().all() == entries
        request = agent(2).activation(key)
        raw = loop.run_until_complete(writer.activate(request, START))
        assert kept is None  # closed after the failure: psycopg's prepared statements
        assert writer._connection is not None  # a new one served the next activation
    finally:
        writer.stop()
        loop.close()
    assert ServerResponse.from_json(raw, keyring, request.nonce).serial
    with state.db.read() as session:
        assert session.execute(select(Machine.slot)).scalars().all() == [0]
        assert audit.verify_chain(session).ok


def test_a_batch_that_fails_runs_each_activation_alone(
    state: ServerState, admin: Principal, keyring: Keyring, db_url: str
) -> None:
    """One activation of a batch breaks the batch's transaction (here a trigger refuses its
    machine): nothing of the batch stays, each activation runs alone, and only that one
    fails, with the database's error; the others are bound and answered."""
    _, key = setup_license(state, admin, START, machines=5)
    with state.db.engine.begin() as c:
        if db_url.startswith("sqlite"):
            c.execute(
                text(
                    "CREATE TRIGGER refuse_one BEFORE INSERT ON machines"
                    " WHEN NEW.system_id = 'system-0003-abcdef'"
                    " BEGIN SELECT RAISE(ABORT, 'no room for this row'); END"
                )
            )
        else:
            c.execute(
                text(
                    "CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                    " IF NEW.system_id = 'system-0003-abcdef' THEN"
                    " RAISE EXCEPTION 'no room for this row'; END IF;"
                    " RETURN NEW; END $$"
                )
            )
            c.execute(
                text(
                    "CREATE TRIGGER refuse_one BEFORE INSERT ON machines"
                    " FOR EACH ROW EXECUTE FUNCTION refuse_one()"
                )
            )
    batches: list[int] = []
    batch_of = activations._activate_batch

    def counted(tx: RawTransaction, batch: Any, *args: Any) -> Any:
        batches.append(len(batch))
        return batch_of(tx, batch, *args)

    requests = [agent(n).activation(key) for n in range(5)]
    writer = activations.ActivationWriter(state.db, state.signing_key, state.pepper)
    loop = asyncio.new_event_loop()
    try:
        with mock.patch.object(activations, "_activate_batch", counted):
            jobs = [activations._Job(r, START, loop.create_future(), loop) for r in requests]
            for job in jobs:
                writer._queue.put(job)
            writer._ensure_started()
            results = loop.run_until_complete(
                asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
            )
    finally:
        writer.stop()
        loop.close()
    assert batches == [5, 1, 1, 1, 1, 1]  # then each alone, a batch of one
    failed = results.pop(3)
    assert isinstance(failed, DBAPIError) and "no room for this row" in str(failed)
    for request, raw in zip(requests[:3] + requests[4:], results, strict=True):
        assert isinstance(raw, bytes), raw
        assert ServerResponse.from_json(raw, keyring, request.nonce).serial
    with state.db.read() as session:
        assert session.execute(select(Machine.slot).order_by(Machine.slot)).scalars().all() == [0, 1, 2, 3]
        assert audit.verify_chain(session).ok


# ------------------------------------------------------------------ over HTTP


def test_the_activation_lane_answers_as_the_route(
    live_server: LiveServer, state: ServerState, admin: Principal, keyring: Keyring
) -> None:
    """The same requests through the lane (a plain body) and through the route (chunked):
    the same statuses and one-line refusals; a blacklist hit is recorded either way."""
    serial, key = setup_license(state, admin, START, machines=2)
    client = live_server.client()

    def post(body: bytes, *, chunked: bool) -> httpx.Response:
        return client.post("/api/v1/activate", content=iter([body]) if chunked else body)

    for n, chunked in ((1, False), (2, True)):
        request = agent(n).activation(key)
        reply = post(request.to_json(), chunked=chunked)
        assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
        assert ServerResponse.from_json(reply.content, keyring, request.nonce).serial == serial
    forged = json.loads(agent(3).activation(key).to_json())
    forged["system_id"] = agent(4).system_id
    banned = agent(5)
    with state.db.write() as session:
        recovery.add_to_blacklist(
            session, admin, banned.locking_id, recovered_only=False, delay_days=0, reason="t", now=START
        )
    cases = [
        (lambda: agent(6).activation("AAAAA-BBBBB-CCCCC-DDDDD-EEEEE").to_json(), 404, "unknown license key"),
        (lambda: b"{not json", 422, None),
        (lambda: b'{"type": "activate"}', 422, None),
        (lambda: json.dumps(forged).encode(), 403, "bad request signature"),
        (lambda: mixed_order_activation(agent(8).activation(key)), 422, "field 'agent_key'"),
        (lambda: agent(7).activation(key).to_json(), 403, "no free machine left"),
        (lambda: banned.activation(key).to_json(), 403, "blacklisted"),
        (lambda: b"{" + b" " * MAX_MESSAGE_SIZE + b"}", 422, "request is too large"),
    ]
    for make, status, words in cases:
        via_lane, via_route = post(make(), chunked=False), post(make(), chunked=True)
        assert via_lane.status_code == via_route.status_code == status, (via_lane.text, via_route.text)
        assert len(via_lane.json()) == 1 and len(via_route.json()) == 1  # {"detail": ...}
        if words is not None:
            assert words in via_lane.json()["detail"] and words in via_route.json()["detail"]
    with state.db.read() as session:
        hits = session.execute(select(BlacklistHit.how, BlacklistHit.action)).all()
    assert [tuple(h) for h in hits] == [("activation", "refused")] * 2


# ------------------------------------------------------------------ SQLite: loop or thread


def _sqlite_state(tmp_path: Path, *, timeout: float = 5.0) -> ServerState:
    db = Database(f"sqlite:///{tmp_path / 'loop.db'}?timeout={timeout}")
    upgrade(db)
    return ServerState(
        db=db, signing_key=SigningKey.generate(), pepper=secrets.token_bytes(32), clock=ManualClock(START)
    )


def _sqlite_admin(state: ServerState) -> Principal:
    with state.db.write() as session:
        row, _ = create_token(session, name="admin", role=Role.ADMIN, now=START)
        return Principal(row.id, row.name, Role.ADMIN)


def test_sqlite_activations_run_on_the_loop_and_wait_on_the_thread_when_the_lock_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The activations of one turn of the loop run there in one transaction. While another
    process writes, an activation never blocks the event loop: it waits for the lock on
    the writer thread, and is answered once the lock is free."""
    state = _sqlite_state(tmp_path)
    _, key = setup_license(state, _sqlite_admin(state), START, machines=5)
    checkpoints: list[int] = []
    monkeypatch.setattr(activations, "CHECKPOINT_EVERY", 2)
    writer = activations.ActivationWriter(state.db, state.signing_key, state.pepper)
    original = writer._checkpoint
    monkeypatch.setattr(writer, "_checkpoint", lambda: (checkpoints.append(1), original())[1])
    batches: list[int] = []
    batch_of = activations._activate_batch

    def counted(tx: RawTransaction, batch: Any, *args: Any) -> Any:
        batches.append(len(batch))
        return batch_of(tx, batch, *args)

    monkeypatch.setattr(activations, "_activate_batch", counted)

    async def scenario() -> list[str]:
        events: list[str] = []
        # The lock is free: right here, no thread at all, both of this turn in one batch.
        await asyncio.gather(*(writer.activate(agent(n).activation(key), START) for n in (1, 2)))
        assert batches == [2]
        assert writer._thread is not None  # started for the checkpoint only
        other = sqlite3.connect(tmp_path / "loop.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process writes
        task = asyncio.ensure_future(writer.activate(agent(3).activation(key), START))
        for _ in range(5):
            await asyncio.sleep(0.02)
            events.append("loop free")  # the loop keeps serving meanwhile
        assert not task.done()
        other.execute("COMMIT")
        other.close()
        await task
        events.append("answered")
        return events

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(scenario()) == ["loop free"] * 5 + ["answered"]
    finally:
        writer.stop()
        loop.close()
    assert checkpoints == [1]
    with state.db.read() as session:
        assert session.execute(select(Machine.slot).order_by(Machine.slot)).scalars().all() == [0, 1, 2]
        assert audit.verify_chain(session).ok
    state.db.dispose()


@pytest.mark.parametrize("where", ["loop", "thread"])
def test_a_bug_in_the_writer_fails_its_batch_and_the_writer_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A bug outside any transaction (here in the batch runner itself) fails the
    activations it held with the error (a 500) instead of leaving them waiting forever,
    and the next batch is served."""
    state = _sqlite_state(tmp_path)
    _, key = setup_license(state, _sqlite_admin(state), START, machines=5)
    writer = activations.ActivationWriter(state.db, state.signing_key, state.pepper)
    original = writer._batch_once
    calls = 0

    def buggy(batch: Any, *, on_loop: bool) -> Any:
        nonlocal calls
        if where == "thread" and on_loop:
            raise Busy  # as if the lock were taken: the writer thread runs the batch
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return original(batch, on_loop=on_loop)

    monkeypatch.setattr(writer, "_batch_once", buggy)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError, match="a bug"):
            loop.run_until_complete(asyncio.wait_for(writer.activate(agent(1).activation(key), START), 10))
        raw = loop.run_until_complete(asyncio.wait_for(writer.activate(agent(2).activation(key), START), 10))
        assert isinstance(raw, bytes)
    finally:
        writer.stop()
        loop.close()
    state.db.dispose()


def test_sqlite_locked_too_long_is_an_outage_and_changes_nothing(tmp_path: Path) -> None:
    state = _sqlite_state(tmp_path, timeout=0.3)
    _, key = setup_license(state, _sqlite_admin(state), START, machines=5)
    writer = activations.ActivationWriter(state.db, state.signing_key, state.pepper)
    other = sqlite3.connect(tmp_path / "loop.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(OperationalError, match="locked"):
            loop.run_until_complete(writer.activate(agent(1).activation(key), START))
    finally:
        other.execute("ROLLBACK")
        other.close()
        writer.stop()
        loop.close()
    with state.db.read() as session:
        assert session.execute(select(Machine.id)).first() is None
    state.db.dispose()
