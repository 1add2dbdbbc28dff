"""The portal's forms of a license's terms: a new license, and a change to one.

The new-license form is the API's :class:`~tessera.server.schemas.LicenseIn` with one row
per feature of the chosen product (a count, a last day, whether it is in the emergency
set); the change form is :class:`~tessera.server.schemas.LicenseUpdate` with the same
rows, filled in with the license's terms. The same validation and the same services
(:func:`tessera.server.licenses.issue_license`, :func:`~tessera.server.licenses.update_license`)
decide; this module only translates between HTML form fields and those models, and says
which field was wrong in the words of the form, not of the JSON it becomes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from tessera.core.model import Binding, MatchLevel
from tessera.server import catalog
from tessera.server.errors import Invalid
from tessera.server.models import Customer, Product
from tessera.server.schemas import LicenseIn, LicenseUpdate
from tessera.server.tokens import Principal, Role

__all__ = [
    "ISSUERS",
    "MAX_FIELDS",
    "IssueForm",
    "customer_choices",
    "license_in",
    "license_update",
    "terms_values",
]

#: Roles that may issue (the service checks again; this decides what the pages offer).
ISSUERS: Final = frozenset({Role.ADMIN, Role.SALES, Role.PARTNER})
#: Most customers the form suggests (newest first); any other is typed by its number.
MAX_CHOICES: Final = 500
#: A form's fields at most: three per feature (a product has at most this many shown).
MAX_FEATURES: Final = 300
MAX_FIELDS: Final = 3 * MAX_FEATURES + 20

#: What the form's fields are called where a validation error names them.
#: (A field not listed is called by its own name.)
_LABELS: Final = {
    "customer_id": "customer",
    "failover_days": "failover days",
    "checkpoint_days": "checkpoint days",
    "validation_hours": "validation interval (hours)",
    "version": "product version",
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
    """Customers to suggest: the vendor's staff see all; a partner its own (the vendor's
    customer list is not a partner's to browse, see :mod:`tessera.server.catalog`)."""
    if principal.role is Role.PARTNER and principal.partner_id is not None:
        return catalog.partner_customers(session, principal.partner_id, MAX_CHOICES)
    if principal.role not in (Role.ADMIN, Role.SALES):
        return []
    return list(session.scalars(select(Customer).order_by(Customer.id.desc()).limit(MAX_CHOICES)))


def license_in(form: Mapping[str, Any], product: Product) -> LicenseIn:
    """The license the form asks for; :class:`Invalid` naming the form's field if a value
    is not one."""
    features = [f.code for f in product.features][:MAX_FEATURES]
    entitlements = _entitlements(form, features)
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
    return _validated(LicenseIn, data, entitlements)


def terms_values(view: Mapping[str, Any]) -> dict[str, str]:
    """A license's terms (:func:`tessera.server.licenses.license_view`) as the change
    form's fields."""
    values = {
        "machines": str(view["machines_allowed"]),
        "failover_days": str(view["failover_days"]),
        "validation_hours": str(view["validation_hours"]),
        "checkpoint_days": "" if view["checkpoint_days"] is None else str(view["checkpoint_days"]),
        "version": view["version"],
        "connect": "on" if view["connect"] else "",
    }
    for code, terms in view["features"].items():
        values[f"count:{code}"] = str(terms["count"])
        values[f"expiry:{code}"] = "" if terms["expiry"] == "permanent" else terms["expiry"]
    for code in view["emergency"]:
        values[f"emergency:{code}"] = "on"
    return values


def license_update(
    form: Mapping[str, Any], product: Product, view: Mapping[str, Any]
) -> LicenseUpdate | None:
    """What the change form changes of the license ``view`` shows, as one central change
    (None if nothing): features given a count are set, features whose count was emptied
    are removed, every other term only if it differs. :class:`Invalid` naming the field."""
    features = [f.code for f in product.features][:MAX_FEATURES]
    wanted = _entitlements(form, features)
    current = terms_values(view)
    data: dict[str, Any] = {
        "entitlements": [
            e
            for e in wanted
            if (str(e["count"]), e["expiry"] or "")
            != (current.get(f"count:{e['feature']}"), current.get(f"expiry:{e['feature']}"))
        ],
        "remove": [code for code in view["features"] if code not in {e["feature"] for e in wanted}],
    }
    emergency = [code for code in features if _field(form, f"emergency:{code}")]
    if emergency != [code for code in features if code in view["emergency"]]:
        data["emergency"] = emergency
    for name in ("machines", "failover_days", "validation_hours", "checkpoint_days"):
        if _field(form, name) != current[name]:
            if name == "checkpoint_days" and not _field(form, name):
                raise Invalid("checkpoint days: a checkpoint license stays one (give a number of days)")
            data[name] = _number(form, name, None)
    if (_field(form, "version") or "*") != current["version"]:
        data["version"] = _field(form, "version") or "*"
    if bool(_field(form, "connect")) != bool(current["connect"]):
        data["connect"] = bool(_field(form, "connect"))
    if not data["entitlements"]:
        del data["entitlements"]
    if not data["remove"]:
        del data["remove"]
    if not data:
        return None
    return _validated(LicenseUpdate, data, data.get("entitlements", []))


def _entitlements(form: Mapping[str, Any], features: list[str]) -> list[dict[str, Any]]:
    """The feature rows given a count, in the product's order."""
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
    return entitlements


_Model = TypeVar("_Model", LicenseIn, LicenseUpdate)


def _validated(model: type[_Model], data: dict[str, Any], entitlements: list[dict[str, Any]]) -> _Model:
    """``data`` as ``model``; :class:`Invalid` naming the form's field for the first error."""
    try:
        return model.model_validate(data)
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
