"""PostgreSQL: tessera_record_checkins() updates its machines one by one, in id order

Revision ID: 0006
Revises: 0005

Migration 0005's function locked the batch's machines first (``SELECT ... ORDER BY id FOR
UPDATE``), then updated them with one ``UPDATE ... FROM unnest(...)``. The lock step is
what kept two server processes' batches from deadlocking: the update's own order is the
plan's. Updating the machines one statement each, in id order, gives the same guarantee
(each ``UPDATE`` locks its row as it goes, lowest id first) without the separate lock,
which cost a lock record in the WAL per machine and a scan of its own. Measured on the
batch function alone (its backend's CPU, 1,500 calls each, alternating):

========  =====================  ===================
batch     0005 (lock, then set)  0006 (row by row)
========  =====================  ===================
1         360-507 us             187-207 us
7         460-620 us             293-340 us
32        927-1113 us            820-1027 us
========  =====================  ===================

Check-in batches on PostgreSQL hold about 7 at 16 connections. The update's lock (``FOR NO
KEY UPDATE``) no longer blocks the key-share lock of the check-ins' foreign key.
"""

from __future__ import annotations

import importlib

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

CREATE = """
CREATE OR REPLACE FUNCTION tessera_record_checkins(
    machine_ids integer[],
    machine_ats timestamp with time zone[],
    machine_delivered integer[],
    checkin_machine_ids integer[],
    checkin_ats timestamp with time zone[],
    checkin_outcomes varchar[]
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    m record;
BEGIN
    -- Lowest id first: two processes' batches take their row locks in the same order.
    FOR m IN
        SELECT * FROM unnest(machine_ids, machine_ats, machine_delivered) AS v(id, at, delivered)
         ORDER BY id
    LOOP
        UPDATE machines
           SET last_checkin_at = m.at, delivered_revision = m.delivered, checkpoint_overdue_at = NULL
         WHERE id = m.id;
    END LOOP;
    INSERT INTO checkins (machine_id, at, outcome)
    SELECT * FROM unnest(checkin_machine_ids, checkin_ats, checkin_outcomes);
    RETURN cardinality(checkin_machine_ids);
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CREATE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        before = importlib.import_module("tessera.server.migrations.versions.0005_checkin_batch_function")
        op.execute(before.CREATE)
