"""The check-in writer: batches of concurrent check-ins, each with its own verdict, recorded
together or not at all."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from tessera.core.protocol import CheckinRequest, ServerResponse
from tessera.core.signing import Keyring
from tessera.server import activation, licenses
from tessera.server.app import ServerState
from tessera.server.checkins import FULL_PATH, CheckinWriter, _Job
from tessera.server.errors import Forbidden, NotFound
from tessera.server.models import Checkin, LicenseRow, Machine
from tessera.server.rawsql import array_literal
from tessera.server.storage import Database
from tessera.server.tokens import Principal

from .conftest import START
from .helpers import FakeAgent, agent, setup_license


def activated(state: ServerState, admin: Principal, machines: int) -> tuple[str, str, list[FakeAgent]]:
    serial, key = setup_license(state, admin, START, machines=machines)
    agents = [agent(n) for n in range(machines)]
    with state.db.write() as session:
        for a in agents:
            activation.activate(session, a.activation(key), START, state.signing_key, state.pepper)
    return serial, key, agents


def maced(state: ServerState, a: FakeAgent, key: str) -> CheckinRequest:
    checkin_key = activation.checkin_key_for(state.pepper, a.key.public.to_base64())
    return CheckinRequest.create(key, a.locking_id, a.system_id, a.key, checkin_key)


def answers(
    state: ServerState, requests: list[CheckinRequest], results: list[object]
) -> list[ServerResponse]:
    """Each result as its agent reads it: a vendor-signed answer to its own request."""
    keyring = Keyring([state.signing_key.public])
    out = []
    for request, result in zip(requests, results, strict=True):
        assert isinstance(result, bytes), result
        out.append(ServerResponse.from_json(result, keyring, request.nonce))
    return out


def pg_connect(db_url: str, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    """A connection of the test's own to the PostgreSQL database of ``db_url``: another
    process, as far as the writer can tell."""
    url = make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    return psycopg.connect(url, autocommit=autocommit)


async def run_all(writer: CheckinWriter, requests: list[CheckinRequest], now=START) -> list[object]:  # type: ignore[no-untyped-def]
    try:
        return await asyncio.gather(*(writer.checkin(r, now) for r in requests), return_exceptions=True)
    finally:
        writer.stop()


def test_concurrent_checkins_are_all_recorded_as_the_orm_would(state: ServerState, admin: Principal) -> None:
    serial, key, agents = activated(state, admin, 40)
    later = START + timedelta(hours=5)
    writer = CheckinWriter(state.db, state.pepper, state.signing_key)
    requests = [maced(state, a, key) for a in agents for _ in range(3)]
    results = asyncio.run(run_all(writer, requests, later))
    assert all(r.serial == serial and r.directives == () for r in answers(state, requests, results))
    with state.db.read() as session:
        assert session.execute(select(Checkin.outcome)).scalars().all() == ["ok"] * 120
        machines = session.execute(select(Machine)).scalars().all()
        # Written as raw statements, read back through the ORM types: the same instant.
        assert {m.last_checkin_at for m in machines} == {later}
        assert {c.at for c in session.execute(select(Checkin)).scalars()} == {later}
        view = licenses.license_view(licenses.get_license(session, serial))
    assert len(view["machines"]) == 40


def test_each_checkin_of_a_batch_gets_its_own_verdict(state: ServerState, admin: Principal) -> None:
    serial, key, agents = activated(state, admin, 4)
    good, stranger, forger, behind = agents
    with state.db.write() as session:  # a central change: this one must get the new file
        session.execute(
            Machine.__table__.update()
            .where(Machine.system_id == behind.system_id)
            .values(delivered_revision=0)
        )
    wrong_key = CheckinRequest.create(
        key, forger.locking_id, forger.system_id, forger.key, activation.checkin_key_for(b"x" * 32, "AAAA")
    )
    unknown = maced(state, stranger, "AAAAA-BBBBB-CCCCC-DDDDD-EEEEE")
    writer = CheckinWriter(state.db, state.pepper, state.signing_key)
    first = maced(state, good, key)
    results = asyncio.run(run_all(writer, [first, unknown, wrong_key, maced(state, behind, key)]))
    assert answers(state, [first], results[:1])[0].serial == serial
    assert isinstance(results[1], NotFound)
    assert isinstance(results[2], Forbidden) and "signature" in str(results[2])
    assert results[3] is FULL_PATH  # the full path ships the revision, in its own transaction
    with state.db.read() as session:
        recorded = session.execute(select(Checkin.machine_id)).scalars().all()
        good_id = session.execute(select(Machine.id).where(Machine.system_id == good.system_id)).scalar_one()
    assert recorded == [good_id]


def test_a_revoked_license_is_answered_on_the_fast_path(state: ServerState, admin: Principal) -> None:
    serial, key, (a,) = activated(state, admin, 1)
    with state.db.write() as session:
        session.execute(
            LicenseRow.__table__.update().where(LicenseRow.serial == serial).values(status="revoked")
        )
    request = maced(state, a, key)
    results = asyncio.run(run_all(CheckinWriter(state.db, state.pepper, state.signing_key), [request]))
    (response,) = answers(state, [request], results)
    assert response.directives == ("revoke",) and response.message == f"license {serial} has been revoked"
    with state.db.read() as session:
        assert session.execute(select(Checkin.outcome)).scalars().all() == ["revoked"]


def test_a_batch_that_cannot_commit_acknowledges_nothing(
    state: ServerState, admin: Principal, db_url: str
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("holds SQLite's file lock from outside; PostgreSQL outages: test_database_outage.py")
    _, key, agents = activated(state, admin, 3)
    impatient = Database(f"{db_url}?timeout=0.3")
    blocker = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process writing, for longer than we wait
        writer = CheckinWriter(impatient, state.pepper, state.signing_key)
        results = asyncio.run(run_all(writer, [maced(state, a, key) for a in agents]))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        impatient.dispose()
    assert all(isinstance(r, OperationalError) and "locked" in str(r) for r in results), results
    with state.db.read() as session:
        assert session.execute(select(Checkin)).all() == []
    # The writer recovers by itself once the lock is gone.
    writer = CheckinWriter(state.db, state.pepper, state.signing_key)
    requests = [maced(state, a, key) for a in agents]
    results = asyncio.run(run_all(writer, requests))
    assert len(answers(state, requests, results)) == 3


def test_a_postgresql_batch_whose_writes_fail_acknowledges_nothing_and_the_next_one_runs(
    state: ServerState, admin: Principal, db_url: str
) -> None:
    """The writes are one statement (``tessera_record_checkins``): one of them failing (here
    the check-in insert, after the machines were updated) rolls back the whole batch, every
    check-in of it gets the error, and the same kept connection serves the next batch."""
    if db_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's batch function; SQLite: the test above")
    _, key, agents = activated(state, admin, 3)
    with pg_connect(db_url, autocommit=True) as c:
        c.execute(
            "CREATE FUNCTION refuse_checkin() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RAISE EXCEPTION 'no room for check-ins'; END $$"
        )
        c.execute(
            "CREATE TRIGGER refuse_checkin BEFORE INSERT ON checkins"
            " FOR EACH STATEMENT EXECUTE FUNCTION refuse_checkin()"
        )
    writer = CheckinWriter(state.db, state.pepper, state.signing_key)
    requests = [maced(state, a, key) for a in agents]
    later = START + timedelta(hours=1)

    def machine_rows() -> list[tuple[Any, ...]]:
        with pg_connect(db_url, autocommit=True) as c:
            query = "SELECT id, last_checkin_at, delivered_revision FROM machines ORDER BY id"
            return c.execute(query).fetchall()

    before = machine_rows()

    async def scenario() -> tuple[list[object], list[tuple[Any, ...]], list[object], int]:
        failed = await asyncio.gather(*(writer.checkin(r, later) for r in requests), return_exceptions=True)
        after_failure = machine_rows()
        with pg_connect(db_url, autocommit=True) as c:
            c.execute("DROP TRIGGER refuse_checkin ON checkins")
        connections = sum(len(pg.idle) for pg in writer._pg_loops.values())
        again = [maced(state, a, key) for a in agents]
        recovered = await asyncio.gather(*(writer.checkin(r, later) for r in again))
        return failed, after_failure, recovered, connections

    try:
        failed, after_failure, recovered, kept = asyncio.run(scenario())
    finally:
        writer.stop()
    assert all(isinstance(r, OperationalError) and "no room" in str(r) for r in failed), failed
    assert after_failure == before  # the machines' update went with the failed insert
    assert kept >= 1  # rolled back and kept, not dropped
    assert len(recovered) == 3 and all(isinstance(r, bytes) for r in recovered)
    with state.db.read() as session:
        assert len(session.execute(select(Checkin)).all()) == 3  # the second round's only
        stamps = session.execute(select(Machine.last_checkin_at)).scalars().all()
    assert all(s is not None and s.replace(tzinfo=None) == later.replace(tzinfo=None) for s in stamps)


def test_a_postgresql_batch_locks_its_machines_in_id_order(
    state: ServerState, admin: Principal, db_url: str
) -> None:
    """Two processes' batches never deadlock: each locks its machines lowest id first. With
    the higher one locked elsewhere, a batch of both holds the lower one while it waits
    (locking the higher first would leave the lower free)."""
    if db_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's row locks; SQLite has one writer at a time")
    _, key, agents = activated(state, admin, 2)
    with pg_connect(db_url, autocommit=True) as c:
        ids = dict(c.execute("SELECT system_id, id FROM machines").fetchall())
    low, high = sorted(agents, key=lambda a: ids[a.system_id])
    blocker = pg_connect(db_url)
    blocker.execute("SELECT id FROM machines WHERE id = %s FOR UPDATE", (ids[high.system_id],))
    writer = CheckinWriter(state.db, state.pepper, state.signing_key)
    requests = [maced(state, high, key), maced(state, low, key)]  # the higher id first

    async def scenario() -> tuple[str, list[object]]:
        batch = asyncio.gather(*(writer.checkin(r, START) for r in requests))
        await asyncio.sleep(0.5)  # the batch is waiting for the higher id's lock
        with pg_connect(db_url) as probe:
            try:
                probe.execute(
                    "SELECT id FROM machines WHERE id = %s FOR UPDATE NOWAIT", (ids[low.system_id],)
                )
                held = "free"
            except psycopg.errors.LockNotAvailable:
                held = "held"
        blocker.rollback()
        return held, await asyncio.wait_for(batch, 10)

    try:
        held, results = asyncio.run(scenario())
    finally:
        writer.stop()
        blocker.close()
    assert held == "held"
    assert all(r.directives == () for r in answers(state, requests, results))


def test_sqlite_batches_never_make_the_event_loop_wait_for_the_write_lock(
    state: ServerState, admin: Principal, db_url: str
) -> None:
    """Another process writing: the batch goes to the writer thread, the loop goes on."""
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite's file lock; PostgreSQL batches always run on the loop (asynchronously)")
    _, key, agents = activated(state, admin, 3)
    blocker = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    writer = CheckinWriter(state.db, state.pepper, state.signing_key)

    requests = [maced(state, a, key) for a in agents]

    async def scenario() -> list[object]:
        pending = asyncio.gather(*(writer.checkin(r, START) for r in requests))
        for _ in range(5):  # the loop keeps turning while the lock is held elsewhere
            await asyncio.sleep(0.01)
        assert not pending.done()
        blocker.execute("ROLLBACK")  # only the loop can let go: it must not be stuck
        return await pending

    try:
        results = asyncio.run(scenario())
    finally:
        writer.stop()
        blocker.close()
    assert all(r.directives == () for r in answers(state, requests, results))
    with state.db.read() as session:
        assert len(session.execute(select(Checkin)).all()) == 3


def test_the_writer_thread_checkpoints_what_the_loop_commits(
    state: ServerState, admin: Principal, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite's WAL")
    _, key, agents = activated(state, admin, 2)
    monkeypatch.setattr("tessera.server.checkins.CHECKPOINT_EVERY", 3)
    checkpoints: list[int] = []
    original = CheckinWriter._checkpoint

    def counted(self: CheckinWriter) -> None:
        checkpoints.append(1)
        original(self)

    monkeypatch.setattr(CheckinWriter, "_checkpoint", counted)
    writer = CheckinWriter(state.db, state.pepper, state.signing_key)

    async def one_batch_after_another() -> None:
        for _ in range(9):
            await asyncio.gather(*(writer.checkin(maced(state, a, key), START) for a in agents))

    try:
        asyncio.run(one_batch_after_another())
    finally:
        writer.stop()
    assert len(checkpoints) >= 1
    with state.db.read() as session:
        assert len(session.execute(select(Checkin)).all()) == 18


def test_one_signature_answers_a_batch_and_older_agents_get_their_own(
    state: ServerState, admin: Principal
) -> None:
    """Agents that take a batch-signed answer share one signature (with a path each); an
    older agent's answer in the same batch is signed alone, as it expects."""
    serial, key, agents = activated(state, admin, 6)
    older = [
        CheckinRequest.create(
            key, a.locking_id, a.system_id, a.key,
            activation.checkin_key_for(state.pepper, a.key.public.to_base64()), accept_batch=False,
        )
        for a in agents[:2]
    ]  # fmt: skip
    requests = [*older, *(maced(state, a, key) for a in agents[2:])]
    results = asyncio.run(run_all(CheckinWriter(state.db, state.pepper, state.signing_key), requests))
    responses = answers(state, requests, results)
    assert all(r.serial == serial for r in responses)
    assert [r.batch_path is None for r in responses[:2]] == [True, True]
    batched = [r for r in responses[2:] if r.batch_path is not None]
    assert len(batched) == 4 and len({r.signature for r in batched}) == 1  # one turn, one batch


