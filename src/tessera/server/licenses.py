"""Orders become licenses: serial numbers, license keys, entitlements, policy, revisions.

The license key is shown once, when the license is issued; the database keeps only its
HMAC with the server's pepper (:func:`tessera.core.licensekey.license_key_digest`), which
is also how activations find the license. Every change bumps the revision, stores a
snapshot and appends to the audit log in the same transaction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, Protocol

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from tessera.core.clock import utc
from tessera.core.licensekey import generate_license_key, license_key_digest, normalize_license_key
from tessera.core.model import Binding, Entitlement, Identity, License, Location, MatchLevel
from tessera.core.passwords import hash_secret
from tessera.core.sealing import seal
from tessera.core.versions import VersionRange
from tessera.server import audit, webhooks
from tessera.server.catalog import get_customer, get_product
from tessera.server.errors import Conflict, Forbidden, Invalid, NotFound
from tessera.server.models import (
    Customer,
    EntitlementRow,
    LicenseRevision,
    LicenseRow,
    Order,
    Partner,
    Product,
    SerialCounter,
)
from tessera.server.orders import ensure_order
from tessera.server.schemas import EntitlementIn, LicenseIn, LicenseUpdate
from tessera.server.storage import dialect_insert
from tessera.server.tokens import Principal, Role, require

__all__ = [
    "LicenseContent",
    "allocate_serials",
    "check_access",
    "check_template",
    "get_license",
    "issue_license",
    "license_document",
    "license_view",
    "list_licenses",
    "next_serial",
    "plain_license_document",
    "serial_text",
    "update_license",
]


def next_serial(session: Session, year: int) -> str:
    """``YYYY-NNNNNN``, gap-free per year; the counter row is locked by the upsert."""
    return serial_text(year, allocate_serials(session, year, 1))


def allocate_serials(session: Session, year: int, count: int) -> int:
    """Reserve ``count`` consecutive serial numbers of ``year`` in one statement; return the
    first. The counter row stays locked until the transaction ends, so the block is gap-free
    and nobody else's (a rolled-back transaction gives its block back)."""
    if count < 1:
        raise ValueError("count must be at least 1")
    insert = dialect_insert(session)
    stmt = (
        insert(SerialCounter)
        .values(year=year, last=count)
        .on_conflict_do_update(index_elements=["year"], set_={"last": SerialCounter.last + count})
        .returning(SerialCounter.last)
    )
    last = int(session.execute(stmt).scalar_one())
    return last - count + 1


def serial_text(year: int, number: int) -> str:
    return f"{year:04d}-{number:06d}"


def _expiry_text(expiry: date | None) -> str:
    return "permanent" if expiry is None else expiry.isoformat()


def license_view(row: LicenseRow, *, with_machines: bool = True) -> dict[str, Any]:
    """The license as the API shows it (and as a revision snapshot stores it)."""
    locations: dict[str, dict[str, dict[str, Any]]] = {}
    for e in row.entitlements:
        locations.setdefault(e.location, {})[e.feature] = {
            "count": e.count,
            "expiry": _expiry_text(e.expiry),
        }
    first = next(iter(locations.values()), {})
    view: dict[str, Any] = {
        "serial": row.serial,
        "status": row.status,
        "revision": row.revision,
        "customer_id": row.customer_id,
        "licensee": row.customer.licensee,
        "product": row.product.code,
        "version": row.version_range,
        "binding": row.binding,
        "match": row.match_level,
        "machines_allowed": row.machines_allowed,
        "connect": row.connect,
        "validation_hours": row.validation_hours,
        "failover_days": row.failover_days,
        "checkpoint_days": row.checkpoint_days,
        "emergency": list(row.emergency_features),
        "recovery_allowance": row.recovery_allowance,
        "recovery_interval_days": row.recovery_interval_days,
        "recovery_old_container": row.recovery_old_container,
        "recoveries_authorized": row.recoveries_authorized,
        "order": row.order_ref,
        "sealed": row.sealed,
        "features": first,
        "locations": locations,
    }
    if with_machines:
        view["machines"] = [
            {
                "slot": m.slot,
                "locking_id": m.locking_id,
                "system_id": m.system_id,
                "activated_at": utc(m.activated_at).isoformat(),
                "last_checkin_at": utc(m.last_checkin_at).isoformat() if m.last_checkin_at else None,
                "delivered_revision": m.delivered_revision,
                "offline": m.offline,
            }
            for m in row.machines
        ]
    return view


