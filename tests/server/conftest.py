"""Server test fixtures: a fresh database per test on SQLite and (when configured) PostgreSQL.

``TESSERA_TEST_POSTGRES_URL`` names a PostgreSQL server (its database, e.g. ``test``, is
only used to create and drop our own). When it is set, every storage test also runs
against a brand-new database ``tessera_t_<random>``, dropped afterwards, so parallel runs
by other people never meet. When it is set but PostgreSQL is unreachable the tests fail:
a configured backend is never silently skipped.
"""

from __future__ import annotations

import os
import secrets
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


def create_pg_database() -> PgDatabase:
    """A fresh database on the configured server; the caller drops it."""
    admin_url = _pg_admin_url()
    assert admin_url is not None
    url = make_url(admin_url)
    name = f"tessera_t_{secrets.token_hex(6)}"
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return PgDatabase(url.set(database=name).render_as_string(hide_password=False), name)


def drop_pg_database(db: PgDatabase) -> None:
    url = make_url(_pg_admin_url() or "")
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')


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


@pytest.fixture(params=backends())
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database URL of each backend (the schema is not created yet)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tessera.db'}"
        return
    pg = create_pg_database()
    try:
        yield pg.url
    finally:
        drop_pg_database(pg)


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    db = Database(db_url)
    upgrade(db)
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
