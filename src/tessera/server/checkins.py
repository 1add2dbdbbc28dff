"""The check-in hot path: plain check-ins recorded by one writer thread, a commit per batch.

Check-ins are most of a license server's traffic, and each needs a lookup, two small
writes and a commit. Run one per thread-pool hop with a commit each (the general path of
the admin API), the server spends its time switching threads under the GIL, queueing on
SQLite's write lock and committing. Here one thread per process takes whatever check-ins
queued while it was busy, runs them in one transaction with plain DB-API statements
(compiled once from the same SQLAlchemy statements, so the SQL and the type conversions
stay those of the models) and commits once. Nothing is answered before the commit that
records it, so an acknowledged check-in is never lost; a batch that cannot commit fails
every check-in in it with 503, so none is acknowledged wrongly.

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
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    Date,
    Integer,
    String,
    and_,
    bindparam,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
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
from tessera.server.models import Checkin, LicenseRow, Machine, UtcDateTime
from tessera.server.rawsql import Broken, Busy, Compiled, transaction
from tessera.server.storage import Database
from tessera.server.writer import Job, release_connection, settle, take_batch

_Job = Job[CheckinRequest]

__all__ = ["FULL_PATH", "CheckinWriter"]

log = logging.getLogger("tessera.server")

#: Answer of :meth:`CheckinWriter.checkin` for a check-in the plain path does not handle.
FULL_PATH: Final = object()
#: Check-ins per transaction at most: bounds how long one commit holds SQLite's write lock.
MAX_BATCH = 256
#: SQLite: after this many batches committed on the event loop (whose connection does not
#: checkpoint, see :meth:`CheckinWriter._flush`), the writer thread checkpoints the WAL.
CHECKPOINT_EVERY = 32
_STOP: Final = object()
_CHECKPOINT: Final = object()

# PostgreSQL: a batch as three statements over arrays, whatever its size. Per-row statements
# (even pipelined) cost psycopg and the database a parse, bind and result each, which was
# most of a batch's time. The lookup is CHECKIN_LOOKUP per array element (same columns, in
# CheckinFound's order, after the element's 1-based position ``n``).
_Q = (
    func.unnest(
        bindparam("digests", type_=ARRAY(String)),
        bindparam("system_ids", type_=ARRAY(String)),
        bindparam("todays", type_=ARRAY(Date)),
    )
    .table_valued("digest", "system_id", "today", with_ordinality="n")
    .render_derived(name="q")
)
PG_BATCH_LOOKUP = (
    select(_Q.c.n, *checkin_lookup_columns(_Q.c.today))
    .select_from(_Q)
    .join(LicenseRow, LicenseRow.key_digest == _Q.c.digest)
    .outerjoin(Machine, and_(Machine.license_id == LicenseRow.id, Machine.system_id == _Q.c.system_id))
)
#: Row locks in machine-id order first: two processes' batches never deadlock each other.
PG_BATCH_LOCK = (
    select(Machine.id)
    .where(Machine.id == func.any(bindparam("ids", type_=ARRAY(Integer))))
    .order_by(Machine.id)
    .with_for_update()
)
_V = (
    func.unnest(
        bindparam("ids", type_=ARRAY(Integer)),
        bindparam("nows", type_=ARRAY(UtcDateTime())),
        bindparam("delivered", type_=ARRAY(Integer)),
    )
    .table_valued("id", "now", "delivered")
    .render_derived(name="v")
)
PG_BATCH_RECORD_MACHINES = (
    update(Machine)
    .where(Machine.id == _V.c.id)
    .values(last_checkin_at=_V.c.now, delivered_revision=_V.c.delivered, checkpoint_overdue_at=None)
)
_C = (
    func.unnest(
        bindparam("ids", type_=ARRAY(Integer)),
        bindparam("nows", type_=ARRAY(UtcDateTime())),
        bindparam("outcomes", type_=ARRAY(String)),
    )
    .table_valued("machine_id", "at", "outcome")
    .render_derived(name="c")
)
PG_BATCH_RECORD_CHECKINS = insert(Checkin).from_select(
    ["machine_id", "at", "outcome"], select(_C.c.machine_id, _C.c.at, _C.c.outcome)
)


class CheckinWriter:
    """The writer thread of one server process (started on first use, stopped with the app)."""

    def __init__(self, db: Database, pepper: bytes, signing_key: SigningKey, *, threads: int = 3) -> None:
        self._db = db
        self._pepper = pepper
        self._signing_key = signing_key
        dialect = db.engine.dialect
        self._lookup = Compiled(CHECKIN_LOOKUP, dialect)
        self._record_machine = Compiled(RECORD_MACHINE, dialect)
        self._record_checkin = Compiled(RECORD_CHECKIN.inline(), dialect)  # no RETURNING
        if not db.is_sqlite:
            self._batch_lookup = Compiled(PG_BATCH_LOOKUP, dialect)
            self._batch_lock = Compiled(PG_BATCH_LOCK, dialect)
            self._batch_machines = Compiled(PG_BATCH_RECORD_MACHINES, dialect)
            self._batch_checkins = Compiled(PG_BATCH_RECORD_CHECKINS, dialect)
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        #: SQLite has one writer at a time anyway; PostgreSQL overlaps one batch's commit
        #: (a WAL flush) with the next batch's work. Batches take row locks in machine-id
        #: order, so concurrent ones never deadlock.
        self._thread_count = 1 if db.is_sqlite else threads
        self._start_lock = threading.Lock()
        self._local = threading.local()  # each writer thread's own connection
        #: SQLite: check-ins that arrived in one turn of each event loop, flushed together.
        self._pending: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        self._loop_connection: Any = None
        self._loop_batches = 0
        self._checkpoint_queued = False

    async def checkin(self, request: CheckinRequest, now: datetime) -> bytes | object:
        """Record a plain check-in and return its signed response (once committed), or
        :data:`FULL_PATH`.

        Raises the service error a client gets (unknown key, bad signature, other
        hardware) or a database error (503).
        """
        loop = asyncio.get_running_loop()
        job = _Job(request, now, loop.create_future(), loop)
        if self._db.is_sqlite:
            pending = self._pending.get(loop)
            if pending is None:
                self._pending[loop] = [job]
                loop.call_soon(self._flush, loop)  # after the other requests of this turn
            else:
                pending.append(job)
        else:
            self._hand_over([job])
        return await job.future

    def stop(self) -> None:
        with self._start_lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(_STOP)
        for thread in threads:
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
        if not self._threads:
            with self._start_lock:
                if not self._threads:
                    for n in range(self._thread_count):
                        thread = threading.Thread(target=self._run, name=f"tessera-checkins-{n}", daemon=True)
                        thread.start()
                        self._threads.append(thread)

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
        """Look up, decide and record ``batch`` in one transaction; settle every job.

        On the writer thread's connection (waiting for the write lock), or ``on_loop`` on
        the event loop's, which raises :class:`~tessera.server.rawsql.Busy` before any work
        if the lock is taken.
        """
        outcomes: list[Any] = []
        try:
            with self._transaction(on_loop=on_loop) as cursor:
                recorded: list[tuple[CheckinVerdict, datetime]] = []
                for job, row in zip(batch, self._look_up(cursor, batch), strict=True):
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
                if recorded:
                    self._record(cursor, recorded)
        except Busy:
            raise
        except Exception as exc:
            failure = _wrap(exc)
            log.warning("check-in batch of %d not recorded: %s", len(batch), exc)
            settle(batch, [failure] * len(batch), on_loop=on_loop)
            return
        settle(batch, self._answers(batch, outcomes), on_loop=on_loop)

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
        """Every job's lookup row, in order: on PostgreSQL one statement for the batch."""
        try:
            if not self._db.is_sqlite:
                return self._look_up_together(cursor, batch)
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

    def _look_up_together(self, cursor: Any, batch: list[_Job]) -> list[Sequence[Any] | None]:
        values = {
            "digests": [license_key_digest(job.request.license_key, self._pepper) for job in batch],
            "system_ids": [job.request.system_id for job in batch],
            "todays": [utc(job.now).date() for job in batch],
        }
        cursor.execute(self._batch_lookup.sql, self._batch_lookup.params(values))
        rows: list[Sequence[Any] | None] = [None] * len(batch)
        for row in cursor.fetchall():
            n = row[0] - 1  # WITH ORDINALITY counts from 1
            if rows[n] is None:  # as fetchone() of the single lookup: the first row
                rows[n] = row[1:]
        return rows

    def _decide(self, job: _Job, row: Sequence[Any] | None) -> CheckinVerdict | object:
        if row is None:
            raise NotFound("unknown license key")
        found = CheckinFound._make(row)
        if found.machine_id is None or found.blacklisted:
            return FULL_PATH
        check_checkin(found, job.request, self._pepper)
        verdict = plain_verdict(found)
        return FULL_PATH if verdict is None else verdict

    def _record(self, cursor: Any, recorded: list[tuple[CheckinVerdict, datetime]]) -> None:
        recorded.sort(key=lambda r: r[0].machine_id)  # one lock order for every process
        try:
            if not self._db.is_sqlite:
                self._record_together(cursor, recorded)
                return
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

    def _record_together(self, cursor: Any, recorded: list[tuple[CheckinVerdict, datetime]]) -> None:
        """PostgreSQL: lock the machines in id order, update them, add the check-ins; three
        statements for any batch. A machine twice in one batch keeps its last check-in, as
        one statement after the other would leave it."""
        last = {v.machine_id: (v, now) for v, now in recorded}
        ids = list(last)
        cursor.execute(self._batch_lock.sql, self._batch_lock.params({"ids": ids}))
        cursor.execute(
            self._batch_machines.sql,
            self._batch_machines.params(
                {
                    "ids": ids,
                    "nows": [now for _, now in last.values()],
                    "delivered": [v.delivered_revision for v, _ in last.values()],
                }
            ),
        )
        cursor.execute(
            self._batch_checkins.sql,
            self._batch_checkins.params(
                {
                    "ids": [v.machine_id for v, _ in recorded],
                    "nows": [now for _, now in recorded],
                    "outcomes": [v.outcome for v, _ in recorded],
                }
            ),
        )

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
        """This writer thread's connection, kept from batch to batch."""
        if getattr(self._local, "connection", None) is None:
            self._local.connection = self._db.engine.raw_connection()
        return self._local.connection

    def _discard_connection(self, *, broken: bool = True) -> None:
        """Give up this thread's connection: invalidated if it may be broken, else closed."""
        connection, self._local.connection = getattr(self._local, "connection", None), None
        release_connection(connection, broken=broken)


def _wrap(exc: Exception) -> DBAPIError:
    """The driver's error as SQLAlchemy's, so the app's outage handler answers 503."""
    return exc if isinstance(exc, DBAPIError) else OperationalError("check-in batch", None, exc)
