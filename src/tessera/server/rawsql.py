"""SQLAlchemy statements compiled once and run on a plain DB-API connection.

For the request paths that run many times a second (activations, check-in batches).
Executing a prepared Core statement through SQLAlchemy costs 15-30 us of Python per
statement (cache key, execution context, result object), a plain cursor about 1.5 us; a
session around it another 75 us.
So the statements are still written with SQLAlchemy against the models (the SQL and the
column types' conversions are the models'), compiled once per dialect, and run here.

What SQLAlchemy would have done around them is kept: values go through the column types'
bind and result processors (SQLite keeps dates and timestamps as text in SQLAlchemy's
format, booleans as integers), so rows written here read back exactly like the ORM's;
driver errors become SQLAlchemy's (``IntegrityError`` answers 409, the others 503 through
the app's outage handlers); SQLite writers take the process's write lock and ``BEGIN
IMMEDIATE`` exactly as :meth:`tessera.server.storage.Database.write` does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import Dialect, String, bindparam, func
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.selectable import CompoundSelect, Select
from sqlalchemy.types import TypeEngine

from tessera.server.storage import Database, begin_immediate

__all__ = [
    "Broken",
    "Busy",
    "Compiled",
    "RawTransaction",
    "array_literal",
    "compiled",
    "pipelining",
    "session_ended",
    "text_array",
    "transaction",
    "unnest_arrays",
]

log = logging.getLogger("tessera.server")


class Compiled:
    """``statement`` compiled for ``dialect``: its SQL, how to bind values, how to read rows.

    Literals in the statement (a ``'container'``, a ``NULL``) are bound parameters too:
    their values are processed once, here.
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
        # Per value of the DB-API parameters, in their order: name, processor, fixed?
        order = self.names if self.positional else tuple(dict.fromkeys(compiled.bind_names.values()))
        self._plan = tuple((name, self.processors.get(name), name in self.fixed) for name in order)
        self.results: tuple[Callable[[Any], Any] | None, ...] = ()
        if isinstance(statement, Select | CompoundSelect):
            self.results = tuple(
                column.type.dialect_impl(dialect).result_processor(dialect, None)
                for column in statement.selected_columns
            )
        self._converting = tuple((i, p) for i, p in enumerate(self.results) if p is not None)

    def params(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        if values.keys() != self.given:
            raise ValueError(f"parameters {sorted(values)} given, {sorted(self.given)} expected")
        fixed = self.fixed
        processed = [
            fixed[name] if is_fixed else values[name] if processor is None else processor(values[name])
            for name, processor, is_fixed in self._plan
        ]
        if self.positional:
            return processed
        return dict(zip((name for name, _, _ in self._plan), processed, strict=True))

    def row(self, raw: Sequence[Any]) -> Sequence[Any]:
        """``raw`` with the columns that need it converted (most need nothing)."""
        if not self._converting:
            return raw
        row = list(raw)
        for i, processor in self._converting:
            if row[i] is not None:
                row[i] = processor(row[i])
        return row


_COMPILED: dict[tuple[int, str, str], tuple[ClauseElement, Compiled]] = {}


def compiled(statement: ClauseElement, dialect: Dialect) -> Compiled:
    """``statement`` compiled for ``dialect``'s kind, once per process.

    Meant for statements built once at import; the statement itself is kept with its
    compiled form, so a statement that went away can never lend its SQL to a new one that
    happens to get the same ``id``.
    """
    key = (id(statement), dialect.name, dialect.driver)
    entry = _COMPILED.get(key)
    if entry is None or entry[0] is not statement:
        entry = _COMPILED[key] = (statement, Compiled(statement, dialect))
    return entry[1]


# PostgreSQL: a batch's values travel as arrays, one statement whatever the batch's size.
# Each array is sent as one text parameter in PostgreSQL's array syntax (array_literal) and
# cast in the statement: psycopg's own array dumper, in Python, cost about 100 us per
# statement for 16 elements.
def text_array(param: str, kind: TypeEngine[Any]) -> Any:
    """The array parameter ``param``, sent as text (:func:`array_literal`) and cast to ``kind[]``."""
    return sql_cast(bindparam(param, type_=String), ARRAY(kind))


def unnest_arrays(name: str, *arrays: tuple[str, TypeEngine[Any]], ordinality: str | None = None) -> Any:
    """``unnest()`` of the array parameters ``arrays`` (each a :func:`text_array`) as a
    table ``name`` whose columns are named after them: a batch's rows as one parameter per
    column, whatever the batch's size (``WITH ORDINALITY`` as ``ordinality``, from 1)."""
    return (
        func.unnest(*(text_array(param, kind) for param, kind in arrays))
        .table_valued(*(param for param, _ in arrays), with_ordinality=ordinality)
        .render_derived(name=name)
    )


def array_literal(values: Iterable[object]) -> str:
    """``values`` as a PostgreSQL array literal (``{"a","b"}``), every element quoted."""
    return "{" + ",".join('"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


class RawTransaction:
    """The statements of one write transaction, on one DB-API cursor."""

    def __init__(self, connection: Any, cursor: Any, dialect: Dialect) -> None:
        self._connection = connection
        self._cursor = cursor
        self._dialect = dialect
        self.is_postgresql = dialect.name == "postgresql"

    @property
    def cursor(self) -> Any:
        """The DB-API cursor, for statements run directly (``executemany`` of a batch)."""
        return self._cursor

    def one(self, statement: ClauseElement, **values: Any) -> Sequence[Any] | None:
        """The first row (converted), or None."""
        prepared = compiled(statement, self._dialect)
        row = self._fetch(prepared, values, many=False)
        return None if row is None else prepared.row(row)

    def all(self, statement: ClauseElement, **values: Any) -> list[Sequence[Any]]:
        prepared = compiled(statement, self._dialect)
        return [prepared.row(row) for row in self._fetch(prepared, values, many=True)]

    def _fetch(self, statement: Compiled, values: Mapping[str, Any], *, many: bool) -> Any:
        cursor = self._execute(statement, values)
        try:
            # In a pipeline (PostgreSQL) the fetch is where the statements queued before
            # this one are sent, so their errors surface here.
            return cursor.fetchall() if many else cursor.fetchone()
        except self._dialect.loaded_dbapi.Error as exc:
            raise self.wrapped(exc, statement.sql) from exc

    def run(self, statement: ClauseElement, **values: Any) -> None:
        self._execute(compiled(statement, self._dialect), values)

    def _execute(self, statement: Compiled, values: Mapping[str, Any]) -> Any:
        params = statement.params(values)
        try:
            self._cursor.execute(statement.sql, params)
        except self._dialect.loaded_dbapi.Error as exc:
            raise self.wrapped(exc, statement.sql, params) from exc
        return self._cursor

    def wrapped(self, exc: Exception, sql: str | None = None, params: Any = None) -> DBAPIError:
        """The driver's error as SQLAlchemy's (``IntegrityError``, ``OperationalError``,
        ...), marked ``connection_invalidated`` when the connection is gone."""
        gone = session_ended(exc) or self._dialect.is_disconnect(
            cast(Any, exc), self._connection, self._cursor
        )
        error = DBAPIError.instance(
            sql, params, exc, self._dialect.loaded_dbapi.Error, connection_invalidated=gone
        )
        return cast(DBAPIError, error)


def session_ended(exc: BaseException) -> bool:
    """Did PostgreSQL end this connection's session (SQLSTATE class 08, or 57P: shut down,
    restarted, the backend terminated, an idle timeout)?

    The server says so in a last error message before it closes the socket. psycopg may
    hand that message over as a statement's result before it notices the socket closed, so
    the connection does not yet look broken (SQLAlchemy's ``is_disconnect`` only asks
    that): without this a kept connection that died while idle failed its next request
    instead of being replaced, depending on which of the two the driver saw first.
    """
    state = getattr(exc, "sqlstate", None)
    return isinstance(state, str) and state.startswith(("08", "57P"))


class Broken(Exception):
    """The connection of a failed transaction could not even roll back: drop it."""


class Busy(Exception):
    """SQLite's write lock is taken this instant (only raised when told not to wait)."""


@contextmanager
def transaction(
    db: Database, connection: Any, *, wait: bool = True, pipelined: bool = False
) -> Iterator[RawTransaction]:
    """One write transaction on ``connection`` (a DB-API connection the caller keeps):
    committed when the block ends, rolled back on any error.

    SQLite: this process's write lock, then ``BEGIN IMMEDIATE`` (polling while another
    process writes), as :meth:`Database.write`; the "locked" outage after the same wait.
    With ``wait=False`` (the event loop, which must never wait) :class:`Busy` instead, at
    once and before any work, if either lock is taken; ``connection`` must then have a
    busy timeout of 0. If the rollback fails too, :class:`Broken` is raised from the
    error: the caller must not use the connection again.

    PostgreSQL with ``pipelined`` (``connection`` in autocommit, see :func:`pipelining`):
    ``BEGIN``, the statements and ``COMMIT`` go in psycopg's pipeline mode, so a round
    trip is made only where a result is read (a row fetched) and once at the end; the
    statements in between travel with the next read. ``psycopg`` would otherwise send its
    own ``BEGIN`` as a round trip, and every statement its own. A pipelined transaction
    that fails closes its connection and raises :class:`Broken` from the error.
    """
    if pipelined and not db.is_sqlite:
        with _pipelined(db, connection) as tx:
            yield tx
        return
    dialect = db.engine.dialect
    dbapi_error = dialect.loaded_dbapi.Error
    if wait:
        locked = db.acquire_write_lock()
    else:
        locked = db.try_write_lock()
        if not locked:
            raise Busy
    try:
        tx = _on_new_cursor(connection, dialect)
        cursor = tx.cursor
        try:
            if db.is_sqlite:
                try:
                    if wait:
                        begin_immediate(cursor.execute, db.busy_timeout)
                    else:
                        cursor.execute("BEGIN IMMEDIATE")
                except dbapi_error as exc:
                    if not wait and ("locked" in str(exc) or "busy" in str(exc)):
                        raise Busy from exc
                    raise tx.wrapped(exc, "BEGIN IMMEDIATE") from exc
            # psycopg opens the transaction by itself with the first statement
            yield tx
            try:
                connection.commit()
            except dbapi_error as exc:
                raise tx.wrapped(exc, "COMMIT") from exc
        except BaseException as exc:
            _roll_back(connection.rollback, exc)
            raise
    finally:
        if locked:
            db.release_write_lock()


def pipelining(connection: Any) -> Any:
    """``connection`` (a pool's PostgreSQL connection, kept by its caller) made ready for
    ``transaction(..., pipelined=True)``: out of the pool, in autocommit."""
    connection.detach()  # autocommit must not reach the pool's other users
    connection.dbapi_connection.autocommit = True
    return connection


@contextmanager
def _pipelined(db: Database, connection: Any) -> Iterator[RawTransaction]:
    dialect = db.engine.dialect
    dbapi_error = dialect.loaded_dbapi.Error
    driver = connection.dbapi_connection  # psycopg's own (what a detached fairy still has)
    tx = _on_new_cursor(connection, dialect)
    cursor = tx.cursor
    try:
        try:
            with driver.pipeline():
                try:
                    cursor.execute("BEGIN")
                except dbapi_error as exc:  # nothing done yet: a dead connection may be retried
                    raise tx.wrapped(exc, "BEGIN") from exc
                yield tx
                cursor.execute("COMMIT")
        except dbapi_error as exc:
            # The pipeline's end, where the last statements and COMMIT are sent: whichever
            # failed there, the commit may have happened or not (a connection lost after
            # sending it), as for a COMMIT. (The reads' errors come wrapped already.)
            raise tx.wrapped(exc, "COMMIT") from exc
    except BaseException as exc:
        # Not used again after a failure: psycopg's record of the statements it prepared
        # on the connection does not always survive an aborted pipeline (seen here: after
        # one activation's insert failed, a later transaction on the rolled-back
        # connection failed with 'prepared statement "_pg3_1" does not exist', now and
        # then). Closing ends the transaction too; the caller drops the connection.
        with contextlib.suppress(Exception):
            driver.close()
        raise Broken from exc


def _on_new_cursor(connection: Any, dialect: Dialect) -> RawTransaction:
    """A transaction's statements on a new cursor of ``connection``; :class:`Broken` if
    not even a cursor can be had."""
    try:
        cursor = connection.cursor()
    except dialect.loaded_dbapi.Error as exc:
        raise Broken from RawTransaction(connection, None, dialect).wrapped(exc)
    return RawTransaction(connection, cursor, dialect)


def _roll_back(rollback: Callable[[], object], failure: BaseException) -> None:
    """Roll back after ``failure``; :class:`Broken` (from it) if that fails too."""
    try:
        rollback()
    except Exception:
        log.debug("rollback failed; the connection is dropped", exc_info=True)
        raise Broken from failure
