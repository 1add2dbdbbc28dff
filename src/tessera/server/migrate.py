"""Schema migrations, shipped inside the package and run programmatically (``server init``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import inspect

from tessera.server.config import ConfigError
from tessera.server.storage import Database, describe_db_url

__all__ = ["SchemaError", "alembic_config", "check_and_upgrade", "head_revision", "upgrade"]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade(db: Database, revision: str = "head") -> None:
    """Bring the schema of ``db`` to ``revision`` (idempotent)."""
    config = alembic_config()
    with db.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


class SchemaError(ConfigError):
    """The database is not one this version of Tessera can serve: never initialized, or
    stamped with a schema revision it does not know (made by a newer version)."""


def head_revision() -> str:
    """The newest schema revision this version knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def database_revision(db: Database) -> str | None:
    """The schema revision ``db`` is stamped with; None when it holds no Tessera schema
    (no ``alembic_version`` table, or an empty one)."""
    with db.engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        row = connection.exec_driver_sql("SELECT version_num FROM alembic_version").first()
    return None if row is None else str(row[0])


def check_and_upgrade(db: Database) -> None:
    """``server run``'s start: serve only a database ``server init`` made, brought forward.

    A database without a Tessera schema (a new SQLite path, a dropped and recreated
    PostgreSQL database, a typo in ``[server] database``) is refused instead of being given
    a fresh, empty schema: agents would be told "unknown license key" by a server that looks
    healthy. A revision this version does not know was written by a newer version, whose
    tables this code would misread; alembic's own answer is a CommandError that reached the
    operator as "internal error". An older, known revision is migrated forward.
    """
    revision = database_revision(db)
    shown = describe_db_url(db.url)
    if revision is None:
        raise SchemaError(
            f"the database at {shown} holds no Tessera data: run `tessera server init` "
            "(or fix [server] database)"
        )
    script = ScriptDirectory.from_config(alembic_config())
    head = head_revision()
    try:
        known = script.get_revision(revision) is not None
    except CommandError:
        known = False
    if not known:
        relation = "newer than" if revision > head else "unknown to"
        raise SchemaError(
            f"the database's schema revision {revision} is {relation} this version of tessera "
            f"(which knows up to {head}): upgrade tessera"
        )
    upgrade(db)
