"""The portal's "new license" form: what it offers and how its fields become a license.

The form is the API's :class:`~tessera.server.schemas.LicenseIn` with one row per feature
of the chosen product (a count, a last day, whether it is in the emergency set), so the
same validation and the same service (:func:`tessera.server.licenses.issue_license`)
decide; this module only translates between HTML form fields and that model, and says
which field was wrong in the words of the form, not of the JSON it becomes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from tessera.core.model import Binding, MatchLevel
from tessera.server.errors import Invalid
from tessera.server.models import Customer, Product
from tessera.server.schemas import LicenseIn
from tessera.server.tokens import Principal, Role

__all__ = ["ISSUERS", "MAX_FIELDS", "IssueForm", "customer_choices", "license_in"]

#: Roles that may issue (the service checks again; this decides what the pages offer).
ISSUERS: Final = frozenset({Role.ADMIN, Role.SALES, Role.PARTNER})
#: Most customers the form suggests (newest first); any other is typed by its number.
MAX_CHOICES: Final = 500
#: A form's fields at most: three per feature (a product has at most this many shown).
MAX_FEATURES: Final = 300
MAX_FIELDS: Final = 3 * MAX_FEATURES + 20

#: What the form's fields are called where a validation error names them.
_LABELS: Final = {
    "customer_id": "customer",
    "machines": "machines",
    "failover_days": "failover days",
    "checkpoint_days": "checkpoint days",
    "validation_hours": "validation interval (hours)",
    "version": "product version",
    "order": "order",
    "binding": "binding",
    "match": "hardware match",
    "entitlements": "features",
}


@dataclass(frozen=True, slots=True)
class IssueForm:
    """What the page shows: the product's features and the values typed so far."""

    product: Product
    features: list[tuple[str, str]]  # (code, description)
    values: Mapping[str, str]
    bindings: tuple[str, ...] = tuple(b.value for b in Binding)
    match_levels: tuple[str, ...] = tuple(m.value for m in MatchLevel)


def customer_choices(session: Session, principal: Principal) -> list[Customer]:
    """Customers to suggest: the vendor's staff see theirs; a partner types a number (the
    vendor's customer list is not a partner's to browse)."""
    if principal.role not in (Role.ADMIN, Role.SALES):
        return []
    return list(session.scalars(select(Customer).order_by(Customer.id.desc()).limit(MAX_CHOICES)))


def license_in(form: Mapping[str, Any], product: Product) -> LicenseIn:
    """The license the form asks for; :class:`Invalid` naming the form's field if a value
    is not one."""
    features = [f.code for f in product.features][:MAX_FEATURES]
    entitlements = []
    for code in features:
        count = _field(form, f"count:{code}")
        if not count:
            continue
        if not count.isdigit():
            raise Invalid(f"{code}: the count must be a whole number")
        entitlements.append(
            {"feature": code, "count": int(count), "expiry": _field(form, f"expiry:{code}") or None}
        )
    if not entitlements:
        raise Invalid("features: give a count for at least one feature")
    customer = _field(form, "customer").split(" ", 1)[0]  # a suggestion reads "12 Acme, Berlin"
    if not customer.isdigit():
        raise Invalid("customer: choose a customer (their number)")
    data: dict[str, Any] = {
        "customer_id": int(customer),
        "product": product.code,
        "entitlements": entitlements,
        "emergency": [code for code in features if _field(form, f"emergency:{code}")],
        "binding": _field(form, "binding") or Binding.MACHINE.value,
        "match": _field(form, "match") or MatchLevel.MEDIUM.value,
        "version": _field(form, "version") or "*",
        "machines": _number(form, "machines", 1),
        "failover_days": _number(form, "failover_days", 30),
        "validation_hours": _number(form, "validation_hours", 24),
        "checkpoint_days": _number(form, "checkpoint_days", None),
        "order": _field(form, "order") or None,
        "connect": bool(_field(form, "connect")),
        "seal": bool(_field(form, "seal")),
    }
    try:
        return LicenseIn.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = [str(part) for part in error["loc"]]
        if where and where[0] == "entitlements" and len(where) >= 3:
            label = f"{entitlements[int(where[1])]['feature']} ({where[2]})"
        else:
            label = _LABELS.get(where[0], where[0]) if where else "form"
        raise Invalid(f"{label}: {error['msg'].lower()}") from None


def _field(form: Mapping[str, Any], name: str) -> str:
    value = form.get(name)
    return value.strip()[:200] if isinstance(value, str) else ""


def _number(form: Mapping[str, Any], name: str, default: int | None) -> int | str | None:
    """A whole number as typed; what is not one goes on to the model, which names it."""
    text = _field(form, name)
    if not text:
        return default
    return int(text) if text.isdigit() else text
