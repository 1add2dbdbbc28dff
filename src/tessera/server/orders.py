"""Orders: the vendor's order (its number from the ERP), the customer it is for, and the
licenses that fulfil it.

An order comes into being with the first license issued for it (``license issue --order
PO-4711``, or bulk issue with ``order``); every later license for the same number must be
for the same customer, and none may be issued for a cancelled order. Cancelling an order
revokes every active license of it, each as a central change of its own (a revision and an
audit entry), which reaches the installations at their next check-in; the cancellation
itself is an audit entry and an ``order.cancelled`` webhook event.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tessera.server import audit, webhooks
from tessera.server.errors import Forbidden, Invalid, NotFound
from tessera.server.models import Customer, LicenseRow, Order
from tessera.server.schemas import LicenseUpdate
from tessera.server.storage import dialect_insert
from tessera.server.tokens import Principal, Role, require

__all__ = ["cancel_order", "ensure_order", "get_order", "list_orders", "order_view"]

#: Who may read orders: the vendor's staff, and a customer its own.
_READERS = (Role.SUPPORT, Role.SALES, Role.READONLY, Role.CUSTOMER)


def ensure_order(
    session: Session, principal: Principal, number: str, customer: Customer, now: datetime
) -> Order:
    """The order ``number`` for ``customer``, made if it is new (concurrent first licenses
    of one order both find it: the insert skips a row that exists). Partners see no
    orders: they may not attach a license to one, nor learn from the refusal whose it is."""
    if principal.role is Role.PARTNER:
        raise Forbidden("order: a partner's license cannot be for an order (orders are the vendor's)")
    insert = dialect_insert(session)
    made = session.execute(
        insert(Order)
        .values(number=number, customer_id=customer.id, created_at=now, status="open")
        .on_conflict_do_nothing(index_elements=["number"])
        .returning(Order.id)
    ).first()
    order = session.execute(select(Order).where(Order.number == number)).scalar_one()
    if made is not None:
        audit.append(
            session, at=now, actor=principal.actor, action="order.create", target=f"order:{number}",
            details={"customer_id": customer.id},
        )  # fmt: skip
    if order.customer_id != customer.id:
        raise Invalid(f"order: {number} is an order of customer {order.customer_id}, not of {customer.id}")
    if order.status == "cancelled":
        raise Invalid(f"order: {number} is cancelled; no license can be issued for it")
    return order


def get_order(session: Session, principal: Principal, number: str) -> Order:
    require(principal, *_READERS)
    order = session.execute(select(Order).where(Order.number == number)).scalar_one_or_none()
    # Another customer's order answers as a missing one: a 403 would tell which numbers exist.
    if order is None or (principal.role is Role.CUSTOMER and order.customer_id != principal.customer_id):
        raise NotFound(f"order {number!r} not found")
    return order


def order_view(session: Session, order: Order, *, with_licenses: bool = True) -> dict[str, Any]:
    view: dict[str, Any] = {
        "number": order.number,
        "customer_id": order.customer_id,
        "status": order.status,
        "created_at": order.created_at.isoformat(),
        "cancelled_at": order.cancelled_at.isoformat() if order.cancelled_at else None,
    }
    if with_licenses:
        rows = (
            session.execute(
                select(LicenseRow).where(LicenseRow.order_ref == order.number).order_by(LicenseRow.id)
            )
            .unique()
            .scalars()
        )
        view["licenses"] = [
            {
                "serial": r.serial,
                "status": r.status,
                "product": r.product.code,
                "machines_allowed": r.machines_allowed,
            }
            for r in rows
        ]
    return view


def list_orders(
    session: Session, principal: Principal, *, customer_id: int | None, limit: int, offset: int
) -> list[dict[str, Any]]:
    """A page of orders, newest first, each with how many licenses fulfil it."""
    require(principal, *_READERS)
    counted = (
        select(LicenseRow.order_ref, func.count().label("n"))
        .where(LicenseRow.order_ref.is_not(None))
        .group_by(LicenseRow.order_ref)
        .subquery()
    )
    stmt = (
        select(Order, func.coalesce(counted.c.n, 0))
        .outerjoin(counted, counted.c.order_ref == Order.number)
        .order_by(Order.id.desc())
        .limit(limit)
        .offset(offset)
    )
    if principal.role is Role.CUSTOMER:
        stmt = stmt.where(Order.customer_id == principal.customer_id)
    if customer_id is not None:
        stmt = stmt.where(Order.customer_id == customer_id)
    return [
        {**order_view(session, order, with_licenses=False), "licenses": int(count)}
        for order, count in session.execute(stmt).all()
    ]


def cancel_order(session: Session, principal: Principal, number: str, now: datetime) -> tuple[Order, bool]:
    """Cancel the order and revoke each of its active licenses; returns the order and
    whether this call cancelled it. Cancelling a cancelled order changes nothing and is no
    error (as revoking a revoked token): the caller wanted it cancelled, and it is."""
    require(principal, Role.ADMIN, Role.SALES)
    order = session.execute(
        select(Order).where(Order.number == number).with_for_update()
    ).scalar_one_or_none()
    if order is None:
        raise NotFound(f"order {number!r} not found")
    if order.status == "cancelled":
        return order, False
    serials = (
        session.execute(
            select(LicenseRow.serial)
            .where(LicenseRow.order_ref == number, LicenseRow.status == "active")
            .order_by(LicenseRow.id)
        )
        .scalars()
        .all()
    )
    from tessera.server.licenses import update_license  # licenses uses this module

    for serial in serials:
        update_license(session, principal, serial, LicenseUpdate.model_validate({"status": "revoked"}), now)
    order.status = "cancelled"
    order.cancelled_at = now
    audit.append(
        session, at=now, actor=principal.actor, action="order.cancel", target=f"order:{number}",
        details={"revoked": list(serials)},
    )  # fmt: skip
    webhooks.emit(
        session, "order.cancelled",
        {"order": number, "customer_id": order.customer_id, "revoked": list(serials)}, now,
    )  # fmt: skip
    return order, True
