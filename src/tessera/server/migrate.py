"""Schema migrations, shipped inside the package and run programmatically (``server init``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from tessera.server.storage import Database

__all__ = ["alembic_config", "upgrade"]

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
