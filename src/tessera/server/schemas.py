"""Request and response bodies of the admin API (pydantic; they make the OpenAPI document).

Limits mirror :mod:`tessera.core.model`, so whatever passes here can become a license file;
a violation is a 422 whose ``loc`` names the field.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tessera.core.model import MAX_COUNT, Binding, MatchLevel, check_text
from tessera.server.tokens import INITIAL_TOKEN_NAME, MAX_TOKEN_NAME, Role

__all__ = [
    "MAX_BULK",
    "AuditEntryOut",
    "AuditReport",
    "BulkIssued",
    "BulkLicenseIn",
    "BulkLicenseOut",
    "CredentialIn",
    "CredentialIssued",
    "CustomerIn",
    "CustomerOut",
    "EntitlementIn",
    "ErrorBody",
    "FeatureIn",
    "LicenseIn",
    "LicenseIssued",
    "LicenseSummary",
    "LicenseUpdate",
    "NewEntitlementIn",
    "OfflineActivation",
    "OrderLicense",
    "OrderOut",
    "OrderSummary",
    "PartnerIn",
    "PartnerOut",
    "ProductIn",
    "ProductOut",
    "TokenIn",
    "TokenOut",
    "UserIn",
    "UserOut",
    "UserUpdate",
    "ValidationErrorBody",
    "ValidationItem",
    "WebhookIn",
    "WebhookOut",
]

ProductCode = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$", examples=["cortex"])]
FeatureCode = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}(\.[A-Za-z0-9][A-Za-z0-9_-]{0,63}){0,4}$",
        examples=["uniplex"],
    ),
]
LocationName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$", examples=["main"])]
PartnerCode = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,31}$", examples=["acme"])]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Days = Annotated[int, Field(ge=0, le=36500)]
PositiveDays = Annotated[int, Field(ge=1, le=36500)]


#: An order number goes into URLs as one path segment (``/api/v1/orders/{number}``), so no
#: "/" (a server decodes "%2F" before routing), "?", "#" or "%"; what ERP numbers use.
MAX_ORDER = 100
ORDER_RE = re.compile(rf"[A-Za-z0-9](?:[A-Za-z0-9 ._:+-]{{0,{MAX_ORDER - 2}}}[A-Za-z0-9._:+-])?")
ORDER_RULE = f"1-{MAX_ORDER} characters: letters A-Z, digits and . _ - : + (spaces only between them)"


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _text(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    try:
        return check_text(value, what)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


class ErrorBody(BaseModel):
    detail: str


class ValidationItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    """422: FastAPI's list naming each field, or one line for rules beyond the schema."""

    detail: str | list[ValidationItem]


class FeatureIn(_In):
    code: FeatureCode
    description: str = Field("", max_length=200)

    @field_validator("description")
    @classmethod
    def _description(cls, v: str) -> str:
        return v if v == "" else (_text(v, "description") or v)


class ProductIn(_In):
    code: ProductCode
    name: str = Field(min_length=1, max_length=200)
    features: list[FeatureIn] = Field(default_factory=list, max_length=1000)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _text(v, "name") or v


class ProductOut(BaseModel):
    code: str
    name: str
    features: dict[str, str]


class PartnerIn(_In):
    code: PartnerCode
    name: str = Field(min_length=1, max_length=200)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _text(v, "name") or v


class PartnerOut(BaseModel):
    id: int
    code: str
    name: str
    namespace: str


class CustomerIn(_In):
    name: str = Field(min_length=1, max_length=200)
    city: str | None = Field(None, min_length=1, max_length=200)

    @field_validator("name", "city")
    @classmethod
    def _printable(cls, v: str | None) -> str | None:
        return _text(v, "text")


class CustomerOut(BaseModel):
    id: int
    name: str
    city: str | None
    licensee: str


class EntitlementIn(_In):
    feature: FeatureCode
    count: Count
    expiry: date | None = Field(None, description="Last valid day (UTC); null means permanent.")
    location: LocationName | None = Field(None, description="Default: the license's location.")


class NewEntitlementIn(EntitlementIn):
    """An entitlement of a license being issued: a count of 0 would grant nothing (the
    agent refuses such a feature), so a new license holds at least one seat of each. (A
    change may still set 0, and an expiry in the past is refused at issue by the service,
    which knows the server's date.)"""

    count: Annotated[int, Field(ge=1, le=MAX_COUNT)]


