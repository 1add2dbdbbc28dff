"""Server test fixtures: a fresh database per test on SQLite and (when configured) PostgreSQL.

``TESSERA_TEST_POSTGRES_URL`` names a PostgreSQL server (its database, e.g. ``test``, is
only used to create and drop our own). When it is set, every storage test also runs
against a brand-new database ``tessera_t_<random>``, dropped afterwards, so parallel runs
by other people never meet. When it is set but PostgreSQL is unreachable the tests fail:
a configured backend is never silently skipped.

Most tests want a *migrated* database, not an empty one: each worker runs the migrations
once per backend into a template (a SQLite file; a PostgreSQL template database) and every
such test gets its own copy of it, which is what ``upgrade`` would have left. Migrating per
test cost about a second on PostgreSQL (alembic, dozens of DDL round trips) and a third on
SQLite, for some 600 tests. The migrations themselves stay tested: ``server init`` runs
them in every whole-process test, test_storage.py runs them again on a copy and checks
that nothing changes, and test_orders.py migrates down and up. Dropping a PostgreSQL
database makes the server checkpoint (half a second, several on a busy machine), so it
happens on a background thread; the session ends only when every drop has.
"""

from __future__ import annotations

import os
import queue
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from sqlalchemy.engine import make_url

from tessera.core.clock import ManualClock
from tessera.core.signing import Keyring, SigningKey
from tessera.server.app import Interfaces, ServerState, create_app
from tessera.server.migrate import upgrade
from tessera.server.storage import Database
from tessera.server.tokens import Principal, Role, create_token

PG_ENV = "TESSERA_TEST_POSTGRES_URL"
START = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)


def _pg_admin_url() -> str | None:
    return os.environ.get(PG_ENV) or None


@dataclass
class PgDatabase:
    url: str
    name: str