class EntitlementContent(Protocol):
    @property
    def location(self) -> str: ...
    @property
    def feature(self) -> str: ...
    @property
    def count(self) -> int: ...
    @property
    def expiry(self) -> date | None: ...


class LicenseContent(Protocol):
    """What a license file is made of: a :class:`LicenseRow`, or the plain row the online
    activation path reads with Core, so both render a file through the same code."""

    @property
    def serial(self) -> str: ...
    @property
    def licensee(self) -> str: ...
    @property
    def product_code(self) -> str: ...
    @property
    def version_range(self) -> str: ...
    @property
    def binding(self) -> str: ...
    @property
    def match_level(self) -> str: ...
    @property
    def revision(self) -> int: ...
    @property
    def connect(self) -> bool: ...
    @property
    def validation_hours(self) -> int: ...
    @property
    def failover_days(self) -> int: ...
    @property
    def checkpoint_days(self) -> int | None: ...
    @property
    def emergency_features(self) -> tuple[str, ...]: ...
    @property
    def recovery_allowance(self) -> int | None: ...
    @property
    def recovery_interval_days(self) -> int | None: ...
    @property
    def sealed(self) -> bool: ...
    @property
    def entitlements(self) -> Sequence[EntitlementContent]: ...


def instance_id_for(serial: str, slot: int) -> str:
    """The id of an instance-bound license's instance in ``slot``: stable across re-activations
    of that instance, different for every slot (and it says nothing about the machine)."""
    return "inst-" + hashlib.sha256(f"instance|{serial}|{slot}".encode()).hexdigest()[:24]


def identity_document(
    row: LicenseContent, *, instance_id: str, license_key: str, issued: datetime
) -> Identity:
    """The identity part (``.par``) of an instance-bound installation.

    Its admin secret starts out as the license key, which the customer already holds and the
    server never stores (the file carries only a scrypt hash); the product lets the
    administrator change it, and re-importing the original ``.par`` restores it (seed 001).
    """
    location = row.entitlements[0].location if row.entitlements else "main"
    return Identity(
        licensee=row.licensee,
        serial=row.serial,
        product=row.product_code,
        version=VersionRange.parse(row.version_range),
        location=location,
        instance_id=instance_id,
        admin_secret=hash_secret(normalize_license_key(license_key)),
        issued=utc(issued).replace(microsecond=0),
    )


def license_document(
    row: LicenseContent,
    *,
    locking_id: str,
    agent_key: str | None,
    issued: datetime,
    license_key: str | None = None,
    instance_id: str | None = None,
) -> License:
    """The core license for one machine or instance: what gets signed and shipped there.

    A sealed license is encrypted to ``license_key`` (which the agent sent in the clear
    over TLS; the server itself keeps only its digest). An instance-bound license names its
    instance instead of a Locking ID: it moves with the instance's identity file.
    """
    document = plain_license_document(
        row, locking_id=locking_id, agent_key=agent_key, issued=issued, instance_id=instance_id
    )
    if row.sealed:
        if license_key is None:
            raise ValueError(f"license {row.serial} is sealed: its license key is needed")
        document = seal(document, license_key)
    return document


