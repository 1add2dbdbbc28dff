"""Storage: migrations, SQLite settings, and what is (not) stored in clear."""

from __future__ import annotations

import re
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import OperationalError

from tessera.server.app import ServerState
from tessera.server.migrate import alembic_config, upgrade
from tessera.server.models import LicenseRow
from tessera.server.storage import SQLITE_CONNECTION_BUSY_MS, Database, normalize_db_url
from tessera.server.tokens import Principal

from .conftest import START
from .helpers import setup_license


def test_migrations_create_the_schema_and_are_idempotent(database: Database) -> None:
    upgrade(database)  # a second run changes nothing
    tables = set(inspect(database.engine).get_table_names())
    assert {"licenses", "machines", "audit_log", "api_tokens", "alembic_version"} <= tables
    with database.read() as session:
        version = session.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert version == ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_sqlite_runs_in_wal_mode_with_normal_sync(tmp_path: object) -> None:
    db = Database(f"sqlite:///{tmp_path}/x.db")
    try:
        with db.read() as session:
            assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert session.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL
            # Short: only starting a write transaction waits, and it polls (next test).
            assert session.execute(text("PRAGMA busy_timeout")).scalar() == SQLITE_CONNECTION_BUSY_MS
    finally:
        db.dispose()


def test_a_writer_waits_for_another_process_and_gets_in_as_soon_as_it_is_done(tmp_path: Path) -> None:
    """Another process's write transaction: the writer polls every few milliseconds, so it
    starts soon after the other one ends (SQLite's own handler waits up to 100 ms between
    tries, and under steady load a waiter lost every race); past the timeout it fails."""
    path = tmp_path / "x.db"
    db = Database(f"sqlite:///{path}")
    upgrade(db)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.5, lambda: other.execute("COMMIT")).start()
        started = time.monotonic()
        with db.write() as session:
            session.execute(text("CREATE TABLE waited (x INTEGER)"))  # the transaction begins here
            waited = time.monotonic() - started
        assert 0.45 < waited < 0.6, waited
        impatient = Database(f"sqlite:///{path}?timeout=0.3")
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(OperationalError, match="locked"), impatient.write() as session:
            session.execute(text("CREATE TABLE never (x INTEGER)"))
        assert 0.29 < time.monotonic() - started < 1.0
        other.execute("ROLLBACK")
        impatient.dispose()
    finally:
        other.close()
        db.dispose()


def test_postgresql_connections_detect_a_vanished_host(database: Database) -> None:
    """Keepalive probes and a TCP user timeout on the real socket (not only in the DSN)."""
    if database.is_sqlite:
        pytest.skip("PostgreSQL connections only")

    def options(db: Database) -> tuple[int, int, int, int]:
        raw = db.engine.raw_connection()
        try:
            sock = socket.socket(fileno=raw.driver_connection.pgconn.socket)  # type: ignore[union-attr]
            try:
                return (
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                )
            finally:
                sock.detach()  # the descriptor stays psycopg's
        finally:
            raw.close()

    assert options(database) == (1, 30, 3, 20_000)
    own = Database(f"{database.url}?keepalives_idle=7&tcp_user_timeout=9000")
    try:
        assert options(own) == (1, 7, 3, 9000)  # the URL's settings win
    finally:
        own.dispose()


def test_database_urls_are_checked() -> None:
    assert normalize_db_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_db_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    for bad in ("mysql://u@h/db", "not a url"):
        with pytest.raises(ValueError):
            normalize_db_url(bad)


def test_serials_and_keys(state: ServerState, admin: Principal) -> None:
    serials = [setup_license(state, admin, START)[0] for _ in range(3)]
    assert serials == ["2026-000001", "2026-000002", "2026-000003"]
    entitlements = [{"feature": "uniplex", "count": 5}]  # the default expiry would be over in 2027-11
    serial, key = setup_license(state, admin, START.replace(year=2027), entitlements=entitlements)
    assert serial == "2027-000001"
    assert re.fullmatch(r"[0-9A-Z]{5}(-[0-9A-Z]{5}){4}", key)
    with state.db.read() as session:
        row = session.execute(select(LicenseRow).where(LicenseRow.serial == serial)).unique().scalar_one()
        assert row.key_digest != key and key not in row.key_digest
        dump = "\n".join(
            str(r)
            for t in ("licenses", "license_revisions", "audit_log")
            for r in session.execute(text(f"SELECT * FROM {t}"))
        )
    assert key not in dump and key.replace("-", "") not in dump


def test_the_models_match_the_migrations(database: Database) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from tessera.server.models import Base

    with database.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_the_latest_migrations_go_down_and_up_again(database: Database) -> None:
    """A release can be rolled back: the newest migrations' downgrades run and restore what
    their upgrades replaced (0014: customers.partner_id; 0009: orders; 0008: the portal's
    tables; 0007: blacklist_hits.suppressed; 0006, on PostgreSQL: the check-in batch
    function of migration 0005)."""
    from alembic import command
    from sqlalchemy import inspect

    def record_function() -> str | None:
        if database.is_sqlite:
            return None
        with database.read() as session:
            source = session.execute(
                text("SELECT prosrc FROM pg_proc WHERE proname = 'tessera_record_checkins'")
            ).scalar_one()
        return str(source)

    def hit_columns() -> set[str]:
        with database.engine.connect() as connection:
            return {c["name"] for c in inspect(connection).get_columns("blacklist_hits")}

    def customer_columns() -> set[str]:
        with database.engine.connect() as connection:
            return {c["name"] for c in inspect(connection).get_columns("customers")}

    config = alembic_config()
    with database.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0005")

    def tables() -> set[str]:
        with database.engine.connect() as connection:
            return set(inspect(connection).get_table_names())

    before, columns_before, tables_before = record_function(), hit_columns(), tables()
    assert "partner_id" not in customer_columns()
    upgrade(database)
    after, columns_after, tables_after = record_function(), hit_columns(), tables()
    assert "partner_id" in customer_columns()
    assert tables_after - tables_before == {"portal_users", "portal_sessions", "orders"}
    with database.read() as session:
        version = session.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert version == ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert "suppressed" not in columns_before and "suppressed" in columns_after
    if not database.is_sqlite:
        assert before is not None and "FOR UPDATE" in before and "LOOP" not in before
        assert after is not None and "LOOP" in after and "FOR UPDATE" not in after


def test_failing_statements_never_show_their_parameters(database: Database) -> None:
    """Parameters may be token hashes or sealed secrets; they ended up in logs and errors."""
    with pytest.raises(Exception) as caught, database.engine.connect() as connection:
        connection.execute(text("SELECT * FROM no_such_table WHERE x = :x"), {"x": "s3cret-value"})
    assert "s3cret-value" not in str(caught.value)
    assert database.engine.hide_parameters
