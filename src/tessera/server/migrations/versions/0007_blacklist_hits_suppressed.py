"""blacklist_hits.suppressed: hits the server's refusal limit left out before this one

Revision ID: 0007
Revises: 0006

An activation from a blacklisted container needs only a license key and a key pair the
requester makes up, and each one recorded is a row, an audit entry and a webhook event.
The server now records them within a limit per license (``server/refusals.py``); the hit
that is recorded after a run of left-out ones counts them here, so the report still
accounts for every hit.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("blacklist_hits", schema=None) as batch_op:
        batch_op.add_column(sa.Column("suppressed", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("blacklist_hits", schema=None) as batch_op:
        batch_op.drop_column("suppressed")
