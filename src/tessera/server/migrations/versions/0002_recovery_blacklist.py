"""recovery rules, recovered machines, blacklist, blacklist hits and exports

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("licenses") as batch:
        batch.add_column(
            sa.Column(
                "recovery_old_container",
                sa.String(length=16),
                nullable=False,
                server_default="blacklist",
            )
        )
        batch.add_column(sa.Column("recoveries_authorized", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "recoveries",
        sa.Column("id", _ID, nullable=False),
        sa.Column("license_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("via", sa.String(length=16), nullable=False),
        sa.Column("old_locking_id", sa.String(length=410), nullable=True),
        sa.Column("new_locking_id", sa.String(length=410), nullable=False),
        sa.Column("granted", sa.Boolean(), nullable=False),
        sa.Column("rule", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("old_container", sa.String(length=16), nullable=True),
        sa.ForeignKeyConstraint(["license_id"], ["licenses.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_recoveries_license", "recoveries", ["license_id", "at"])
    op.create_table(
        "recovered_machines",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("license_id", sa.Integer(), nullable=False),
        sa.Column("system_id", sa.String(length=64), nullable=False),
        sa.Column("locking_id", sa.String(length=410), nullable=False),
        sa.Column("agent_key", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("recovered_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["license_id"], ["licenses.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_recovered_license_system", "recovered_machines", ["license_id", "system_id"])
    op.create_table(
        "blacklist",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("locking_id", sa.String(length=410), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("since", sa.Date(), nullable=False),
        sa.Column("delay_days", sa.Integer(), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("locking_id"),
    )
    op.create_table(
        "blacklist_hits",
        sa.Column("id", _ID, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("locking_id", sa.String(length=410), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=True),
        sa.Column("how", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "blacklist_exports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("containers", sa.Integer(), nullable=False),
        sa.Column("serials", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("blacklist_exports")
    op.drop_table("blacklist_hits")
    op.drop_table("blacklist")
    op.drop_index("ix_recovered_license_system", table_name="recovered_machines")
    op.drop_table("recovered_machines")
    op.drop_index("ix_recoveries_license", table_name="recoveries")
    op.drop_table("recoveries")
    with op.batch_alter_table("licenses") as batch:
        batch.drop_column("recoveries_authorized")
        batch.drop_column("recovery_old_container")
