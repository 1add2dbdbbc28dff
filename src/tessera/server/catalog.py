"""The catalog: products and their features, partners and their namespaces, customers.

A partner's namespace (SPEC: "own namespace only") covers its features (``partner.<code>.``),
its licenses and its customers: those it created, and those that hold one of its licenses
(which it sees on those licenses anyway). The vendor's other customers are not a partner's
to read or license: to a partner they answer as missing ones (404), like another
customer's record to a customer token, since ids are sequential.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Select, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tessera.server.errors import Conflict, Forbidden, Invalid, NotFound
from tessera.server.models import Customer, LicenseRow, Partner, Product, ProductFeature
from tessera.server.schemas import CustomerIn, FeatureIn, PartnerIn, ProductIn
from tessera.server.tokens import Principal, Role, require

__all__ = [
    "add_feature",
    "create_customer",
    "create_partner",
    "create_product",
    "get_customer",
    "get_partner_by_code",
    "get_product",
    "list_products",
    "partner_customers",
    "product_view",
]


def product_view(product: Product) -> dict[str, object]:
    return {
        "code": product.code,
        "name": product.name,
        "features": {f.code: f.description for f in product.features},
    }


def get_product(session: Session, code: str) -> Product:
    product = session.execute(select(Product).where(Product.code == code)).scalar_one_or_none()
    if product is None:
        raise NotFound(f"product {code!r} not found")
    return product


def list_products(session: Session) -> list[Product]:
    return list(session.execute(select(Product).order_by(Product.code)).scalars())


def create_product(session: Session, principal: Principal, data: ProductIn, now: datetime) -> Product:
    require(principal, Role.ADMIN)
    seen: set[str] = set()
    for i, feature in enumerate(data.features):
        if feature.code in seen:
            # A mistake inside this one request (422), not a clash with stored data (409).
            raise Invalid(f"features[{i}]: feature code {feature.code} is listed twice")
        seen.add(feature.code)
    if session.execute(select(Product.id).where(Product.code == data.code)).first():
        raise Conflict(f"product {data.code!r} exists already")
    product = Product(code=data.code, name=data.name, created_at=now)
    session.add(product)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"product {data.code!r} exists already") from None
    for feature in data.features:
        session.add(ProductFeature(product_id=product.id, code=feature.code, description=feature.description))
    session.flush()
    session.refresh(product)
    return product


def add_feature(session: Session, principal: Principal, product_code: str, data: FeatureIn) -> Product:
    """Admins add any feature; a partner only inside its namespace ``partner.<code>.``."""
    require(principal, Role.ADMIN, Role.PARTNER)
    product = get_product(session, product_code)
    partner_id = None
    if principal.role is Role.PARTNER:
        partner = session.get(Partner, principal.partner_id)
        if partner is None or not data.code.startswith(partner.namespace):
            space = partner.namespace if partner else "partner.<code>."
            raise Forbidden(f"a partner may only define features in its namespace {space}")
        partner_id = partner.id
    if any(f.code == data.code for f in product.features):
        raise Conflict(f"product {product.code} has a feature {data.code!r} already")
    session.add(
        ProductFeature(
            product_id=product.id,
            code=data.code,
            description=data.description,
            partner_id=partner_id,
        )
    )
    session.flush()
    session.refresh(product)
    return product


def create_partner(session: Session, principal: Principal, data: PartnerIn, now: datetime) -> Partner:
    require(principal, Role.ADMIN)
    if session.execute(select(Partner.id).where(Partner.code == data.code)).first():
        raise Conflict(f"partner {data.code!r} exists already")
    partner = Partner(code=data.code, name=data.name, created_at=now)
    session.add(partner)
    session.flush()
    return partner


def get_partner_by_code(session: Session, code: str) -> Partner:
    partner = session.execute(select(Partner).where(Partner.code == code)).scalar_one_or_none()
    if partner is None:
        raise NotFound(f"partner {code!r} not found")
    return partner


def create_customer(session: Session, principal: Principal, data: CustomerIn, now: datetime) -> Customer:
    """A new customer; one a partner creates is the partner's (see the module's docstring)."""
    require(principal, Role.ADMIN, Role.SALES, Role.PARTNER)
    partner_id = principal.partner_id if principal.role is Role.PARTNER else None
    customer = Customer(name=data.name, city=data.city, created_at=now, partner_id=partner_id)
    session.add(customer)
    session.flush()
    return customer


def _partner_holds(partner_id: int) -> Select[int]:
    """The customers that hold one of the partner's licenses (a subquery of their ids)."""
    return select(LicenseRow.customer_id).where(LicenseRow.partner_id == partner_id)


def _sees(session: Session, principal: Principal, customer: Customer) -> bool:
    if principal.role is Role.CUSTOMER:
        return principal.customer_id == customer.id
    if principal.role is Role.PARTNER:
        if principal.partner_id is None:
            return False
        if customer.partner_id == principal.partner_id:
            return True
        held = _partner_holds(principal.partner_id).where(LicenseRow.customer_id == customer.id).limit(1)
        return session.execute(held).first() is not None
    return True


def get_customer(session: Session, principal: Principal, customer_id: int) -> Customer:
    """The customer, if the caller may see it: a customer token sees itself, a partner its
    own customers; any other one answers exactly as a missing one (ids are sequential)."""
    customer = session.get(Customer, customer_id)
    if customer is None or not _sees(session, principal, customer):
        raise NotFound(f"customer {customer_id} not found")
    return customer


def partner_customers(session: Session, partner_id: int, limit: int) -> list[Customer]:
    """A partner's customers, newest first: those it created and those holding its licenses."""
    stmt = (
        select(Customer)
        .where(or_(Customer.partner_id == partner_id, Customer.id.in_(_partner_holds(partner_id))))
        .order_by(Customer.id.desc())
        .limit(limit)
    )
    return list(session.scalars(stmt))
