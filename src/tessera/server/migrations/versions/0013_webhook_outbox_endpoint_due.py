"""webhook_outbox (endpoint_id, status, next_attempt_at): claiming per endpoint

Revision ID: 0013
Revises: 0012

The webhook worker claims each endpoint's oldest due rows on their own, so that one
endpoint that hangs (or has a large backlog) never delays the others. Without this index
finding an endpoint's due rows reads every due row of the others, or its delivered history.
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_outbox", schema=None) as batch_op:
        batch_op.create_index(
            "ix_webhook_outbox_endpoint_due", ["endpoint_id", "status", "next_attempt_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("webhook_outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_outbox_endpoint_due")
