"""recovered_machines.file_locking_id: the container a blacklist file's [SERIALS] entry names

Revision ID: 0012
Revises: 0011

A license moved with "revoke only" was exported as ``SERIAL = since, delay`` (copies issued
before the day of the move): the old machine's copy from that very day escaped it, and the
license's other machines lost theirs. A move recorded from now on stores the Locking ID its
entry is scoped to, exported as a ``tessera/2`` entry that reaches only copies bound to that
container. Rows from before (NULL here) keep their day-grain entry, so a server upgrade
alone does not turn the files it exports into ones shipped agents cannot read.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("recovered_machines", schema=None) as batch_op:
        batch_op.add_column(sa.Column("file_locking_id", sa.String(length=410), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("recovered_machines", schema=None) as batch_op:
        batch_op.drop_column("file_locking_id")
