"""portal_users.totp_secret, totp_last_step: two-step sign-in for the web portal

Revision ID: 0010
Revises: 0009

A portal user may add a second step to the password: a code from an authenticator app
(TOTP, RFC 6238). The secret is kept sealed (AES-GCM under a key derived from the
server's pepper, which is not in the database); the last accepted time step makes each
code count once.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("portal_users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("totp_secret", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("totp_last_step", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("portal_users", schema=None) as batch_op:
        batch_op.drop_column("totp_last_step")
        batch_op.drop_column("totp_secret")