class LicenseIn(_In):
    customer_id: int = Field(ge=1, le=2**31 - 1)
    product: ProductCode
    entitlements: list[NewEntitlementIn] = Field(min_length=1, max_length=1000)
    location: LocationName = "main"
    version: str = Field("*", min_length=1, max_length=100, examples=["4.*"])
    binding: Binding = Binding.MACHINE
    match: MatchLevel = MatchLevel.MEDIUM
    machines: int = Field(1, ge=1, le=100_000, description="How many machines may be bound.")
    connect: bool = True
    validation_hours: int = Field(24, ge=1, le=24 * 365)
    failover_days: Days = 30
    checkpoint_days: PositiveDays | None = None
    emergency: list[FeatureCode] = Field(default_factory=list, max_length=1000)
    recovery_allowance: Annotated[int, Field(ge=0, le=1000)] | None = None
    recovery_interval_days: Days | None = None
    recovery_old_container: Literal["blacklist", "revoke"] = Field(
        "blacklist",
        description="After a recovery: blacklist the old container or only revoke this license there.",
    )
    order: str | None = Field(
        None, max_length=MAX_ORDER, description=f"The order this license fulfils ({ORDER_RULE})."
    )
    seal: bool = Field(
        False, description="Encrypt the entitlements in every shipped file to the license key."
    )

    @field_validator("order")
    @classmethod
    def _order(cls, v: str | None) -> str | None:
        if v is not None and not ORDER_RE.fullmatch(v):
            raise ValueError(f"invalid order: {v[:MAX_ORDER]!r} ({ORDER_RULE})")
        return v


class LicenseIssued(BaseModel):
    serial: str
    key: str = Field(description="The license key, shown this once: the server keeps only a digest.")
    revision: int


#: Most licenses one bulk request may issue; a client loops over chunks for more.
MAX_BULK = 10_000


class BulkLicenseIn(LicenseIn):
    """The template of every license, plus how many: ``count`` unbound licenses, or one
    license per entry of ``locking_ids``, each pre-bound to that machine at issue."""

    count: int | None = Field(
        None, ge=1, le=MAX_BULK, description=f"Issue this many unbound licenses (at most {MAX_BULK:,})."
    )
    locking_ids: list[Annotated[str, Field(pattern=r"^TL1-[A-Z2-7]{8,400}$")]] | None = Field(
        None,
        min_length=1,
        max_length=MAX_BULK,
        description="One license per Locking ID, bound to that machine (slot 0) at issue, its "
        f"license file signed now (at most {MAX_BULK:,}).",
    )


class BulkLicenseOut(BaseModel):
    serial: str
    key: str = Field(description="The license key, shown this once.")
    locking_id: str | None = Field(None, description="Pre-bound: the machine it is bound to.")
    license: str | None = Field(None, description="Pre-bound: the signed license file.")


class BulkIssued(BaseModel):
    count: int
    first_serial: str
    last_serial: str
    serials_sha256: str = Field(
        description="SHA-256 of the serials joined by newlines, as recorded in the audit log."
    )
    licenses: list[BulkLicenseOut]


class LicenseSummary(BaseModel):
    serial: str
    status: str
    revision: int
    licensee: str
    product: str
    machines_allowed: int


class LicenseUpdate(_In):
    entitlements: list[EntitlementIn] = Field(
        default_factory=list, max_length=1000, description="Set (add or replace) these."
    )
    remove: list[FeatureCode] = Field(default_factory=list, max_length=1000)
    status: Literal["active", "revoked"] | None = None
    version: str | None = Field(None, min_length=1, max_length=100)
    machines: int | None = Field(None, ge=1, le=100_000)
    connect: bool | None = None
    validation_hours: int | None = Field(None, ge=1, le=24 * 365)
    failover_days: Days | None = None
    checkpoint_days: PositiveDays | None = None
    emergency: list[FeatureCode] | None = Field(None, max_length=1000)


class OfflineActivation(BaseModel):
    serial: str
    license: str = Field(description="The signed license file for the requesting machine.")
    identity: str | None = Field(
        None, description="The signed identity file (.par) of an instance-bound license."
    )


