"""Database access: engines for SQLite and PostgreSQL, read and write transactions.

SQLite is the embedded default: WAL journal (readers never block the writer),
``synchronous=NORMAL`` (no fsync per commit in WAL mode, still crash-safe) and a busy
timeout. Every write transaction starts with ``BEGIN IMMEDIATE`` so two writers never both
read "one machine slot left" and both take it: SQLite then serializes them, also across
processes. In one process a lock additionally queues writers in Python instead of letting
them spin in SQLite's busy handler.

On PostgreSQL (``postgresql+psycopg://``) the services take row locks
(``SELECT ... FOR UPDATE``) where a limit must hold, so several server processes can share
one database.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "Database",
    "begin_immediate",
    "describe_db_error",
    "describe_db_url",
    "dialect_insert",
    "normalize_db_url",
    "sqlite_file",
]

#: How long a SQLite writer waits for the lock (first its turn in this process, then the
#: file lock) before the request fails with 503: well under the agent's 15 s HTTP timeout,
#: so a database locked by another process is reported, not a hang. ``?timeout=<seconds>``
#: on the database URL sets another value (as SQLAlchemy's own SQLite URLs do).
SQLITE_BUSY_TIMEOUT_S = 5.0
#: How long a PostgreSQL connection attempt may take (``?connect_timeout=`` overrides):
#: an unreachable host that drops packets answers 503 instead of holding the request.
PG_CONNECT_TIMEOUT_S = 5
#: TCP settings of every PostgreSQL connection (libpq parameters; the URL's own win). A
#: database host that vanishes without closing its connections (power cut, a firewall
#: dropping state) would otherwise leave a request waiting on a dead socket for the
#: kernel's two hours: keepalive probes find an idle dead peer within about a minute, and
#: ``tcp_user_timeout`` fails a request whose data goes unacknowledged for 20 s, so it
#: ends in 503 and the pool replaces the connection.
PG_TCP_SETTINGS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 20_000,
}
SQLITE_BUSY_TIMEOUT_MS = int(SQLITE_BUSY_TIMEOUT_S * 1000)
#: A writer waiting for another process's write transaction asks again this often. SQLite's
#: own busy handler backs off to 100 ms between tries, so under steady writes from a second
#: server process a waiter kept losing the file lock to that process's next writer and ran
#: into its timeout (503). Short, even polls share the lock fairly between processes. The
#: connection's own busy timeout is kept short to match; in WAL mode nothing but starting a
#: write transaction waits for a lock.
SQLITE_WRITE_POLL_S = 0.002
SQLITE_CONNECTION_BUSY_MS = 20


def dialect_insert(session: Session) -> Callable[[Any], Any]:
    """``insert`` of the session's dialect, for ``ON CONFLICT`` (PostgreSQL and SQLite
    spell it alike in SQLAlchemy, but each through its own construct)."""
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


def normalize_db_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` as psycopg 3 URLs; check the URL parses."""
    if url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url[len("postgres://") :]
    elif url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError; keep one message
        raise ValueError(f"not a database URL: {url!r}") from exc
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported database {parsed.get_backend_name()!r} (sqlite or postgresql)")
    return url


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite database URL; None for PostgreSQL, an in-memory database or a
    URL that does not parse."""
    try:
        parsed = make_url(url)
    except Exception:
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def describe_db_url(url: str) -> str:
    """The URL to show in a message: its password hidden."""
    return make_url(url).render_as_string(hide_password=True)


def describe_db_error(url: str, exc: Exception) -> str:
    """One line for a database that cannot be used (password hidden)."""
    shown = describe_db_url(url)
    cause = getattr(exc, "orig", None) or exc
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return f"cannot use the database {shown}: {first}"


class Database:
    """One engine and the two kinds of transactions the services use."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = normalize_db_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        self._write_lock = threading.Lock()
        kwargs: dict[str, Any] = {}
        self._pg_connect_args: dict[str, Any] = {}
        query = make_url(self.url).query
        if self.is_sqlite:
            self.busy_timeout = float(str(query.get("timeout", SQLITE_BUSY_TIMEOUT_S)))
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": self.busy_timeout}
        else:
            self.busy_timeout = 0.0
            settings = {"connect_timeout": PG_CONNECT_TIMEOUT_S, **PG_TCP_SETTINGS}
            kwargs["connect_args"] = {k: v for k, v in settings.items() if k not in query}
            self._pg_connect_args = kwargs["connect_args"]
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
        # hide_parameters: a failing statement's text (in exceptions and log lines) would
        # otherwise carry every parameter set: token hashes, sealed secrets, license data.
        self.engine: Engine = create_engine(self.url, hide_parameters=True, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine, int(self.busy_timeout * 1000))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_engine = (
            self.engine.execution_options(tessera_begin="BEGIN IMMEDIATE") if self.is_sqlite else self.engine
        )
        self._write_sessions = sessionmaker(self._write_engine, expire_on_commit=False)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only unit of work (a consistent snapshot; never blocks a writer)."""
        # Closing (not committing) ends the transaction; loaded objects stay readable.
        with self._sessions() as session:
            yield session

    def acquire_write_lock(self) -> bool:
        """SQLite: this process's turn to write (every writer takes it before ``BEGIN
        IMMEDIATE``), raising the "locked" outage when it does not come in time."""
        if not self.is_sqlite:
            return False
        # Bounded: behind a writer stuck on a locked file, the queue must not wait forever.
        if not self._write_lock.acquire(timeout=self.busy_timeout):
            raise OperationalError("BEGIN IMMEDIATE", None, sqlite3.OperationalError("database is locked"))
        return True

    def try_write_lock(self) -> bool:
        """SQLite: this process's turn to write if nobody here has it this instant."""
        return self._write_lock.acquire(blocking=False)

    def release_write_lock(self) -> None:
        self._write_lock.release()

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction: committed when the block ends, rolled back on error."""
        if self.is_sqlite:
            self.acquire_write_lock()
            try:
                with self._write_sessions() as session, session.begin():
                    yield session
            finally:
                self._write_lock.release()
        else:
            with self._write_sessions() as session, session.begin():
                yield session

    def dispose(self) -> None:
        self.engine.dispose()

    async def connect_async(self) -> Any:
        """PostgreSQL: a new ``psycopg.AsyncConnection`` with the engine's settings (URL,
        connect timeout, TCP keepalives, SQLAlchemy's type adapters), for work that runs on
        an event loop instead of a thread (the check-in batches). The caller owns it."""
        import psycopg

        dialect = self.engine.dialect
        cargs, cparams = dialect.create_connect_args(self.engine.url)
        return await psycopg.AsyncConnection.connect(*cargs, **{**cparams, **self._pg_connect_args})


def begin_immediate(execute: Callable[[str], object], timeout: float) -> None:
    """``BEGIN IMMEDIATE``, asked again every few milliseconds while another process
    writes, until ``timeout`` seconds have passed (then SQLite's "locked" error stands)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            execute("BEGIN IMMEDIATE")
            return
        except Exception as exc:
            cause = getattr(exc, "orig", None) or exc
            locked = isinstance(cause, sqlite3.OperationalError) and (
                "locked" in str(cause) or "busy" in str(cause)
            )
            if not locked or time.monotonic() >= deadline:
                raise
        time.sleep(SQLITE_WRITE_POLL_S)


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN itself (pysqlite's own implicit
        # transaction handling would start a deferred one at the first write).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={min(busy_timeout_ms, SQLITE_CONNECTION_BUSY_MS)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        if connection.get_execution_options().get("tessera_begin") == "BEGIN IMMEDIATE":
            begin_immediate(connection.exec_driver_sql, busy_timeout_ms / 1000)
        else:
            connection.exec_driver_sql("BEGIN")