def plain_license_document(
    row: LicenseContent,
    *,
    locking_id: str,
    agent_key: str | None,
    issued: datetime,
    instance_id: str | None = None,
) -> License:
    """:func:`license_document` before sealing (bulk issue seals each copy with its own key)."""
    locations: dict[str, list[Entitlement]] = {}
    for e in row.entitlements:
        locations.setdefault(e.location, []).append(Entitlement(e.feature, e.count, e.expiry))
    return License(
        licensee=row.licensee,
        serial=row.serial,
        product=row.product_code,
        version=VersionRange.parse(row.version_range),
        issued=utc(issued).replace(microsecond=0),
        locations=tuple(Location(name, tuple(ents)) for name, ents in locations.items()),
        binding=Binding.INSTANCE if row.binding == "instance" else Binding.MACHINE,
        locking_id=None if row.binding == "instance" else locking_id,
        instance_id=instance_id if row.binding == "instance" else None,
        match=MatchLevel(row.match_level),
        revision=row.revision,
        connect=row.connect,
        validation_hours=row.validation_hours,
        failover_days=row.failover_days,
        checkpoint_days=row.checkpoint_days,
        emergency=row.emergency_features,
        recovery_allowance=row.recovery_allowance,
        recovery_interval_days=row.recovery_interval_days,
        agent_key=agent_key,
    )


def check_access(session: Session, principal: Principal, row: LicenseRow, *, write: bool) -> None:
    """Partners see their own licenses, customers theirs; readonly never writes.

    A license outside a partner's or customer's scope answers exactly as one that does not
    exist (:func:`get_license`'s 404): serials are sequential, and a 403 would tell them
    which exist. What a role may not do is said only about a license it may see."""
    if principal.role is Role.CUSTOMER:
        if row.customer_id != principal.customer_id:
            raise NotFound(f"license {row.serial!r} not found")
        if write:
            raise Forbidden("a customer token may not change licenses")
    elif principal.role is Role.PARTNER:
        if row.partner_id is None or row.partner_id != principal.partner_id:
            raise NotFound(f"license {row.serial!r} not found")
    elif write and principal.role is Role.READONLY:
        raise Forbidden("role readonly may not change licenses")


def list_licenses(
    session: Session,
    principal: Principal,
    *,
    customer_id: int | None,
    status: str | None,
    limit: int,
    offset: int,
    search: str | None = None,
) -> list[dict[str, Any]]:
    """A page of licenses (newest first); partners and customers see only their own.
    ``search``: part of the serial, the customer's name or the product code."""
    stmt = select(LicenseRow).order_by(LicenseRow.id.desc()).limit(limit).offset(offset)
    if search:
        pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        stmt = (
            stmt.join(Customer, Customer.id == LicenseRow.customer_id)
            .join(Product, Product.id == LicenseRow.product_id)
            .where(
                or_(
                    LicenseRow.serial.ilike(pattern, escape="\\"),
                    Customer.name.ilike(pattern, escape="\\"),
                    Product.code.ilike(pattern, escape="\\"),
                )
            )
        )
    if principal.role is Role.CUSTOMER:
        stmt = stmt.where(LicenseRow.customer_id == principal.customer_id)
    elif principal.role is Role.PARTNER:
        stmt = stmt.where(LicenseRow.partner_id == principal.partner_id)
    if customer_id is not None:
        stmt = stmt.where(LicenseRow.customer_id == customer_id)
    if status is not None:
        stmt = stmt.where(LicenseRow.status == status)
    return [
        {
            "serial": row.serial,
            "status": row.status,
            "revision": row.revision,
            "licensee": row.customer.licensee,
            "product": row.product.code,
            "machines_allowed": row.machines_allowed,
        }
        for row in session.execute(stmt).unique().scalars()
    ]


def get_license(session: Session, serial: str, *, for_update: bool = False) -> LicenseRow:
    stmt = select(LicenseRow).where(LicenseRow.serial == serial)
    if for_update:
        stmt = stmt.with_for_update(of=LicenseRow)
    row = session.execute(stmt).unique().scalar_one_or_none()
    if row is None:
        raise NotFound(f"license {serial!r} not found")
    return row


def _check_features(
    product_features: dict[str, int | None],
    codes: list[tuple[str, str]],
    product_code: str,
    partner: Partner | None,
) -> None:
    for where, code in codes:
        if code not in product_features:
            raise Invalid(f"{where}: {code!r} is not a feature of product {product_code}")
        if partner is not None and not code.startswith(partner.namespace):
            raise Forbidden(f"{where}: {code!r} is outside partner namespace {partner.namespace}")


