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
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, cast

from sqlalchemy import Dialect
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from tessera.core.clock import utc
from tessera.core.licensekey import license_key_digest
from tessera.core.protocol import CheckinRequest
from tessera.server.activation import (
    CHECKIN_LOOKUP,
    RECORD_CHECKIN,
    RECORD_MACHINE,
    CheckinFound,
    CheckinVerdict,
    check_checkin,
    plain_verdict,
)
from tessera.server.errors import NotFound, ServiceError
from tessera.server.storage import Database, begin_immediate

__all__ = ["FULL_PATH", "CheckinWriter"]

log = logging.getLogger("tessera.server")

#: Answer of :meth:`CheckinWriter.checkin` for a check-in the plain path does not handle.
FULL_PATH: Final = object()
#: Check-ins per transaction at most: bounds how long one commit holds SQLite's write lock.
MAX_BATCH = 256
_STOP: Final = object()


class _Compiled:
    """A statement compiled once for the dialect, run on a raw DB-API cursor.

    Parameters go through the column types' own bind processors (SQLite stores datetimes
    as text in SQLAlchemy's format, PostgreSQL gets them as they are), so rows written here
    read back exactly like rows the ORM wrote. Literals in the statement (a ``'container'``,
    a ``NULL``) are bound parameters too: their values are taken once, here.
    """

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        self.sql = compiled.string
        self.positional = compiled.positional
        self.names: tuple[str, ...] = tuple(compiled.positiontup or ())
        self.processors: dict[str, Callable[[Any], Any]] = {}
        self.fixed: dict[str, Any] = {}
        for bind, name in compiled.bind_names.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self.processors[name] = processor
            if not bind.required:
                self.fixed[name] = processor(bind.value) if processor is not None else bind.value
        self.given = frozenset(name for name in compiled.bind_names.values() if name not in self.fixed)

    def params(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        if values.keys() != self.given:
            raise ValueError(f"parameters {sorted(values)} given, {sorted(self.given)} expected")
        processed = dict(self.fixed)
        for name, value in values.items():
            processor = self.processors.get(name)
            processed[name] = processor(value) if processor is not None else value
        if self.positional:
            return tuple(processed[name] for name in self.names)
        return processed


@dataclass(slots=True)
class _Job:
    request: CheckinRequest
    now: datetime
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


class CheckinWriter:
    """The writer thread of one server process (started on first use, stopped with the app)."""

    def __init__(self, db: Database, pepper: bytes, *, threads: int = 3) -> None:
        self._db = db
        self._pepper = pepper
        dialect = db.engine.dialect
        self._lookup = _Compiled(CHECKIN_LOOKUP, dialect)
        self._record_machine = _Compiled(RECORD_MACHINE, dialect)
        self._record_checkin = _Compiled(RECORD_CHECKIN.inline(), dialect)  # no RETURNING
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        #: SQLite has one writer at a time anyway; PostgreSQL overlaps one batch's commit
        #: (a WAL flush) with the next batch's work. Batches take row locks in machine-id
        #: order, so concurrent ones never deadlock.
        self._thread_count = 1 if db.is_sqlite else threads
        self._start_lock = threading.Lock()
        self._local = threading.local()  # each writer thread's own connection

    async def checkin(self, request: CheckinRequest, now: datetime) -> CheckinVerdict | object:
        """Record a plain check-in and return its verdict (committed), or :data:`FULL_PATH`.

        Raises the service error a client gets (unknown key, bad signature, other
        hardware) or a database error (503).
        """
        self._ensure_started()
        loop = asyncio.get_running_loop()
        job = _Job(request, now, loop.create_future(), loop)
        self._queue.put(job)
        return await job.future

    def stop(self) -> None:
        with self._start_lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(_STOP)
        for thread in threads:
            thread.join(timeout=15)

    # ------------------------------------------------------------------ writer threads

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
                batch = [first]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is _STOP:
                        stop = True
                        break
                    batch.append(more)
                self._run_batch(batch)  # type: ignore[arg-type]  # only jobs besides _STOP
                if stop:
                    return
        finally:
            self._discard_connection(broken=False)

    def _run_batch(self, batch: list[_Job]) -> None:
        outcomes: list[Any] = []
        try:
            with self._transaction() as cursor:
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
        except Exception as exc:
            failure = _wrap(exc)
            log.warning("check-in batch of %d not recorded: %s", len(batch), exc)
            for job in batch:
                _deliver(job, failure, error=True)
            return
        for job, outcome in zip(batch, outcomes, strict=True):
            _deliver(job, outcome, error=isinstance(outcome, BaseException))

    def _look_up(self, cursor: Any, batch: list[_Job]) -> list[Sequence[Any] | None]:
        """Every job's lookup row, in order: on PostgreSQL in one pipeline (one round trip
        for the batch instead of one per check-in)."""
        params = [
            self._lookup.params(
                {
                    "system_id": job.request.system_id,
                    "digest": license_key_digest(job.request.license_key, self._pepper),
                    "today": utc(job.now).date(),
                }
            )
            for job in batch
        ]
        try:
            if self._db.is_sqlite or len(batch) == 1:
                rows = []
                for p in params:
                    cursor.execute(self._lookup.sql, p)
                    rows.append(cursor.fetchone())
                return rows
            # psycopg pipelines executemany; with returning=True each statement's rows
            # stay readable, one result set after the other.
            cursor.executemany(self._lookup.sql, params, returning=True)
            rows = [cursor.fetchone()]
            while cursor.nextset():
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
        verdict = plain_verdict(found)
        return FULL_PATH if verdict is None else verdict

    def _record(self, cursor: Any, recorded: list[tuple[CheckinVerdict, datetime]]) -> None:
        recorded.sort(key=lambda r: r[0].machine_id)  # one lock order for every process
        machines = self._record_machine
        checkins = self._record_checkin
        try:
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

    # ------------------------------------------------------------------ the connection

    def _transaction(self) -> _Transaction:
        if getattr(self._local, "connection", None) is None:
            self._local.connection = self._db.engine.raw_connection()
        return _Transaction(self, self._local.connection)

    def _discard_connection(self, *, broken: bool = True) -> None:
        """Give up this thread's connection: invalidated if it may be broken, else closed."""
        connection, self._local.connection = getattr(self._local, "connection", None), None
        if connection is not None:
            try:
                connection.invalidate() if broken else connection.close()
            except Exception:  # already broken: nothing more to release
                log.debug("releasing the check-in connection failed", exc_info=True)


class _Transaction:
    """One batch's transaction on the writer's connection, with SQLite's write lock."""

    def __init__(self, writer: CheckinWriter, connection: Any) -> None:
        self._writer = writer
        self._connection = connection
        self._locked = False

    def __enter__(self) -> Any:
        db = self._writer._db
        try:
            self._locked = db.acquire_write_lock()  # SQLite only
            cursor = self._connection.cursor()
            if db.is_sqlite:
                begin_immediate(cursor.execute, db.busy_timeout)
            # psycopg opens the transaction by itself with the first statement
        except BaseException:
            self._release()
            self._writer._discard_connection()
            raise
        return cursor

    def __exit__(self, kind: object, exc: BaseException | None, _tb: object) -> None:
        # The DB-API's commit/rollback end the transaction on both drivers (sqlite3 ends
        # an open one even in its autocommit mode, which the engine sets).
        try:
            if exc is None:
                self._connection.commit()
            else:
                self._rollback()
        except BaseException:
            self._rollback()
            self._writer._discard_connection()
            raise
        finally:
            self._release()

    def _rollback(self) -> None:
        try:
            self._connection.rollback()
        except Exception:
            self._writer._discard_connection()

    def _release(self) -> None:
        if self._locked:
            self._locked = False
            self._writer._db.release_write_lock()


def _wrap(exc: Exception) -> DBAPIError:
    """The driver's error as SQLAlchemy's, so the app's outage handler answers 503."""
    return exc if isinstance(exc, DBAPIError) else OperationalError("check-in batch", None, exc)


def _deliver(job: _Job, value: Any, *, error: bool) -> None:
    def settle() -> None:
        if job.future.done():  # the client went away and the request was cancelled
            return
        if error:
            job.future.set_exception(value)
        else:
            job.future.set_result(value)

    with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
        job.loop.call_soon_threadsafe(settle)
