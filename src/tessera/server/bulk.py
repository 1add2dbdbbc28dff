"""Bulk issue: up to :data:`MAX_BULK` licenses from one template in one transaction.

The same licenses as :func:`tessera.server.licenses.issue_license` makes one at a time
(license row, entitlements, revision-1 snapshot, key stored only as its peppered HMAC), but

- the template (role, customer, product, features, partner namespace, version) is checked
  once per request, and every pre-bound Locking ID before anything is written: bad input
  changes nothing;
- the serials are one consecutive block, reserved by one statement;
- the rows go in with a few multi-row ``INSERT`` statements (Core, not one ORM object per
  license); the revision snapshots are the first license's view with the serial swapped;
- the audit chain gets **one** entry for the request (``license.issue-bulk``: count, first and
  last serial, the template and a SHA-256 over the issued serials, so it still commits to
  exactly which licenses were made), appended last so the chain's lock is held briefly;
- webhooks get **one** ``license.bulk-issued`` event for the request (``docs/webhooks.md``).

With ``locking_ids`` each license is bound at issue to one machine (OEM or factory
provisioning): its slot 0 is taken by that Locking ID and its license file is signed now,
the file an online activation delivers except that it names no agent key (no agent exists
yet), so any agent on that machine can ``agent import`` it. When the agent later activates
online with the license key, the server recognises the machine (tolerant Locking ID match),
registers the agent's key on the same slot and from then on the agent checks in as usual.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, select
from sqlalchemy.orm import Session

from tessera.core import sign_document
from tessera.core.fingerprint import Component, LockingId, match_locking_ids
from tessera.core.licensekey import generate_license_key, license_key_digest
from tessera.core.model import Binding, MatchLevel
from tessera.core.sealing import seal
from tessera.core.signing import SigningKey
from tessera.server import audit, webhooks
from tessera.server.errors import Forbidden, Invalid
from tessera.server.licenses import (
    allocate_serials,
    check_template,
    license_view,
    plain_license_document,
    serial_text,
)
from tessera.server.models import (
    BlacklistEntryRow,
    EntitlementRow,
    LicenseRevision,
    LicenseRow,
    Machine,
)
from tessera.server.orders import ensure_order
from tessera.server.schemas import MAX_BULK, BulkLicenseIn
from tessera.server.tokens import Principal

__all__ = ["MAX_BULK", "BulkResult", "issue_bulk", "prebound_system_id", "serials_digest"]

_LICENSES: Table = LicenseRow.__table__  # type: ignore[assignment]
_ENTITLEMENTS: Table = EntitlementRow.__table__  # type: ignore[assignment]
_REVISIONS: Table = LicenseRevision.__table__  # type: ignore[assignment]
_MACHINES: Table = Machine.__table__  # type: ignore[assignment]
#: Serials per ``SELECT ... IN`` when reading back the new licenses' ids.
_ID_BATCH = 1000
_NOTHING = object()


@dataclass(frozen=True, slots=True)
class BulkResult:
    serials: list[str]
    keys: list[str]
    #: Pre-bound: the Locking ID and the signed license file of each license, else None.
    locking_ids: list[str] | None
    files: list[str] | None
    serials_sha256: str

    def to_json(self) -> bytes:
        """The API response, encoded in one go (10,000 licenses: a few MB)."""
        if self.locking_ids is None or self.files is None:
            items: list[dict[str, Any]] = [
                {"serial": s, "key": k} for s, k in zip(self.serials, self.keys, strict=True)
            ]
        else:
            items = [
                {"serial": s, "key": k, "locking_id": lid, "license": text}
                for s, k, lid, text in zip(self.serials, self.keys, self.locking_ids, self.files, strict=True)
            ]
        body = {
            "count": len(self.serials),
            "first_serial": self.serials[0],
            "last_serial": self.serials[-1],
            "serials_sha256": self.serials_sha256,
            "licenses": items,
        }
        return json.dumps(body, separators=(",", ":")).encode("utf-8")


def serials_digest(serials: Sequence[str]) -> str:
    """What the audit entry commits to: SHA-256 of the serials, one per line, in order."""
    return hashlib.sha256("\n".join(serials).encode("ascii")).hexdigest()


def prebound_system_id(serial: str) -> str:
    """The installation id of a pre-bound machine until its agent activates: the ``:`` makes
    it one no agent can send (the protocol allows ``[A-Za-z0-9_-]``), so nothing can check
    in as it; activation finds the machine by its Locking ID instead."""
    return f"prebound:{serial}"


def _check_locking_ids(session: Session, locking_ids: list[str], level: MatchLevel) -> None:
    """Every ID well-formed, none twice, none a blacklisted container (tolerant, as at
    activation); else the request is refused naming the first bad entry."""
    parsed: list[LockingId] = []
    first_at: dict[str, int] = {}
    for i, text in enumerate(locking_ids):
        if text in first_at:
            raise Invalid(f"locking_ids[{i}]: {text} is listed twice (also at [{first_at[text]}])")
        first_at[text] = i
        try:
            parsed.append(LockingId.parse(text))
        except ValueError as exc:
            raise Invalid(f"locking_ids[{i}]: {exc}") from None
    listed = session.execute(
        select(BlacklistEntryRow.locking_id).where(BlacklistEntryRow.scope == "container")
    ).scalars()
    # Index the blacklist by component: a tolerant match needs a shared component, so each
    # requested ID is compared only with the entries it shares one with.
    by_component: dict[Component, list[LockingId]] = {}
    exact: set[str] = set()
    for text in listed:
        exact.add(text)
        try:
            entry = LockingId.parse(text)
        except ValueError:
            continue
        for component in entry.components:
            by_component.setdefault(component, []).append(entry)
    if not exact:
        return
    for i, (text, current) in enumerate(zip(locking_ids, parsed, strict=True)):
        candidates = {id(e): e for c in current.components for e in by_component.get(c, ())}
        if text in exact or any(match_locking_ids(e, current, level).ok for e in candidates.values()):
            raise Forbidden(
                f"locking_ids[{i}]: the machine {text} is blacklisted by the vendor: nothing was issued"
            )


def issue_bulk(
    session: Session,
    principal: Principal,
    data: BulkLicenseIn,
    now: datetime,
    pepper: bytes,
    signing_key: SigningKey,
) -> BulkResult:
    """Issue ``data.count`` licenses, or one pre-bound license per ``data.locking_ids``."""
    if (data.count is None) == (data.locking_ids is None):
        raise Invalid("count: give either count or locking_ids (exactly one of them)")
    customer, product, partner, version = check_template(session, principal, data, now)
    if data.order:
        ensure_order(session, principal, data.order, customer, now)
    locking_ids = data.locking_ids
    if locking_ids is not None:
        if data.binding is not Binding.MACHINE:
            raise Invalid(
                f"binding: licenses pre-bound to locking_ids are machine-bound, not {data.binding.value}"
            )
        _check_locking_ids(session, locking_ids, data.match)
        n = len(locking_ids)
    else:
        assert data.count is not None
        n = data.count
    if not 1 <= n <= MAX_BULK:  # the schema says so too; a service caller may bypass it
        raise Invalid(f"count: between 1 and {MAX_BULK:,} licenses per request")

    keys = [generate_license_key() for _ in range(n)]
    first = allocate_serials(session, now.year, n)
    serials = [serial_text(now.year, first + i) for i in range(n)]
    common: dict[str, Any] = {
        "customer_id": customer.id,
        "product_id": product.id,
        "partner_id": partner.id if partner else None,
        "status": "active",
        "revision": 1,
        "version_range": version,
        "binding": data.binding.value,
        "match_level": data.match.value,
        "machines_allowed": data.machines,
        "connect": data.connect,
        "validation_hours": data.validation_hours,
        "failover_days": data.failover_days,
        "checkpoint_days": data.checkpoint_days,
        "emergency": ",".join(data.emergency),
        "recovery_allowance": data.recovery_allowance,
        "recovery_interval_days": data.recovery_interval_days,
        "recovery_old_container": data.recovery_old_container,
        "recoveries_authorized": 0,
        "order_ref": data.order,
        "sealed": data.seal,
        "created_at": now,
        "updated_at": now,
    }
    conn = session.connection()
    _insert_rows(
        conn,
        _LICENSES,
        [*common, "serial", "key_digest"],
        (
            (*common.values(), serial, license_key_digest(key, pepper))
            for serial, key in zip(serials, keys, strict=True)
        ),
    )
    id_of: dict[str, int] = {}
    for i in range(0, n, _ID_BATCH):
        block = serials[i : i + _ID_BATCH]
        rows = conn.execute(select(_LICENSES.c.serial, _LICENSES.c.id).where(_LICENSES.c.serial.in_(block)))
        id_of.update((serial, lid) for serial, lid in rows)
    ids = [id_of[serial] for serial in serials]
    entitlements = [(e.location or data.location, e.feature, e.count, e.expiry) for e in data.entitlements]
    _insert_rows(
        conn,
        _ENTITLEMENTS,
        ["license_id", "location", "feature", "count", "expiry"],
        ((lid, *e) for lid in ids for e in entitlements),
    )
    # The first license as the database now has it (entitlements in the database's own
    # order): every other license is the same but for its serial (and machine).
    template = session.get(LicenseRow, ids[0])
    assert template is not None  # inserted above, in this transaction
    view = license_view(template, with_machines=False)
    head, tail = json.dumps(view, sort_keys=True, default=str).split(
        json.dumps({"serial": serials[0]})[1:-1], 1
    )
    _insert_rows(
        conn,
        _REVISIONS,
        ["license_id", "revision", "snapshot", "actor", "created_at"],
        (
            (lid, 1, f'{head}"serial": {json.dumps(serial)}{tail}', principal.actor, now)
            for lid, serial in zip(ids, serials, strict=True)
        ),
    )
    files: list[str] | None = None
    if locking_ids is not None:
        files = _sign_prebound(template, serials, keys, locking_ids, now, signing_key)
        _insert_rows(
            conn,
            _MACHINES,
            ["license_id", "slot", "locking_id", "system_id", "agent_key", "activated_at",
             "last_checkin_at", "delivered_revision", "offline", "checkpoint_overdue_at"],
            (
                (lid, 0, locking_id, prebound_system_id(serial), "", now, None, 1, True, None)
                for lid, serial, locking_id in zip(ids, serials, locking_ids, strict=True)
            ),
        )  # fmt: skip
    digest = serials_digest(serials)
    details: dict[str, Any] = {
        "count": n,
        "first_serial": serials[0],
        "last_serial": serials[-1],
        "serials_sha256": digest,
        "prebound": locking_ids is not None,
        "template": {k: v for k, v in view.items() if k not in ("serial", "features")},
    }
    if locking_ids is not None:
        details["locking_ids_sha256"] = hashlib.sha256("\n".join(locking_ids).encode("ascii")).hexdigest()
    webhooks.emit(
        session,
        "license.bulk-issued",
        {
            "count": n,
            "first_serial": serials[0],
            "last_serial": serials[-1],
            "serials_sha256": digest,
            "customer_id": customer.id,
            "product": product.code,
            "binding": data.binding.value,
            "prebound": locking_ids is not None,
            "order": data.order,
        },
        now,
    )
    # Last: on PostgreSQL the audit chain's lock is then held only until the commit.
    audit.append(
        session,
        at=now,
        actor=principal.actor,
        action="license.issue-bulk",
        target=f"{serials[0]}..{serials[-1]}",
        details=details,
    )
    return BulkResult(serials, keys, locking_ids, files, digest)


def _sign_prebound(
    template: LicenseRow,
    serials: list[str],
    keys: list[str],
    locking_ids: list[str],
    now: datetime,
    signing_key: SigningKey,
) -> list[str]:
    """Each machine's license file, as :func:`tessera.server.activation` builds one (no
    agent key yet); sealed ones are encrypted to their own license key."""
    base = plain_license_document(template, locking_id=locking_ids[0], agent_key=None, issued=now)
    files = []
    for serial, key, locking_id in zip(serials, keys, locking_ids, strict=True):
        doc = base.evolve(serial=serial, locking_id=locking_id)
        if template.sealed:
            doc = seal(doc, key)
        files.append(sign_document(doc, signing_key))
    return files


def _insert_rows(conn: Connection, table: Table, columns: list[str], rows: Iterable[tuple[Any, ...]]) -> None:
    """Many rows into ``table`` at driver speed: ``COPY`` on PostgreSQL, one prepared
    ``executemany`` on SQLite. SQLAlchemy's per-row parameter handling would cost more than
    the database's work here; the column types' own bind processors still convert the
    values, so the rows are stored exactly as an ORM insert stores them."""
    dialect = conn.dialect
    quote = dialect.identifier_preparer.quote
    names = ", ".join(quote(c) for c in columns)
    if dialect.name == "postgresql":
        driver = conn.connection.driver_connection  # psycopg's, inside this transaction
        assert driver is not None
        with driver.cursor() as cursor, cursor.copy(f"COPY {quote(table.name)} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return
    processors = [table.c[c].type.dialect_impl(dialect).bind_processor(dialect) for c in columns]
    # The same value (a timestamp, a flag) in every row is converted once.
    cache: list[tuple[Any, Any]] = [(_NOTHING, None)] * len(columns)

    def convert(row: tuple[Any, ...]) -> tuple[Any, ...]:
        out = []
        for i, (value, process) in enumerate(zip(row, processors, strict=True)):
            if process is None or value is None:
                out.append(value)
                continue
            seen, converted = cache[i]
            if seen is not value:
                converted = process(value)
                cache[i] = (value, converted)
            out.append(converted)
        return tuple(out)

    marks = ", ".join("?" for _ in columns)
    conn.exec_driver_sql(
        f"INSERT INTO {quote(table.name)} ({names}) VALUES ({marks})", [convert(r) for r in rows]
    )