class TokenIn(_In):
    name: str = Field(min_length=1, max_length=MAX_TOKEN_NAME)
    role: Role
    partner: PartnerCode | None = None
    customer_id: int | None = Field(None, ge=1, le=2**31 - 1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        v = _text(v, "name") or v
        # The security checklist finds the token of `server init` by this name: a second
        # one would hide it, or make a revoked initial token look active.
        if v.strip().casefold() == INITIAL_TOKEN_NAME:
            raise ValueError(f"{INITIAL_TOKEN_NAME!r} is reserved for the token of server init")
        return v


class TokenOut(BaseModel):
    id: int
    name: str
    role: Role
    token: str = Field(description="The secret, shown this once.")


class TokenView(BaseModel):
    """A token as the listing shows it: never the secret or its hash."""

    id: int
    name: str
    role: Role
    partner: str | None = Field(description="The partner's code (role partner).")
    customer_id: int | None
    created_at: datetime
    revoked: bool


class RevokedToken(TokenView):
    own: bool = Field(description="The token this request was made with: it no longer works.")


class OrderSummary(BaseModel):
    number: str
    customer_id: int
    status: Literal["open", "cancelled"]
    created_at: datetime
    cancelled_at: datetime | None
    licenses: int = Field(description="How many licenses fulfil the order.")


class OrderLicense(BaseModel):
    serial: str
    status: str
    product: str
    machines_allowed: int


class OrderOut(BaseModel):
    number: str
    customer_id: int
    status: Literal["open", "cancelled"]
    created_at: datetime
    cancelled_at: datetime | None
    licenses: list[OrderLicense]


class OrderCancelled(OrderOut):
    cancelled_now: bool = Field(
        description="False: the order was cancelled already (see cancelled_at); nothing changed."
    )


Username = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._@-]{2,63}$", examples=["maria.keller"])]
Password = Annotated[str, Field(min_length=1, max_length=256)]


class UserIn(_In):
    """A person who signs in to the web portal; without ``password`` one is generated and
    shown once in the answer."""

    username: Username
    role: Role
    password: Password | None = None
    partner: PartnerCode | None = None
    customer_id: int | None = Field(None, ge=1, le=2**31 - 1)


class UserUpdate(_In):
    password: Password | None = None
    #: Make a new password and show it once in the answer (instead of ``password``).
    generate_password: bool = False
    disabled: bool | None = None
    #: End a lockout after too many wrong passwords.
    unlock: bool = False
    #: Turn the user's two-step sign-in off (a lost phone); they can set it up again.
    reset_two_factor: bool = False


class UserOut(BaseModel):
    username: str
    role: Role
    customer_id: int | None
    partner_id: int | None
    disabled: bool
    locked: bool
    two_factor: bool = Field(description="Signs in with a code from an authenticator app too.")
    created_at: datetime
    password_changed_at: datetime
    password: str | None = Field(None, description="A generated password, shown this once.")


class AuditReport(BaseModel):
    ok: bool
    rows: int
    head: str
    problems: list[str]


class AuditEntryOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    details: dict[str, Any]


class RehostIn(_In):
    locking_id: str = Field(pattern=r"^TL1-[A-Z2-7]{8,400}$", description="The new container.")
    slot: int | None = Field(
        None, ge=0, le=100_000, description="Which bound machine moves (needed when several)."
    )
    old_container: Literal["blacklist", "revoke"] | None = Field(
        None,
        description="Blacklist the old container or only revoke this license there; "
        "default: the license's rule.",
    )
    delay_days: int = Field(
        0, ge=0, le=3650, description="Days the shipped blacklist file waits before it acts."
    )


class AuthorizeRecoveryIn(_In):
    count: int = Field(1, ge=1, le=1000)


class BlacklistAddIn(_In):
    locking_id: str = Field(pattern=r"^TL1-[A-Z2-7]{8,400}$")
    revoke_recovered_only: bool = Field(
        False, description="Withdraw only licenses recovered away from it, not the container."
    )
    delay_days: int = Field(0, ge=0, le=3650)
    reason: str = Field("added by hand", min_length=1, max_length=500)


class CredentialIn(_In):
    user_id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$",
        examples=["ann"],
        description="Who the credential is for: an id, no further personal data.",
    )


class CredentialIssued(BaseModel):
    serial: str
    user_id: str
    generation: int
    leases_freed: int
    credential: str = Field(description="The credential file (holds the private key).")


class WebhookIn(_In):
    url: str = Field(min_length=8, max_length=2000, examples=["https://hooks.example.com/t"])
    secret: str | None = Field(
        None, min_length=16, max_length=200, description="HMAC secret; generated if omitted."
    )
    events: list[str] = Field(
        default_factory=list, max_length=50, description="Events to send; empty means all."
    )
    ca: str | None = Field(
        None, max_length=65536, description="PEM CA to trust for this endpoint (private PKI)."
    )


class WebhookOut(BaseModel):
    id: int
    url: str
    events: list[str]
    active: bool
    created_at: str
    secret: str = Field(description="The HMAC secret, shown this once.")