def test_one_batch_with_an_unknown_key_and_a_machine_twice(state: ServerState, admin: Principal) -> None:
    """One batch, as the writer runs it (on PostgreSQL: one statement per step over arrays):
    each check-in answered in its place, a machine seen twice keeps its later check-in."""
    serial, key, (first, second) = activated(state, admin, 2)
    later = START + timedelta(minutes=5)
    requests = [
        maced(state, first, key),
        maced(state, agent(7), "AAAAA-BBBBB-CCCCC-DDDDD-EEEEE"),
        maced(state, second, key),
        maced(state, first, key),
    ]
    nows = [START, START, START, later]
    writer = CheckinWriter(state.db, state.pepper, state.signing_key)

    async def one_batch() -> list[object]:
        loop = asyncio.get_running_loop()
        jobs = [_Job(r, now, loop.create_future(), loop) for r, now in zip(requests, nows, strict=True)]
        if state.db.is_sqlite:
            writer._run_batch(jobs)
        else:
            await writer._run_pg_batch(jobs, writer._pg_loop(loop))
        return await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)

    try:
        results = asyncio.run(one_batch())
    finally:
        writer.stop()
    assert isinstance(results[1], NotFound)
    answered = answers(state, [requests[i] for i in (0, 2, 3)], [results[i] for i in (0, 2, 3)])
    assert {r.serial for r in answered} == {serial}
    with state.db.read() as session:
        assert len(session.execute(select(Checkin)).all()) == 3
        seen = dict(session.execute(select(Machine.system_id, Machine.last_checkin_at)).all())
    assert seen == {first.system_id: later, second.system_id: START}


