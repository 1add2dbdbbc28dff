"""The check-in hot path: plain check-ins recorded in batches, a commit per batch.

Check-ins are most of a license server's traffic, and each needs a lookup, two small
writes and a commit. Run one per thread-pool hop with a commit each (the general path of
the admin API), the server spends its time switching threads under the GIL, queueing on
SQLite's write lock and committing. Here the check-ins that arrive together run in one
transaction with plain DB-API statements (compiled once from the same SQLAlchemy
statements, so the SQL and the type conversions stay those of the models) and commit once:

- **SQLite**: the check-ins of one turn of the event loop run right there, if the write
  lock is free that instant, else on one writer thread that waits for it.
- **PostgreSQL**: on the event loop too, over asynchronous psycopg connections; the
  check-ins that arrive while a batch is looked up make the next batch, which starts once
  that one has its rows (more only beside batches that stall, :data:`PG_STALL_S`). Four
  statements over arrays per batch. Writer threads (the design before) spent about twice
  the server CPU per check-in handing batches over and waking up under the GIL.

Nothing is answered before the commit that records it, so an acknowledged check-in is
never lost; a batch that cannot commit fails every check-in in it with 503, so none is
acknowledged wrongly.

Only the plain case runs here: a bound machine, the license unchanged since it was last
delivered (or revoked), its container not blacklisted. Everything else (a revision to ship,
a machine whose license was recovered elsewhere, a blacklist hit) is answered
:data:`FULL_PATH`, and the caller runs :func:`tessera.server.activation.checkin` with the
ORM in a transaction of its own; those are rare by nature. Both paths share
:func:`tessera.server.activation.lookup_checkin` and
:func:`tessera.server.activation.check_checkin`, so they cannot disagree on a rule.

Writes of a batch are applied in machine-id order, so two server processes sharing one
PostgreSQL take row locks in the same order and never deadlock each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    Date,
    DateTime,
    Integer,
    String,
    and_,
    func,
    select,
)
from sqlalchemy.exc import DBAPIError, OperationalError

from tessera.core.clock import utc
from tessera.core.licensekey import license_key_digest
from tessera.core.protocol import BATCH, CheckinRequest, ServerResponse, sign_batch
from tessera.core.signing import SigningKey
from tessera.server.activation import (
    CHECKIN_LOOKUP,
    RECORD_CHECKIN,
    RECORD_MACHINE,
    CheckinFound,
    CheckinVerdict,
    check_checkin,
    checkin_lookup_columns,
    plain_verdict,
)
from tessera.server.errors import NotFound, ServiceError
from tessera.server.models import LicenseRow, Machine
from tessera.server.outage import describe_failure
from tessera.server.rawsql import (
    Broken,
    Busy,
    Compiled,
    array_literal,
    session_ended,
    text_array,
    transaction,
    unnest_arrays,
)
from tessera.server.storage import Database
from tessera.server.writer import Job, gather_turn, release_connection, settle, take_batch

_Job = Job[CheckinRequest]

__all__ = ["FULL_PATH", "CheckinWriter"]

log = logging.getLogger("tessera.server")

#: Answer of :meth:`CheckinWriter.checkin` for a check-in the plain path does not handle.
FULL_PATH: Final = object()
#: Check-ins per transaction at most: bounds how long one commit holds SQLite's write lock.
MAX_BATCH = 256
#: PostgreSQL: batches of one event loop, each on a connection of its own. The check-ins
#: that arrive while a batch is looked up wait for the next one, which starts as soon as the
#: batch in flight has its rows: its writes and commit then overlap the next one's lookup
#: (10-30 % more check-ins at 16 connections than one batch at a time, with batches as
#: large). Starting batches freely cost 20-30 % more CPU for the same rate (smaller
#: batches; each costs the database two statements and a commit whatever its size). A
#: batch that has run for :data:`PG_STALL_S` (waiting for a row lock another process
#: holds, a slow disk) lets the next start beside it whatever it is doing, up to
#: :data:`PG_IN_FLIGHT`, so one stuck batch does not stop every check-in behind it.
PG_OVERLAP = 2
PG_IN_FLIGHT = 4
PG_STALL_S = 0.02
#: PostgreSQL: the batch connections run only the ``PG_BATCH_*`` statements, prepared, on
#: one generic plan each. Custom plans made PostgreSQL plan every batch's lookup again
#: (about 0.15 ms, a third of its work per batch); the generic plans are index lookups
#: per array element whatever the batch's size or the tables' (the scale benchmark checks
#: 1,000,000 licenses).
PG_SESSION_SETUP = "SET plan_cache_mode = force_generic_plan"
#: SQLite: after this many batches committed on the event loop (whose connection does not
#: checkpoint, see :meth:`CheckinWriter._flush`), the writer thread checkpoints the WAL.
CHECKPOINT_EVERY = 32
_STOP: Final = object()
_CHECKPOINT: Final = object()


# PostgreSQL: a batch as two statements whatever its size, over arrays (sent as text:
# rawsql.text_array). Per-row statements (even pipelined) cost psycopg and the database a
# parse, bind and result each, which was most of a batch's time. Arrays, not JSON:
# PostgreSQL's generic plan expects 10 rows from unnest() and looks each up by index, but
# 100 from json_to_recordset(), and chose a hash join over a scan of every license at
# 10,000 of them. The lookup is CHECKIN_LOOKUP per element (same columns, in CheckinFound's
# order, after the element's 1-based position ``n``).
_Q = unnest_arrays("q", ("digest", String()), ("system_id", String()), ("today", Date()), ordinality="n")
PG_BATCH_LOOKUP = (
    select(_Q.c.n, *checkin_lookup_columns(_Q.c.today))
    .select_from(_Q)
    .join(LicenseRow, LicenseRow.key_digest == _Q.c.digest)
    .outerjoin(Machine, and_(Machine.license_id == LicenseRow.id, Machine.system_id == _Q.c.system_id))
)
_AT = DateTime(timezone=True)
#: The writes of a batch: one call of the function of migrations 0005 and 0006, a
#: statement and so its own transaction on the autocommit connection. It updates the
#: machines one by one in machine-id order (each update locks its row, so two processes'
#: batches never deadlock each other) and inserts the check-ins. As five statements in a
#: pipeline (BEGIN, lock, update, insert, COMMIT) the same writes cost psycopg and
#: PostgreSQL a fifth more per check-in.
PG_BATCH_RECORD = select(
    func.tessera_record_checkins(
        text_array("id", Integer()),
        text_array("at", _AT),
        text_array("delivered", Integer()),
        text_array("checkin_machine_id", Integer()),
        text_array("checkin_at", _AT),
        text_array("outcome", String()),
    )
)


@dataclass(slots=True, eq=False)
class _PgLoop:
    """PostgreSQL: one event loop's check-ins waiting for a batch, and its connections."""

    pending: list[_Job] = field(default_factory=list)
    idle: list[Any] = field(default_factory=list)  # psycopg AsyncConnections of this loop
    started: list[float] = field(default_factory=list)  # loop.time() of each batch in flight
    scheduled: bool = False  # a start is due (soon, or at ``timer``)
    timer: asyncio.TimerHandle | None = None
    looking_up: int = 0  # batches in flight still waiting for their rows
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class CheckinWriter:
    """The check-in batches of one server process: SQLite's writer thread (started on first
    use) and PostgreSQL's connections of each event loop; :meth:`stop` ends both."""

    def __init__(self, db: Database, pepper: bytes, signing_key: SigningKey) -> None:
        self._db = db
        self._pepper = pepper
        self._signing_key = signing_key
        dialect = db.engine.dialect
        self._lookup = Compiled(CHECKIN_LOOKUP, dialect)
        self._record_machine = Compiled(RECORD_MACHINE, dialect)
        self._record_checkin = Compiled(RECORD_CHECKIN.inline(), dialect)  # no RETURNING
        if not db.is_sqlite:
            self._batch_lookup = Compiled(PG_BATCH_LOOKUP, dialect)
            self._batch_record = Compiled(PG_BATCH_RECORD, dialect)
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None  # SQLite's writer thread
        self._start_lock = threading.Lock()
        self._connection: Any = None  # the writer thread's own
        #: SQLite: check-ins that arrived in one turn of each event loop, flushed together.
        self._pending: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        self._loop_connection: Any = None
        self._loop_batches = 0
        self._checkpoint_queued = False
        #: PostgreSQL: each event loop's waiting check-ins and connections.
        self._pg_loops: dict[asyncio.AbstractEventLoop, _PgLoop] = {}
        self._stopped = False

    async def checkin(self, request: CheckinRequest, now: datetime) -> bytes | object:
        """Record a plain check-in and return its signed response (once committed), or
        :data:`FULL_PATH`.

        Raises the service error a client gets (unknown key, bad signature, other
        hardware) or a database error (503).
        """
        loop = asyncio.get_running_loop()
        job = _Job(request, now, loop.create_future(), loop)
        if self._db.is_sqlite:
            gather_turn(self._pending, job, self._flush)
        else:
            self._pg_enqueue(job, loop)
        return await job.future

    def stop(self) -> None:
        self._stopped = True
        loops, self._pg_loops = self._pg_loops, {}
        for pg in loops.values():
            idle, pg.idle = pg.idle, []
            for connection in idle:  # idle, so closing it from here touches nobody's work
                connection.pgconn.finish()
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout=15)
        self._discard_loop_connection(broken=False)

    # ------------------------------------------------------------------ on the event loop

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """SQLite: record this turn's check-ins right here, if the write lock is free *now*.

        A batch on SQLite is a few hundred microseconds of work the GIL serializes anyway;
        handing it to a thread and back cost more than that (10-25 % of the check-in rate,
        ``docs/performance.md``). But the loop must never wait: if another thread of this
        process or another process holds the write lock, the batch goes to the writer
        thread, which waits for its turn. The loop's connection does not checkpoint the WAL
        (a checkpoint writes and syncs the database file); the writer thread does that every
        :data:`CHECKPOINT_EVERY` batches.
        """
        batch = self._pending.pop(loop)
        for start in range(0, len(batch), MAX_BATCH):
            part = batch[start : start + MAX_BATCH]
            try:
                self._run_batch(part, on_loop=True)
            except Busy:
                self._hand_over(part)
                continue
            self._loop_batches += 1
            if self._loop_batches % CHECKPOINT_EVERY == 0 and not self._checkpoint_queued:
                self._checkpoint_queued = True
                self._hand_over([_CHECKPOINT])

    def _loop_connect(self) -> Any:
        if self._loop_connection is None:
            connection = self._db.engine.raw_connection()
            connection.detach()  # its settings below must not reach the pool's other users
            cursor = connection.cursor()
            cursor.execute("PRAGMA busy_timeout=0")  # a lock held elsewhere: Busy at once
            cursor.execute("PRAGMA wal_autocheckpoint=0")
            cursor.close()
            self._loop_connection = connection
        return self._loop_connection

    def _discard_loop_connection(self, *, broken: bool = True) -> None:
        connection, self._loop_connection = self._loop_connection, None
        release_connection(connection, broken=broken)

    # ------------------------------------------------------------------ writer threads

    def _hand_over(self, jobs: Sequence[_Job | object]) -> None:
        self._ensure_started()
        for job in jobs:
            self._queue.put(job)

    def _ensure_started(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="tessera-checkins", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch, stop = take_batch(self._queue, first, MAX_BATCH, _STOP)
                if _CHECKPOINT in batch:
                    batch = [job for job in batch if job is not _CHECKPOINT]
                    self._checkpoint()
                if batch:
                    self._run_batch(batch)  # type: ignore[arg-type]  # only jobs are left
                if stop:
                    return
        finally:
            self._discard_connection(broken=False)

    def _checkpoint(self) -> None:
        """Copy the WAL into the database file without waiting for anyone (``PASSIVE``)."""
        self._checkpoint_queued = False
        try:
            cursor = self._thread_connection().cursor()
            cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
            cursor.close()
        except Exception as exc:  # the next commit of any other connection checkpoints too
            log.warning("WAL checkpoint failed: %s", exc)
            self._discard_connection()

    def _run_batch(self, batch: list[_Job], *, on_loop: bool = False) -> None:
        """SQLite: look up, decide and record ``batch`` in one transaction; settle every job.

        On the writer thread's connection (waiting for the write lock), or ``on_loop`` on
        the event loop's, which raises :class:`~tessera.server.rawsql.Busy` before any work
        if the lock is taken.
        """
        try:
            with self._transaction(on_loop=on_loop) as cursor:
                outcomes, recorded = self._decide_all(batch, self._look_up(cursor, batch))
                if recorded:
                    self._record(cursor, recorded)
        except Busy:
            raise
        except Exception as exc:
            failure = _wrap(exc)
            log.warning("check-in batch of %d not recorded: %s", len(batch), describe_failure(exc))
            settle(batch, [failure] * len(batch), on_loop=on_loop)
            return
        settle(batch, self._answers(batch, outcomes), on_loop=on_loop)

    def _decide_all(
        self, batch: list[_Job], rows: Sequence[Sequence[Any] | None]
    ) -> tuple[list[Any], list[tuple[CheckinVerdict, datetime]]]:
        """Each job's outcome (a verdict, :data:`FULL_PATH` or the error it gets), and the
        verdicts to record."""
        outcomes: list[Any] = []
        recorded: list[tuple[CheckinVerdict, datetime]] = []
        for job, row in zip(batch, rows, strict=True):
            try:
                verdict = self._decide(job, row)
            except ServiceError as exc:
                outcomes.append(exc)
                continue
            except Exception as exc:  # a bug: this check-in fails (500), the batch goes on
                log.exception("check-in failed")
                outcomes.append(exc)
                continue
            outcomes.append(verdict)
            if isinstance(verdict, CheckinVerdict):
                recorded.append((verdict, job.now))
        return outcomes, recorded

    def _answers(self, batch: list[_Job], outcomes: list[Any]) -> list[Any]:
        """The recorded verdicts' signed responses; one signature for all whose agents take
        a batch-signed answer (``core/merkle.py``), one each for the others."""
        answers = list(outcomes)
        together: list[tuple[int, ServerResponse]] = []
        for i, (job, outcome) in enumerate(zip(batch, outcomes, strict=True)):
            if not isinstance(outcome, CheckinVerdict):
                continue
            response = outcome.unsigned_response(job.request, job.now)
            try:
                if job.request.accept == BATCH:
                    together.append((i, response))
                else:
                    answers[i] = response.signed_json(self._signing_key)
            except Exception as exc:  # a bug: this answer fails (500), the check-in is recorded
                log.exception("signing a check-in response failed")
                answers[i] = exc
        if not together:
            return answers
        try:
            if len(together) == 1:
                signed = [together[0][1].signed_json(self._signing_key)]
            else:
                signed = sign_batch([response for _, response in together], self._signing_key)
        except Exception as exc:  # a bug, as above
            log.exception("signing a batch of check-in responses failed")
            signed = [exc] * len(together)  # type: ignore[list-item]  # each fails alone
        for (i, _), body in zip(together, signed, strict=True):
            answers[i] = body
        return answers

    def _look_up(self, cursor: Any, batch: list[_Job]) -> list[Sequence[Any] | None]:
        """SQLite: every job's lookup row, in order (an index lookup each, in process)."""
        try:
            rows = []
            for job in batch:
                values = {
                    "system_id": job.request.system_id,
                    "digest": license_key_digest(job.request.license_key, self._pepper),
                    "today": utc(job.now).date(),
                }
                cursor.execute(self._lookup.sql, self._lookup.params(values))
                rows.append(cursor.fetchone())
            return rows
        except Exception as exc:
            raise _wrap(exc) from exc

    def _decide(self, job: _Job, row: Sequence[Any] | None) -> CheckinVerdict | object:
        if row is None:
            raise NotFound("unknown license key")
        found = CheckinFound._make(row)
        if found.machine_id is None or found.blacklisted:
            return FULL_PATH
        check_checkin(found, job.request, self._pepper)
        verdict = plain_verdict(found, job.request.revision)
        return FULL_PATH if verdict is None else verdict

    def _record(self, cursor: Any, recorded: list[tuple[CheckinVerdict, datetime]]) -> None:
        """SQLite: the machines' and the check-ins' rows, one ``executemany`` each."""
        recorded.sort(key=lambda r: r[0].machine_id)
        try:
            machines = self._record_machine
            checkins = self._record_checkin
            cursor.executemany(
                machines.sql,
                [
                    machines.params(
                        {"machine_id": v.machine_id, "now": now, "delivered": v.delivered_revision}
                    )
                    for v, now in recorded
                ],
            )
            cursor.executemany(
                checkins.sql,
                [
                    checkins.params({"machine_id": v.machine_id, "now": now, "outcome": v.outcome})
                    for v, now in recorded
                ],
            )
        except Exception as exc:
            raise _wrap(exc) from exc

    # ------------------------------------------------------------------ PostgreSQL, on the loop

    def _pg_enqueue(self, job: _Job, loop: asyncio.AbstractEventLoop) -> None:
        self._stopped = False
        pg = self._pg_loop(loop)
        pg.pending.append(job)
        self._pg_schedule(pg, loop)

    def _pg_loop(self, loop: asyncio.AbstractEventLoop) -> _PgLoop:
        """``loop``'s waiting check-ins and connections (closed by :meth:`stop`)."""
        pg = self._pg_loops.get(loop)
        if pg is None:
            pg = self._pg_loops[loop] = _PgLoop()
        return pg

    def _pg_schedule(self, pg: _PgLoop, loop: asyncio.AbstractEventLoop) -> None:
        """Start a batch of the waiting check-ins: after this turn of the loop if none is in
        flight or every one has its rows (up to :data:`PG_OVERLAP`), else once the latest
        has run :data:`PG_STALL_S`."""
        if pg.scheduled or not pg.pending or len(pg.started) >= PG_IN_FLIGHT:
            return  # a batch that gets its rows or ends schedules again
        pg.scheduled = True
        if not pg.started or (pg.looking_up == 0 and len(pg.started) < PG_OVERLAP):
            loop.call_soon(self._pg_start, pg, loop)  # after the other requests of this turn
        else:
            pg.timer = loop.call_at(pg.started[-1] + PG_STALL_S, self._pg_start, pg, loop)

    def _pg_reschedule(self, pg: _PgLoop, loop: asyncio.AbstractEventLoop) -> None:
        """A batch got its rows or ended: a start waiting for it to stall may come now."""
        if pg.timer is not None:
            pg.timer.cancel()
            pg.scheduled, pg.timer = False, None
        self._pg_schedule(pg, loop)

    def _pg_start(self, pg: _PgLoop, loop: asyncio.AbstractEventLoop) -> None:
        pg.scheduled, pg.timer = False, None
        if pg.pending:
            batch = pg.pending[:MAX_BATCH]
            del pg.pending[:MAX_BATCH]
            started = loop.time()
            pg.started.append(started)
            pg.looking_up += 1
            task = loop.create_task(self._pg_batch(pg, batch, loop, started))
            pg.tasks.add(task)
            task.add_done_callback(pg.tasks.discard)
        self._pg_schedule(pg, loop)

    async def _pg_batch(
        self, pg: _PgLoop, batch: list[_Job], loop: asyncio.AbstractEventLoop, started: float
    ) -> None:
        looking = True

        def looked_up() -> None:
            nonlocal looking
            if looking:
                looking = False
                pg.looking_up -= 1
                self._pg_reschedule(pg, loop)

        try:
            await self._run_pg_batch(batch, pg, looked_up)
        finally:
            pg.started.remove(started)
            looked_up()  # if the batch failed before it had its rows
            self._pg_reschedule(pg, loop)

    async def _run_pg_batch(
        self, batch: list[_Job], pg: _PgLoop, looked_up: Callable[[], None] | None = None
    ) -> None:
        """PostgreSQL: look up, decide and record ``batch`` on an asynchronous connection
        of this loop; settle every job.

        Two statements whatever the batch's size (``PG_BATCH_*``), so two round trips (the
        lookup; the writes, which commit by themselves), which the loop spends serving
        other requests instead of a thread waiting for them under the GIL. A connection
        that failed is rolled back and kept, or closed if that fails.
        """
        connection: Any = None
        try:
            for attempt in (1, 2):
                kept = bool(pg.idle)
                connection = pg.idle.pop() if kept else await self._pg_connect()
                try:
                    outcomes = await self._pg_transaction(connection, batch, looked_up)
                    break
                except _Stale:
                    # A kept connection died while idle (the database restarted, a
                    # firewall dropped it): the lookup failed before anything was done,
                    # so the batch runs once more on a new one, as a pool's ping would.
                    await _closed(connection)
                    connection = None
                    if attempt == 2 or not kept:
                        raise
                except BaseException:
                    connection = await _rolled_back(connection)
                    raise
        except Exception as exc:
            cause = exc.__cause__ if isinstance(exc, _Stale) and isinstance(exc.__cause__, Exception) else exc
            failure = _wrap(cause)
            log.warning("check-in batch of %d not recorded: %s", len(batch), describe_failure(cause))
            settle(batch, [failure] * len(batch), on_loop=True)
            return
        except BaseException:  # cancelled: the loop is going away
            settle(
                batch,
                [OperationalError("check-in batch", None, Exception("server stopping"))] * len(batch),
                on_loop=True,
            )
            raise
        finally:
            if connection is not None:
                if not self._stopped:
                    pg.idle.append(connection)
                else:
                    await connection.close()
        settle(batch, self._answers(batch, outcomes), on_loop=True)

    async def _pg_transaction(
        self, connection: Any, batch: list[_Job], looked_up: Callable[[], None] | None
    ) -> list[Any]:
        """The batch's transaction on ``connection``: each job's outcome, once committed.
        :class:`_Stale` if the connection turns out dead at the first statement."""
        async with connection.cursor() as cursor:
            try:
                rows = await self._pg_look_up(cursor, batch)
            except Exception as exc:
                if connection.broken or connection.closed or session_ended(exc):
                    raise _Stale from exc
                raise
            if looked_up is not None:
                looked_up()
            outcomes, recorded = self._decide_all(batch, rows)
            if recorded:
                await self._pg_record(cursor, recorded)
        return outcomes

    async def _pg_connect(self) -> Any:
        connection = await self._db.connect_async()
        try:
            # Autocommit: the lookup needs no transaction (under READ COMMITTED it sees
            # what it would see inside one; the rows it decides on are locked and written
            # by the one statement of the writes, its own transaction).
            await connection.set_autocommit(True)
            await connection.execute(PG_SESSION_SETUP)
        except BaseException:
            await connection.close()
            raise
        return connection

    async def _pg_look_up(self, cursor: Any, batch: list[_Job]) -> list[Sequence[Any] | None]:
        """Every job's lookup row, in order: one statement over arrays for the batch."""
        values = {
            "digest": array_literal(
                license_key_digest(job.request.license_key, self._pepper) for job in batch
            ),
            "system_id": array_literal(job.request.system_id for job in batch),
            "today": array_literal(utc(job.now).date().isoformat() for job in batch),
        }
        await cursor.execute(self._batch_lookup.sql, self._batch_lookup.params(values))
        rows: list[Sequence[Any] | None] = [None] * len(batch)
        for row in await cursor.fetchall():
            n = row[0] - 1  # WITH ORDINALITY counts from 1
            if rows[n] is None:  # as fetchone() of the single lookup: the first row
                rows[n] = row[1:]
        return rows

    async def _pg_record(self, cursor: Any, recorded: list[tuple[CheckinVerdict, datetime]]) -> None:
        """Update the machines, add the check-ins: one statement (:data:`PG_BATCH_RECORD`,
        which takes the row locks in machine-id order itself) for any batch, committed by
        itself. A machine twice in one batch keeps its last check-in,
        as one statement after the other would leave it."""
        stamped = [(v, utc(now).isoformat()) for v, now in recorded]
        last = {v.machine_id: (v, at) for v, at in stamped}
        values = {
            "id": array_literal(last),
            "at": array_literal(at for _, at in last.values()),
            "delivered": array_literal(v.delivered_revision for v, _ in last.values()),
            "checkin_machine_id": array_literal(v.machine_id for v, _ in stamped),
            "checkin_at": array_literal(at for _, at in stamped),
            "outcome": array_literal(v.outcome for v, _ in stamped),
        }
        await cursor.execute(self._batch_record.sql, self._batch_record.params(values))

    # ------------------------------------------------------------------ the connection

    @contextmanager
    def _transaction(self, *, on_loop: bool) -> Iterator[Any]:
        """One batch's transaction (:func:`tessera.server.rawsql.transaction`: SQLite's write
        lock, commit or rollback); its cursor. A connection that broke is given up."""
        connection = self._loop_connect() if on_loop else self._thread_connection()
        discard = self._discard_loop_connection if on_loop else self._discard_connection
        try:
            with transaction(self._db, connection, wait=not on_loop) as tx:
                yield tx.cursor
        except Broken as broken:
            discard()
            raise broken.__cause__ or broken from None
        except DBAPIError as exc:
            if exc.connection_invalidated:
                discard()
            raise

    def _thread_connection(self) -> Any:
        """The writer thread's connection, kept from batch to batch."""
        if self._connection is None:
            self._connection = self._db.engine.raw_connection()
        return self._connection

    def _discard_connection(self, *, broken: bool = True) -> None:
        """Give up this thread's connection: invalidated if it may be broken, else closed."""
        connection, self._connection = self._connection, None
        release_connection(connection, broken=broken)


class _Stale(Exception):
    """PostgreSQL: the connection was found dead at a batch's first statement."""


async def _closed(connection: Any) -> None:
    with contextlib.suppress(Exception):
        await connection.close()


async def _rolled_back(connection: Any) -> Any:
    """``connection`` after rolling back a failed batch; None (and closed) if it is broken."""
    try:
        if not connection.broken and not connection.closed:
            await connection.rollback()
            return connection
    except Exception:
        log.debug("rollback failed; the connection is dropped", exc_info=True)
    await _closed(connection)
    return None


def _wrap(exc: Exception) -> DBAPIError:
    """The driver's error as SQLAlchemy's, so the app's outage handler answers 503."""
    return exc if isinstance(exc, DBAPIError) else OperationalError("check-in batch", None, exc)
