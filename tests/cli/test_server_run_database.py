"""``server run`` serves only a database ``server init`` made, at a revision it knows."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from tessera.server.migrate import head_revision, upgrade
from tessera.server.storage import Database

from ..server.conftest import backend_database
from ..server.processes import init_data_dir, running_server, tessera
from .conftest import assert_one_line_error


def _url(data_dir: Path, db_url: str | None) -> str:
    return db_url or f"sqlite:///{data_dir / 'tessera.db'}"


def _execute(url: str, statement: str) -> None:
    db = Database(url)
    try:
        with db.engine.begin() as connection:
            connection.exec_driver_sql(statement)
    finally:
        db.dispose()


def _revision(url: str) -> str:
    db = Database(url)
    try:
        with db.engine.connect() as connection:
            return str(connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one())
    finally:
        db.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize("stamp", ["next", "zz99_future"])
def test_run_refuses_a_newer_schema_revision(tmp_path: Path, backend: str, stamp: str) -> None:
    if stamp == "next":  # the revision the next migration will have
        stamp = f"{int(head_revision()) + 1:04d}"
    with backend_database(backend) as db_url:
        data_dir = tmp_path / "srv"
        init_data_dir(data_dir, db_url)
        _execute(_url(data_dir, db_url), f"UPDATE alembic_version SET version_num = '{stamp}'")
        line = assert_one_line_error(tessera("server", "run", "--data-dir", str(data_dir), "--port", "1"), 2)
        assert line == (
            f"error: the database's schema revision {stamp} is newer than this version of tessera "
            f"(which knows up to {head_revision()}): upgrade tessera"
        ), line
        assert _revision(_url(data_dir, db_url)) == stamp  # nothing was migrated


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_run_migrates_an_older_schema_forward(tmp_path: Path, backend: str) -> None:
    """Kept as it was: a newer server version brings its migrations."""
    with backend_database(backend) as db_url:
        data_dir = tmp_path / "srv"
        init_data_dir(data_dir, db_url)
        url = _url(data_dir, db_url)
        fresh = db_url is None
        if fresh:  # an older database: made at 0009, as an earlier version did
            (data_dir / "tessera.db").unlink()
        else:
            _execute(url, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        db = Database(url)
        try:
            upgrade(db, "0009")
        finally:
            db.dispose()
        assert _revision(url) == "0009"
        with running_server(data_dir, tls=False) as server:
            assert httpx.get(f"{server}/api/v1/health").status_code == 200
        assert _revision(url) == head_revision()


def test_run_refuses_a_new_sqlite_path(tmp_path: Path) -> None:
    data_dir = tmp_path / "srv"
    init_data_dir(data_dir)
    config = data_dir / "tessera.toml"
    other = tmp_path / "elsewhere.db"
    config.write_text(config.read_text().replace("sqlite:///tessera.db", f"sqlite:///{other}"))
    line = assert_one_line_error(tessera("server", "run", "--data-dir", str(data_dir), "--port", "1"), 2)
    assert line.endswith(
        "holds no Tessera data (there is no file "
        + f"{other}): run `tessera server init` (or fix [server] database)"
    ), line
    assert not other.exists()
    other.touch()  # an empty file: no schema either
    line = assert_one_line_error(tessera("server", "run", "--data-dir", str(data_dir), "--port", "1"), 2)
    assert line == (
        f"error: the database at sqlite:///{other} holds no Tessera data: run `tessera server init` "
        "(or fix [server] database)"
    ), line
    with sqlite3.connect(other) as conn:  # no schema was made in it
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)


def test_run_refuses_an_empty_postgresql_database(tmp_path: Path) -> None:
    if not os.environ.get("TESSERA_TEST_POSTGRES_URL"):
        pytest.skip("TESSERA_TEST_POSTGRES_URL not set")
    with backend_database("postgresql") as db_url:
        assert db_url is not None
        data_dir = tmp_path / "srv"
        init_data_dir(data_dir, db_url)
        name = make_url(db_url).database
        admin = make_url(os.environ["TESSERA_TEST_POSTGRES_URL"]).set(drivername="postgresql")
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        line = assert_one_line_error(tessera("server", "run", "--data-dir", str(data_dir), "--port", "1"), 2)
        assert line.startswith("error: the database at postgresql+psycopg://") and line.endswith(
            "holds no Tessera data: run `tessera server init` (or fix [server] database)"
        ), line
        db = Database(db_url)
        try:
            with db.engine.connect() as connection:
                assert not connection.exec_driver_sql(
                    "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
                ).scalar_one()
        finally:
            db.dispose()


def test_a_copied_data_dir_uses_its_own_sqlite_database(tmp_path: Path) -> None:
    """init writes the default SQLite path relative to the data directory: a copy
    (``cp -a var var2``) used to keep reading and writing the original's database."""
    data_dir = tmp_path / "srv"
    init_data_dir(data_dir)
    assert 'database = "sqlite:///tessera.db"' in (data_dir / "tessera.toml").read_text()
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    (data_dir / "tessera.db").rename(tmp_path / "moved-away.db")
    with running_server(copy, tls=False) as server:  # from another working directory too
        assert httpx.get(f"{server}/api/v1/health").status_code == 200
    assert not (data_dir / "tessera.db").exists()


def test_an_absolute_sqlite_path_is_still_read(tmp_path: Path) -> None:
    """tessera.toml files written by earlier versions name the database absolutely."""
    data_dir = tmp_path / "srv"
    init_data_dir(data_dir)
    moved = tmp_path / "elsewhere" / "licenses.db"
    moved.parent.mkdir()
    (data_dir / "tessera.db").rename(moved)
    config = data_dir / "tessera.toml"
    config.write_text(config.read_text().replace("sqlite:///tessera.db", f"sqlite:///{moved}"))
    with running_server(data_dir, tls=False) as server:
        assert httpx.get(f"{server}/api/v1/health").status_code == 200
    assert not (data_dir / "tessera.db").exists()


def test_init_keeps_a_relative_db_path_as_typed(tmp_path: Path) -> None:
    """``--db sqlite:///x.db`` meant the working directory's file when it was typed."""
    data_dir = tmp_path / "srv"
    result = tessera(
        "server", "init", "--data-dir", str(data_dir), "--db", "sqlite:///typed.db", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "typed.db").is_file()
    assert f'database = "sqlite:///{tmp_path / "typed.db"}"' in (data_dir / "tessera.toml").read_text()