def test_a_postgresql_batch_stuck_on_a_row_lock_does_not_hold_up_the_next(
    state: ServerState, admin: Principal, db_url: str
) -> None:
    """Batches overlap two at a time on PostgreSQL (the next starts once the one in flight
    has its rows), and batches that wait (here for a row lock another transaction holds)
    let the next start beside them after ``PG_STALL_S``."""
    if db_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's batches in flight; SQLite: the loop test above")
    _, key, (stuck, free) = activated(state, admin, 2)
    blocker = pg_connect(db_url)
    blocker.execute("SELECT id FROM machines WHERE system_id = %s FOR UPDATE", (stuck.system_id,))
    writer = CheckinWriter(state.db, state.pepper, state.signing_key)
    waiting = [maced(state, stuck, key) for _ in range(2)]
    second_request = maced(state, free, key)

    async def scenario() -> list[object]:
        first = []
        for request in waiting:  # two batches, each stuck on the lock
            first.append(asyncio.ensure_future(writer.checkin(request, START)))
            await asyncio.sleep(0.2)
        assert not any(f.done() for f in first)
        second = await asyncio.wait_for(writer.checkin(second_request, START), 10)
        assert not any(f.done() for f in first)
        blocker.rollback()
        return [*(await asyncio.wait_for(asyncio.gather(*first), 10)), second]

    try:
        results = asyncio.run(scenario())
    finally:
        writer.stop()
        blocker.close()
    assert all(r.directives == () for r in answers(state, [*waiting, second_request], results))
    with state.db.read() as session:
        assert len(session.execute(select(Checkin)).all()) == 3


