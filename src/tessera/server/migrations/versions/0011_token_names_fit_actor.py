"""api_tokens.name: shorten names made before the 191-character cap

Revision ID: 0011
Revises: 0010

Every change a token makes is recorded with the actor ``role:name`` in columns of 200
characters. Before names were capped (``tokens.MAX_TOKEN_NAME``), the API took names of up
to 200 characters, and on PostgreSQL every audited write by such a token failed. Such a
token keeps its secret and role and gets the name ``<first characters>… (token <id>)``,
exactly MAX_TOKEN_NAME characters: the id keeps apart tokens whose names shared a long
prefix, and the audit log records the rename (``token.rename``, actor ``migration:0011``,
details ``old_name`` and ``name``) so the old name stays findable.

The downgrade leaves the names as they are: the old ones are in the audit log, and giving
them back would break the token's writes again.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

#: The cap of ``tessera.server.tokens`` when this migration was written (200 - ':' - the
#: longest role, ``readonly``); a migration must not change with later code.
MAX_TOKEN_NAME = 191
ACTOR = "migration:0011"
_PG_AUDIT_LOCK = 0x7E55E8A0  # tessera.server.audit's lock of the chain's head

_tokens = sa.table("api_tokens", sa.column("id", sa.Integer()), sa.column("name", sa.String()))
_audit = sa.table(
    "audit_log",
    sa.column("id", sa.Integer()),
    sa.column("at", sa.DateTime(timezone=True)),
    sa.column("actor", sa.String()),
    sa.column("action", sa.String()),
    sa.column("target", sa.String()),
    sa.column("details", sa.Text()),
    sa.column("prev_hash", sa.String()),
    sa.column("hash", sa.String()),
)


def shortened(name: str, token_id: int, taken: set[str]) -> str:
    """``name`` cut to fit with ``… (token <id>)`` after it; should another token already
    bear exactly that name, the cut goes one character further until it is free."""
    suffix = f"… (token {token_id})"
    keep = MAX_TOKEN_NAME - len(suffix)
    while True:
        candidate = name[:keep].rstrip() + suffix
        if candidate not in taken or keep == 0:
            return candidate
        keep -= 1


def upgrade() -> None:
    from tessera.server.audit import GENESIS, entry_hash

    bind = op.get_bind()
    rows = bind.execute(sa.select(_tokens.c.id, _tokens.c.name).order_by(_tokens.c.id)).all()
    long_rows = [(token_id, name) for token_id, name in rows if len(name) > MAX_TOKEN_NAME]
    if not long_rows:
        return
    if bind.dialect.name == "postgresql":
        bind.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_AUDIT_LOCK})
    taken = {name for _, name in rows}
    prev = bind.execute(sa.select(_audit.c.hash).order_by(_audit.c.id.desc()).limit(1)).scalar() or GENESIS
    at = datetime.now(UTC).replace(microsecond=0)
    for token_id, name in long_rows:
        new = shortened(name, token_id, taken)
        taken.add(new)
        bind.execute(sa.update(_tokens).where(_tokens.c.id == token_id).values(name=new))
        target = f"token:{token_id}"
        body = json.dumps(
            {"name": new, "old_name": name}, sort_keys=True, separators=(",", ":"), ensure_ascii=True
        )
        digest = entry_hash(prev, at, ACTOR, "token.rename", target, body)
        bind.execute(
            sa.insert(_audit).values(
                at=at,
                actor=ACTOR,
                action="token.rename",
                target=target,
                details=body,
                prev_hash=prev,
                hash=digest,
            )
        )
        prev = digest


def downgrade() -> None:
    pass
