"""orders: the vendor's orders as records of their own, licenses found by their number

Revision ID: 0009
Revises: 0008

Until now an order was only a text on the license (``licenses.order_ref``). An order now
has a row (its number, its customer, open or cancelled); the licenses that fulfil it keep
carrying its number, indexed, so an order lists its licenses and a cancelled order revokes
them. Existing order references become orders, each for the customer of its first license.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("number", sa.String(length=100), nullable=False),
        sa.Column("customer_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["customer_id"], ["customers.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("number"),
    )
    op.create_index("ix_orders_customer_id", "orders", ["customer_id"])
    op.create_index("ix_licenses_order_ref", "licenses", ["order_ref"])
    op.execute(
        """
        INSERT INTO orders (number, customer_id, created_at, status)
        SELECT l.order_ref, l.customer_id, l.created_at, 'open'
        FROM licenses l
        WHERE l.order_ref IS NOT NULL
          AND l.id = (SELECT min(f.id) FROM licenses f WHERE f.order_ref = l.order_ref)
        """
    )


def downgrade() -> None:
    op.drop_index("ix_licenses_order_ref", table_name="licenses")
    op.drop_index("ix_orders_customer_id", table_name="orders")
    op.drop_table("orders")