def _pg_admin_dsn() -> str:
    url = make_url(_pg_admin_url() or "")
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def create_pg_database(template: str | None = None) -> PgDatabase:
    """A fresh database on the configured server (a copy of ``template`` if given); the
    caller drops it."""
    admin_url = _pg_admin_url()
    assert admin_url is not None
    name = f"tessera_t_{secrets.token_hex(6)}"
    copy = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(_pg_admin_dsn(), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{copy}')
    return PgDatabase(make_url(admin_url).set(database=name).render_as_string(hide_password=False), name)


def _drop_now(name: str) -> None:
    with psycopg.connect(_pg_admin_dsn(), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class _Dropper:
    """Drops databases on one background thread; :meth:`finish` waits for all of them (at
    the end of the session) and raises the first failure, so none is lost silently."""

    def __init__(self) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._errors: list[BaseException] = []

    def drop(self, name: str) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pg-dropper", daemon=True)
            self._thread.start()
        self._queue.put(name)

    def _run(self) -> None:
        while (name := self._queue.get()) is not None:
            try:
                _drop_now(name)
            except BaseException as exc:  # reported by finish()
                self._errors.append(exc)

    def finish(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._errors:
            raise self._errors[0]


_dropper = _Dropper()


def drop_pg_database(db: PgDatabase) -> None:
    """Drop ``db`` in the background (the connections it still has are ended)."""
    _dropper.drop(db.name)


def finish_pg_drops() -> None:
    """Wait for the databases still being dropped (tests/conftest.py, at session end)."""
    _dropper.finish()


@contextmanager
def backend_database(backend: str) -> Iterator[str | None]:
    """The database URL a whole-process test passes to ``server init --db``: None for the
    SQLite default, else a fresh PostgreSQL database dropped afterwards (skipped when
    TESSERA_TEST_POSTGRES_URL is not set)."""
    if backend != "postgresql":
        yield None
        return
    if not os.environ.get("TESSERA_TEST_POSTGRES_URL"):
        pytest.skip("TESSERA_TEST_POSTGRES_URL not set")
    pg = create_pg_database()
    try:
        yield pg.url
    finally:
        drop_pg_database(pg)


def backends() -> list[Any]:
    return [
        pytest.param("sqlite", id="sqlite"),
        pytest.param(
            "postgresql",
            id="postgresql",
            marks=pytest.mark.skipif(_pg_admin_url() is None, reason=f"{PG_ENV} not set"),
        ),
    ]


class SchemaTemplates:
    """This worker's migrated templates, one per backend, made on first use."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._sqlite: Path | None = None
        self._pg: PgDatabase | None = None

    def sqlite_copy(self, path: Path) -> str:
        """A migrated SQLite database at ``path``; its URL."""
        if self._sqlite is None:
            template = self._directory / "template.db"
            db = Database(f"sqlite:///{template}")
            try:
                upgrade(db)
            finally:
                db.dispose()
            # The last connection closed checkpointed the WAL: the one file is the database.
            assert not template.with_name("template.db-wal").exists()
            self._sqlite = template
        shutil.copyfile(self._sqlite, path)
        return f"sqlite:///{path}"

    def pg_copy(self) -> PgDatabase:
        """A new migrated PostgreSQL database; the caller drops it."""
        if self._pg is None:
            template = create_pg_database()
            db = Database(template.url)
            try:
                upgrade(db)
            finally:
                db.dispose()  # a template must have no connections while it is copied
            self._pg = template
        return create_pg_database(template=self._pg.name)

    def close(self) -> None:
        if self._pg is not None:
            drop_pg_database(self._pg)
            self._pg = None


@pytest.fixture(scope="session")
def schema_templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SchemaTemplates]:
    templates = SchemaTemplates(tmp_path_factory.mktemp("schema"))
    yield templates
    templates.close()


@contextmanager
def migrated_database_url(backend: str, templates: SchemaTemplates, path: Path) -> Iterator[str]:
    """A migrated database of ``backend`` of its own (SQLite at ``path``) until the block
    ends."""
    if backend == "sqlite":
        yield templates.sqlite_copy(path)
        return
    pg = templates.pg_copy()
    try:
        yield pg.url
    finally:
        drop_pg_database(pg)


@pytest.fixture(params=backends())
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of the test's database, of each backend: migrated to the newest revision when
    the test uses ``database`` (directly or through ``state``), else empty (the schema is
    not created yet)."""
    path = tmp_path / "tessera.db"
    if "database" in request.fixturenames:
        templates: SchemaTemplates = request.getfixturevalue("schema_templates")
        with migrated_database_url(request.param, templates, path) as url:
            yield url
        return
    if request.param == "sqlite":
        yield f"sqlite:///{path}"
        return
    pg = create_pg_database()
    try:
        yield pg.url
    finally:
        drop_pg_database(pg)


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    """The test's database on each backend, its schema migrated."""
    db = Database(db_url)
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def state(database: Database, clock: ManualClock) -> ServerState:
    return ServerState(
        db=database, signing_key=SigningKey.generate(), pepper=secrets.token_bytes(32), clock=clock
    )


@pytest.fixture
def keyring(state: ServerState) -> Keyring:
    return Keyring([state.signing_key.public])


@pytest.fixture
def admin(state: ServerState) -> Principal:
    with state.db.write() as session:
        row, _ = create_token(session, name="test-admin", role=Role.ADMIN, now=START)
        return Principal(row.id, row.name, Role.ADMIN)


@pytest.fixture
def admin_token(state: ServerState) -> str:
    with state.db.write() as session:
        _, secret = create_token(session, name="http-admin", role=Role.ADMIN, now=START)
    return secret


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    state: ServerState

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture
def live_server(state: ServerState) -> Iterator[LiveServer]:
    """The real app on a real loopback socket (uvicorn in a thread), plain HTTP."""
    with serve(state) as live:
        yield live


@contextmanager
def serve(
    state: ServerState, interfaces: Interfaces | None = None, tls: tuple[Path, Path] | None = None
) -> Iterator[LiveServer]:
    """Serve ``state``'s app on a loopback port until the block ends (over TLS with ``tls``,
    a certificate and key file: agents talk to nothing else)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(state, interfaces),
        log_level="warning",
        access_log=False,
        ssl_certfile=None if tls is None else str(tls[0]),
        ssl_keyfile=None if tls is None else str(tls[1]),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(f"{'http' if tls is None else 'https'}://127.0.0.1:{port}", state)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)