def _version(text: str, where: str) -> str:
    try:
        return str(VersionRange.parse(text))
    except ValueError as exc:
        raise Invalid(f"{where}: {exc}") from None


def _caller_partner(session: Session, principal: Principal) -> Partner | None:
    if principal.role is not Role.PARTNER:
        return None
    partner = session.get(Partner, principal.partner_id)
    if partner is None:
        raise Forbidden("this partner token has no partner")
    return partner


def _set_entitlements(row: LicenseRow, items: Sequence[EntitlementIn], default_location: str) -> None:
    current = {(e.location, e.feature): e for e in row.entitlements}
    for item in items:
        location = item.location or default_location
        existing = current.get((location, item.feature))
        if existing is not None:
            existing.count = item.count
            existing.expiry = item.expiry
        else:
            new = EntitlementRow(
                location=location, feature=item.feature, count=item.count, expiry=item.expiry
            )
            row.entitlements.append(new)
            current[(location, item.feature)] = new


def _snapshot(session: Session, row: LicenseRow, actor: str, now: datetime) -> None:
    session.flush()
    session.refresh(row, ["entitlements"])
    snapshot = json.dumps(license_view(row, with_machines=False), sort_keys=True, default=str)
    session.add(
        LicenseRevision(
            license_id=row.id, revision=row.revision, snapshot=snapshot, actor=actor, created_at=now
        )
    )


def check_template(
    session: Session, principal: Principal, data: LicenseIn, now: datetime
) -> tuple[Customer, Product, Partner | None, str]:
    """Every rule a new license must meet (role, customer, product, features, partner
    namespace, version, no expiry before ``now``'s day): checked once, whether one license
    is issued or ten thousand.
    Returns the customer, product, the caller's partner (if any) and the normalized version."""
    require(principal, Role.ADMIN, Role.SALES, Role.PARTNER)
    today = utc(now).date()
    for i, e in enumerate(data.entitlements):
        # An entitlement works through its expiry day (UTC): one that ended before today
        # would make a license that arrives expired (the agent refuses it on import).
        if e.expiry is not None and e.expiry < today:
            raise Invalid(
                f"entitlements[{i}].expiry: {e.expiry.isoformat()} ({e.feature}) is in the past "
                f"(today is {today.isoformat()}, UTC)"
            )
    customer = get_customer(session, principal, data.customer_id)  # a partner: only its own
    product = get_product(session, data.product)
    partner = _caller_partner(session, principal)
    features = {f.code: f.partner_id for f in product.features}
    seen: set[tuple[str, str]] = set()
    for i, e in enumerate(data.entitlements):
        place = (e.location or data.location, e.feature)
        if place in seen:
            raise Invalid(f"entitlements[{i}]: feature {e.feature} listed twice for location {place[0]}")
        seen.add(place)
    _check_features(
        features,
        [(f"entitlements[{i}].feature", e.feature) for i, e in enumerate(data.entitlements)]
        + [(f"emergency[{i}]", code) for i, code in enumerate(data.emergency)],
        product.code,
        partner,
    )
    if len(set(data.emergency)) != len(data.emergency):
        raise Invalid("emergency: a feature is listed twice")
    _check_emergency(data.emergency, {e.feature for e in data.entitlements})
    _check_checkpoint(data.checkpoint_days, connect=data.connect, binding=data.binding.value)
    return customer, product, partner, _version(data.version, "version")


def _check_checkpoint(checkpoint_days: int | None, *, connect: bool, binding: str) -> None:
    """A checkpoint license counts its days from the last check-in, so one that can never
    check in would be refused or flagged overdue for ever: the agent ignores a checkpoint
    without connect, and a user-bound license is never activated on a machine."""
    if checkpoint_days is None:
        return
    if binding == "user":
        raise Invalid(
            "checkpoint_days: a user-bound license is never activated on a machine, so it has "
            "no check-ins to count from (its leases expire on their own; leave it out)"
        )
    if not connect:
        raise Invalid(
            "checkpoint_days: a checkpoint license is renewed by its check-ins, so it needs "
            "connect (a license with connect off never checks in)"
        )


