"""customers.partner_id: the partner that created a customer

Revision ID: 0014
Revises: 0013

A partner token read and licensed any vendor customer by its (sequential) id, although a
partner works in its own namespace only. A customer a partner creates now records that
partner; a partner sees and uses only its own customers and those that hold one of its
licenses (so the customers of licenses a partner issued before this revision stay its).
Customers that exist already are the vendor's (NULL): who created them was not recorded.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_FK = "fk_customers_partner_id_partners"


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # SQLite adds a column with its REFERENCES clause in place; a batch would rebuild
        # the table, which the licenses and orders referencing it make fragile.
        op.execute("ALTER TABLE customers ADD COLUMN partner_id INTEGER REFERENCES partners (id)")
        return
    op.add_column("customers", sa.Column("partner_id", sa.Integer(), nullable=True))
    op.create_foreign_key(_FK, "customers", "partners", ["partner_id"], ["id"])


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE customers DROP COLUMN partner_id")
        return
    op.drop_constraint(_FK, "customers", type_="foreignkey")
    op.drop_column("customers", "partner_id")
