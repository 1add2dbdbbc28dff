"""The append-only audit log of license changes, hash-chained so tampering shows.

Each row stores the hash of the row before it and a hash over its own content plus that
previous hash. Editing a row breaks its own hash; removing one breaks the next row's link;
inserting one breaks a link too. :func:`verify_chain` walks the log and names the first
row where the chain breaks. (Truncating the newest rows is only detectable against an
externally kept head hash, which :func:`verify_chain` reports for that purpose.)

Appends are serialized: on SQLite by the write transaction itself (``BEGIN IMMEDIATE``), on
PostgreSQL by a transaction-scoped advisory lock, so two writers never chain onto the same
predecessor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, String, Text, bindparam, insert, select, text
from sqlalchemy.orm import Session

from tessera.core.clock import utc
from tessera.core.fileformat import format_timestamp
from tessera.server.models import AuditEntry
from tessera.server.rawsql import RawTransaction, array_literal, unnest_arrays

__all__ = ["GENESIS", "ChainReport", "append", "append_raw", "entry_hash", "verify_chain"]

GENESIS = "0" * 64
_PG_AUDIT_LOCK = 0x7E55E8A0  # advisory lock key of the audit chain
_PG_LOCK = text("SELECT pg_advisory_xact_lock(:k)")
_HEAD = select(AuditEntry.hash).order_by(AuditEntry.id.desc()).limit(1)
_INSERT = (
    insert(AuditEntry)
    .values(
        at=bindparam("at"),
        actor=bindparam("actor"),
        action=bindparam("action"),
        target=bindparam("target"),
        details=bindparam("details"),
        prev_hash=bindparam("prev_hash"),
        hash=bindparam("hash"),
    )
    .inline()
)


_COLUMNS = ("at", "actor", "action", "target", "details", "prev_hash", "hash")
_ROWS = unnest_arrays(
    "entry",
    ("at", DateTime(timezone=True)),
    *((name, Text() if name == "details" else String()) for name in _COLUMNS[1:]),
    ordinality="n",
)
#: PostgreSQL: several entries as one statement, inserted (and so numbered) in order.
_INSERT_MANY = insert(AuditEntry).from_select(
    list(_COLUMNS), select(*(_ROWS.c[name] for name in _COLUMNS)).order_by(_ROWS.c.n)
)


def entry_hash(prev_hash: str, at: datetime, actor: str, action: str, target: str, details: str) -> str:
    content = json.dumps(
        [prev_hash, format_timestamp(utc(at)), actor, action, target, details],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(content.encode("ascii")).hexdigest()


def append(
    session: Session, *, at: datetime, actor: str, action: str, target: str, details: dict[str, Any]
) -> AuditEntry:
    """Add one entry in the caller's transaction (so it commits with the change it records)."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(_PG_LOCK, {"k": _PG_AUDIT_LOCK})
    prev = session.execute(_HEAD).scalar()
    entry = AuditEntry(**_entry(prev, at, actor, action, target, details))
    session.add(entry)
    session.flush()
    return entry


def append_raw(tx: RawTransaction, entries: Sequence[Mapping[str, Any]]) -> None:
    """:func:`append` for a transaction on a plain DB-API connection (the activation
    path), of several entries (each with :func:`append`'s keyword arguments) chained in
    this order: the same lock and predecessor, one read of the head for all, no session.
    On PostgreSQL the rows go in as one statement over arrays (:data:`_INSERT_MANY`):
    each statement of a pipeline costs the writer a send and a wait of its own."""
    if tx.is_postgresql:
        tx.run(_PG_LOCK, k=_PG_AUDIT_LOCK)
    head = tx.one(_HEAD)
    prev = head[0] if head is not None else None
    rows = []
    for entry in entries:
        row = _entry(prev, entry["at"], entry["actor"], entry["action"], entry["target"], entry["details"])
        rows.append(row)
        prev = row["hash"]
    if not tx.is_postgresql:
        for row in rows:
            tx.run(_INSERT, **row)
    elif rows:
        columns = {name: array_literal(row[name] for row in rows) for name in _COLUMNS if name != "at"}
        tx.run(_INSERT_MANY, at=array_literal(utc(row["at"]).isoformat() for row in rows), **columns)


def _entry(
    prev: str | None, at: datetime, actor: str, action: str, target: str, details: dict[str, Any]
) -> dict[str, Any]:
    """The columns of the entry that follows ``prev`` (the newest entry's hash, if any)."""
    prev_hash = prev or GENESIS
    at = utc(at).replace(microsecond=0)
    body = json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return {
        "at": at,
        "actor": actor,
        "action": action,
        "target": target,
        "details": body,
        "prev_hash": prev_hash,
        "hash": entry_hash(prev_hash, at, actor, action, target, body),
    }


@dataclass
class ChainReport:
    ok: bool
    rows: int
    head: str
    problems: list[str] = field(default_factory=list)


def verify_chain(session: Session) -> ChainReport:
    """Recompute every link; a removed, edited or inserted row is reported by id."""
    expected_prev = GENESIS
    problems: list[str] = []
    rows = 0
    for entry in session.execute(select(AuditEntry).order_by(AuditEntry.id)).scalars():
        rows += 1
        if entry.prev_hash != expected_prev:
            problems.append(f"entry {entry.id}: link to the previous entry is broken (row removed?)")
        recomputed = entry_hash(
            entry.prev_hash, entry.at, entry.actor, entry.action, entry.target, entry.details
        )
        if recomputed != entry.hash:
            problems.append(f"entry {entry.id}: content does not match its hash (row edited)")
        expected_prev = entry.hash
    return ChainReport(ok=not problems, rows=rows, head=expected_prev, problems=problems)