def test_a_postgresql_batch_starts_while_the_one_before_writes(
    state: ServerState, admin: Principal, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next batch does not wait for the one in flight to commit, only for its rows:
    here the first waits for a row lock in its writes, and no stall timer could help."""
    if db_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's batches in flight")
    monkeypatch.setattr("tessera.server.checkins.PG_STALL_S", 3600)
    _, key, (stuck, free) = activated(state, admin, 2)
    blocker = pg_connect(db_url)
    blocker.execute("SELECT id FROM machines WHERE system_id = %s FOR UPDATE", (stuck.system_id,))
    writer = CheckinWriter(state.db, state.pepper, state.signing_key)
    requests = [maced(state, stuck, key), maced(state, free, key)]

    async def scenario() -> list[object]:
        first = asyncio.ensure_future(writer.checkin(requests[0], START))
        await asyncio.sleep(0.2)
        second = await asyncio.wait_for(writer.checkin(requests[1], START), 10)
        assert not first.done()
        blocker.rollback()
        return [await asyncio.wait_for(first, 10), second]

    try:
        results = asyncio.run(scenario())
    finally:
        writer.stop()
        blocker.close()
    assert all(r.directives == () for r in answers(state, requests, results))


def test_a_postgresql_connection_that_died_while_idle_costs_no_checkin(
    state: ServerState, admin: Principal, db_url: str
) -> None:
    """The database ended the writer's kept connection between two batches (a restart, an
    idle timeout): the next batch finds out at its lookup and runs on a new connection."""
    if db_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's kept connections")
    _, key, (a,) = activated(state, admin, 1)
    writer = CheckinWriter(state.db, state.pepper, state.signing_key)
    requests = [maced(state, a, key) for _ in range(2)]

    async def scenario() -> list[object]:
        first = await writer.checkin(requests[0], START)
        with pg_connect(db_url, autocommit=True) as admin_connection:
            ended = admin_connection.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        assert ended is not None and ended[0] >= 1
        await asyncio.sleep(0.2)  # the backend is gone
        return [first, await writer.checkin(requests[1], START)]

    try:
        results = asyncio.run(scenario())
    finally:
        writer.stop()
    assert all(r.directives == () for r in answers(state, requests, results))
    with state.db.read() as session:
        assert len(session.execute(select(Checkin)).all()) == 2


def test_an_agent_naming_an_older_revision_than_delivered_goes_to_the_full_path(
    state: ServerState, admin: Principal
) -> None:
    """Its answer with the new revision was lost: the batch leaves it to the full path,
    which sends the file again; an agent naming the current revision stays on the batch."""
    serial, key, (a,) = activated(state, admin, 1)
    with state.db.write() as session:  # revision 2 delivered, as far as the server knows
        session.execute(LicenseRow.__table__.update().where(LicenseRow.serial == serial).values(revision=2))
        session.execute(Machine.__table__.update().values(delivered_revision=2))
    checkin_key = activation.checkin_key_for(state.pepper, a.key.public.to_base64())
    behind, current = (
        CheckinRequest.create(key, a.locking_id, a.system_id, a.key, checkin_key, revision=r) for r in (1, 2)
    )
    results = asyncio.run(run_all(CheckinWriter(state.db, state.pepper, state.signing_key), [behind]))
    assert results == [FULL_PATH]
    results = asyncio.run(run_all(CheckinWriter(state.db, state.pepper, state.signing_key), [current]))
    assert answers(state, [current], results)[0].license is None


@pytest.mark.parametrize(
    "values", [['a"b', "c\\d", "e,f", "{}", " ", "NULL", "", 'x\\"y', "ü"], [], ["2026-11-22T10:00:00+00:00"]]
)
def test_batch_arrays_reach_postgresql_as_sent(values: list[str], db_url: str) -> None:
    """The batch statements' arrays travel as text in PostgreSQL's array syntax: whatever
    an element holds (quotes, backslashes, commas, braces, the word NULL) it arrives as is."""
    if db_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's array syntax")
    with pg_connect(db_url) as connection:
        row = connection.execute("SELECT CAST(%s AS TEXT[])", (array_literal(values),)).fetchone()
    assert row is not None and row[0] == values