def _check_emergency(emergency: list[str], entitled: set[str]) -> None:
    """Emergency mode keeps entitled features running; naming a feature the license does not
    grant would hand it out when the server is unreachable."""
    for i, code in enumerate(emergency):
        if code not in entitled:
            raise Invalid(f"emergency[{i}]: {code} is not among the license's entitlements")


def issue_license(
    session: Session, principal: Principal, data: LicenseIn, now: datetime, pepper: bytes
) -> tuple[LicenseRow, str]:
    """Create the license; return it and its license key (the only time the key exists)."""
    customer, product, partner, version = check_template(session, principal, data, now)
    if data.order:
        ensure_order(session, principal, data.order, customer, now)
    key = generate_license_key()
    row = LicenseRow(
        serial=next_serial(session, now.year),
        key_digest=license_key_digest(key, pepper),
        customer_id=customer.id,
        product_id=product.id,
        partner_id=partner.id if partner else None,
        status="active",
        revision=1,
        version_range=version,
        binding=data.binding.value,
        match_level=data.match.value,
        machines_allowed=data.machines,
        connect=data.connect,
        validation_hours=data.validation_hours,
        failover_days=data.failover_days,
        checkpoint_days=data.checkpoint_days,
        emergency=",".join(data.emergency),
        recovery_allowance=data.recovery_allowance,
        recovery_interval_days=data.recovery_interval_days,
        recovery_old_container=data.recovery_old_container,
        recoveries_authorized=0,
        order_ref=data.order,
        sealed=data.seal,
        created_at=now,
        updated_at=now,
    )
    row.customer = customer
    row.product = product
    session.add(row)
    _set_entitlements(row, data.entitlements, data.location)
    _snapshot(session, row, principal.actor, now)
    audit.append(
        session,
        at=now,
        actor=principal.actor,
        action="license.issue",
        target=row.serial,
        details=license_view(row, with_machines=False),
    )
    webhooks.emit(
        session,
        "license.issued",
        {"serial": row.serial, "customer_id": row.customer_id, "product": product.code,
         "binding": row.binding, "order": row.order_ref},
        now,
    )  # fmt: skip
    return row, key


def _check_contradictions(data: LicenseUpdate, default_location: str) -> None:
    """A change that says two things of one feature is refused, as at issue, rather than
    silently applying the last (a count set twice) or cancelling itself out (set and
    removed): the caller meant something and cannot tell what happened."""
    seen: set[tuple[str, str]] = set()
    for i, e in enumerate(data.entitlements):
        place = (e.location or default_location, e.feature)
        if place in seen:
            raise Invalid(f"entitlements[{i}]: feature {e.feature} listed twice for location {place[0]}")
        seen.add(place)
    set_features = {e.feature for e in data.entitlements}
    removed: set[str] = set()
    for i, code in enumerate(data.remove):
        if code in removed:
            raise Invalid(f"remove[{i}]: feature {code} listed twice")
        if code in set_features:
            raise Invalid(f"remove[{i}]: feature {code} is also set in entitlements (set it or remove it)")
        removed.add(code)
    if data.emergency is not None and len(set(data.emergency)) != len(data.emergency):
        raise Invalid("emergency: a feature is listed twice")


def _check_partner_scope(data: LicenseUpdate, emergency_now: list[str], partner: Partner) -> None:
    """A partner changes only its own namespace: it may not take the vendor's features off
    a license (entitlements and emergency features it may not set either, checked with
    the other feature rules)."""
    for i, code in enumerate(data.remove):
        if not code.startswith(partner.namespace):
            raise Forbidden(f"remove[{i}]: {code!r} is outside partner namespace {partner.namespace}")
    if data.emergency is not None:
        for code in emergency_now:
            if not code.startswith(partner.namespace) and code not in data.emergency:
                raise Forbidden(
                    f"emergency: {code!r} is outside partner namespace {partner.namespace} "
                    "(it stays an emergency feature: list it)"
                )


def _check_reactivation(session: Session, row: LicenseRow) -> None:
    """A license of a cancelled order was revoked by the cancellation: reactivating it would
    hand out again what the vendor took back (and no new license may be issued for that
    order either). The order row is locked, so a cancellation running meanwhile is waited
    for (a cancellation locks the order, then only active licenses: no cycle)."""
    if row.order_ref is None:
        return
    status = session.execute(
        select(Order.status).where(Order.number == row.order_ref).with_for_update()
    ).scalar_one_or_none()
    if status == "cancelled":
        raise Conflict(
            f"status: license {row.serial} belongs to order {row.order_ref}, which is cancelled; "
            "it cannot be reactivated (issue a new license)"
        )


def update_license(
    session: Session, principal: Principal, serial: str, data: LicenseUpdate, now: datetime
) -> LicenseRow:
    """A central change: a new revision that reaches installations at their next check-in."""
    require(principal, Role.ADMIN, Role.SALES, Role.SUPPORT, Role.PARTNER)
    row = get_license(session, serial, for_update=True)
    check_access(session, principal, row, write=True)
    partner = _caller_partner(session, principal)
    before = license_view(row, with_machines=False)
    features = {f.code: f.partner_id for f in row.product.features}
    default_location = row.entitlements[0].location if row.entitlements else "main"
    _check_contradictions(data, default_location)
    emergency_now = [code for code in row.emergency.split(",") if code]
    _check_features(
        features,
        [(f"entitlements[{i}].feature", e.feature) for i, e in enumerate(data.entitlements)]
        # A partner may keep (not add) the vendor's emergency features: _check_partner_scope.
        + [
            (f"emergency[{i}]", code)
            for i, code in enumerate(data.emergency or [])
            if partner is None or code not in emergency_now
        ],
        row.product.code,
        partner,
    )
    if partner is not None:
        _check_partner_scope(data, emergency_now, partner)
    _set_entitlements(row, data.entitlements, default_location)
    for code in data.remove:
        matches = [e for e in row.entitlements if e.feature == code]
        if not matches:
            raise Invalid(f"remove: license {serial} has no feature {code!r}")
        for e in matches:
            row.entitlements.remove(e)
    if not row.entitlements:
        raise Invalid("remove: a license needs at least one entitlement")
    if data.status == "active" and row.status != "active":
        _check_reactivation(session, row)
    if data.status is not None:
        row.status = data.status
    if data.version is not None:
        row.version_range = _version(data.version, "version")
    if data.machines is not None:
        bound = len(row.machines)
        if data.machines < bound:
            raise Invalid(f"machines: {bound} machines are bound already (release some first)")
        row.machines_allowed = data.machines
    if data.connect is False and data.checkpoint_days is None and row.checkpoint_days is not None:
        raise Invalid(
            f"connect: license {serial} is a checkpoint license ({row.checkpoint_days} days), "
            "renewed by its check-ins: it cannot be without connect"
        )
    if data.checkpoint_days is not None:
        connect = row.connect if data.connect is None else data.connect
        _check_checkpoint(data.checkpoint_days, connect=connect, binding=row.binding)
    for name in ("connect", "validation_hours", "failover_days", "checkpoint_days"):
        value = getattr(data, name)
        if value is not None:
            setattr(row, name, value)
    if data.emergency is not None:
        _check_emergency(data.emergency, {e.feature for e in row.entitlements})
        row.emergency = ",".join(data.emergency)
    session.flush()
    session.refresh(row, ["entitlements"])
    after = license_view(row, with_machines=False)
    changed = {
        k: {"from": before[k], "to": after[k]}
        for k in after
        if k != "features" and before.get(k) != after[k]  # "features" repeats a location
    }
    if not changed:
        return row
    row.revision += 1
    row.updated_at = now
    _snapshot(session, row, principal.actor, now)
    audit.append(
        session,
        at=now,
        actor=principal.actor,
        action="license.update",
        target=row.serial,
        details={"revision": row.revision, "changes": changed},
    )
    return row
