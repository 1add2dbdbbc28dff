"""The server's tables (SQLAlchemy 2 declarative models).

The schema itself is owned by the Alembic migrations in ``tessera/server/migrations``; these
classes describe it for queries. License keys are never stored, only their peppered HMAC,
and API tokens only as SHA-256 of a high-entropy secret: a copy of the database alone lets
nobody activate a license or call the API.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from tessera.core.clock import utc

__all__ = [
    "ApiToken",
    "AuditEntry",
    "Base",
    "BlacklistEntryRow",
    "BlacklistExport",
    "BlacklistHit",
    "Checkin",
    "Customer",
    "EntitlementRow",
    "Lease",
    "LeaseNonce",
    "LicenseRevision",
    "LicenseRow",
    "Machine",
    "Order",
    "Partner",
    "PortalSession",
    "PortalUser",
    "Product",
    "ProductFeature",
    "RecoveredMachine",
    "Recovery",
    "SerialCounter",
    "UserCredential",
    "UtcDateTime",
    "WebhookDelivery",
    "WebhookEndpoint",
    "format_licensee",
    "parse_emergency",
]


class UtcDateTime(TypeDecorator[datetime]):
    """Timestamps are aware UTC datetimes on every backend (SQLite itself stores no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else utc(value)


def parse_emergency(stored: str) -> tuple[str, ...]:
    """The stored emergency set (comma-separated codes) as a tuple: one reading for the
    ORM rows and the activation path's plain rows alike."""
    return tuple(code for code in stored.split(",") if code)


def format_licensee(name: str, city: str | None) -> str:
    """How a customer is named in every license file (``name, city``); one spelling for the
    ORM rows and the activation path's plain rows alike."""
    return f"{name}, {city}" if city else name


class Base(DeclarativeBase):
    pass


class Partner(Base):
    """A reseller or integrator that may define and license features in its own namespace."""

    __tablename__ = "partners"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())

    @property
    def namespace(self) -> str:
        return f"partner.{self.code}."


class Product(Base):
    __tablename__ = "products"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    features: Mapped[list[ProductFeature]] = relationship(
        back_populates="product", order_by="ProductFeature.code", lazy="select"
    )


class ProductFeature(Base):
    __tablename__ = "product_features"
    __table_args__ = (UniqueConstraint("product_id", "code"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    code: Mapped[str] = mapped_column(String(330))
    description: Mapped[str] = mapped_column(String(200), default="")
    partner_id: Mapped[int | None] = mapped_column(ForeignKey("partners.id"), nullable=True)
    product: Mapped[Product] = relationship(back_populates="features")


class Customer(Base):
    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    city: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    #: The partner that created this customer (None: the vendor's). A partner sees and
    #: licenses only its own customers and those that hold one of its licenses.
    partner_id: Mapped[int | None] = mapped_column(ForeignKey("partners.id"), nullable=True)

    @property
    def licensee(self) -> str:
        return format_licensee(self.name, self.city)


class SerialCounter(Base):
    """The last serial number handed out per year (``YYYY-NNNNNN``)."""

    __tablename__ = "serial_counters"
    year: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last: Mapped[int] = mapped_column(Integer)


class LicenseRow(Base):
    """The central, current state of one license; every change bumps ``revision``."""

    __tablename__ = "licenses"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    serial: Mapped[str] = mapped_column(String(64), unique=True)
    key_digest: Mapped[str] = mapped_column(String(64), unique=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    partner_id: Mapped[int | None] = mapped_column(ForeignKey("partners.id"), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    revision: Mapped[int] = mapped_column(Integer, default=1)
    version_range: Mapped[str] = mapped_column(String(100), default="*")
    binding: Mapped[str] = mapped_column(String(16), default="machine")
    match_level: Mapped[str] = mapped_column(String(16), default="medium")
    machines_allowed: Mapped[int] = mapped_column(Integer, default=1)
    connect: Mapped[bool] = mapped_column(Boolean, default=True)
    validation_hours: Mapped[int] = mapped_column(Integer, default=24)
    failover_days: Mapped[int] = mapped_column(Integer, default=30)
    checkpoint_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    emergency: Mapped[str] = mapped_column(Text, default="")
    recovery_allowance: Mapped[int | None] = mapped_column(Integer, nullable=True)
    recovery_interval_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: What happens to the old container after a recovery: ``blacklist`` or ``revoke``.
    recovery_old_container: Mapped[str] = mapped_column(String(16), default="blacklist")
    #: Extra recoveries support has authorized and that are not used yet.
    recoveries_authorized: Mapped[int] = mapped_column(Integer, default=0)
    order_ref: Mapped[str | None] = mapped_column(String(100), nullable=True, index=True)
    #: Encrypt the entitlements of every file shipped (key derived from the license key).
    sealed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())

    customer: Mapped[Customer] = relationship(lazy="joined")
    product: Mapped[Product] = relationship(lazy="joined")
    entitlements: Mapped[list[EntitlementRow]] = relationship(
        order_by="(EntitlementRow.location, EntitlementRow.feature)",
        lazy="selectin",
        cascade="all, delete-orphan",
    )
    machines: Mapped[list[Machine]] = relationship(order_by="Machine.slot", lazy="select", viewonly=True)

    @property
    def emergency_features(self) -> tuple[str, ...]:
        return parse_emergency(self.emergency)

    @property
    def licensee(self) -> str:
        return self.customer.licensee

    @property
    def product_code(self) -> str:
        return self.product.code


class EntitlementRow(Base):
    __tablename__ = "entitlements"
    __table_args__ = (UniqueConstraint("license_id", "location", "feature"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    license_id: Mapped[int] = mapped_column(ForeignKey("licenses.id", ondelete="CASCADE"))
    location: Mapped[str] = mapped_column(String(32))
    feature: Mapped[str] = mapped_column(String(330))
    count: Mapped[int] = mapped_column(Integer)
    expiry: Mapped[date | None] = mapped_column(Date, nullable=True)


class LicenseRevision(Base):
    """A snapshot of every revision, so a central change can be traced and compared."""

    __tablename__ = "license_revisions"
    __table_args__ = (UniqueConstraint("license_id", "revision"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    license_id: Mapped[int] = mapped_column(ForeignKey("licenses.id", ondelete="CASCADE"))
    revision: Mapped[int] = mapped_column(Integer)
    snapshot: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Machine(Base):
    """A bound machine slot. ``(license_id, slot)`` is unique so no slot is sold twice."""

    __tablename__ = "machines"
    __table_args__ = (
        UniqueConstraint("license_id", "slot"),
        Index("ix_machines_license_system", "license_id", "system_id", unique=True),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    license_id: Mapped[int] = mapped_column(ForeignKey("licenses.id", ondelete="CASCADE"))
    slot: Mapped[int] = mapped_column(Integer)
    locking_id: Mapped[str] = mapped_column(String(410))
    system_id: Mapped[str] = mapped_column(String(64))
    agent_key: Mapped[str] = mapped_column(String(64))
    activated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_checkin_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    delivered_revision: Mapped[int] = mapped_column(Integer, default=0)
    offline: Mapped[bool] = mapped_column(Boolean, default=False)
    #: When the checkpoint-overdue event was sent; a check-in clears it (migration 0004).
    checkpoint_overdue_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class Checkin(Base):
    __tablename__ = "checkins"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    machine_id: Mapped[int] = mapped_column(ForeignKey("machines.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    outcome: Mapped[str] = mapped_column(String(32))


class ApiToken(Base):
    """An API token: only the SHA-256 of the secret is kept (the secret has 256 bits)."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    partner_id: Mapped[int | None] = mapped_column(ForeignKey("partners.id"), nullable=True)
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Order(Base):
    """An order of the vendor's (its number from the ERP) and the customer it is for; the
    licenses that fulfil it carry its number in ``licenses.order_ref``."""

    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    number: Mapped[str] = mapped_column(String(100), unique=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    status: Mapped[str] = mapped_column(String(16), default="open")
    cancelled_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class PortalUser(Base):
    """A person who signs in to the web portal: an argon2id hash of the password, never
    the password; ``role`` and scope as an API token's (``tokens.Role``)."""

    __tablename__ = "portal_users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    partner_id: Mapped[int | None] = mapped_column(ForeignKey("partners.id"), nullable=True)
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    password_changed_at: Mapped[datetime] = mapped_column(UtcDateTime())
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Wrong passwords in a row; at the limit the account is locked until ``locked_until``.
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    #: Two-step sign-in: the TOTP secret, AES-GCM-sealed under a key derived from the pepper,
    #: and the time step of the last code accepted (a code counts once).
    totp_secret: Mapped[str | None] = mapped_column(String(200), nullable=True)
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class PortalSession(Base):
    """A signed-in browser: only the SHA-256 of the cookie's 256-bit secret is kept."""

    __tablename__ = "portal_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("portal_users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UtcDateTime())
    user: Mapped[PortalUser] = relationship(lazy="joined")


class AuditEntry(Base):
    """One line of the append-only, hash-chained audit log (see :mod:`.audit`)."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(200))
    details: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class Recovery(Base):
    """Every recovery decision (granted or denied) and why: the rules are auditable."""

    __tablename__ = "recoveries"
    __table_args__ = (Index("ix_recoveries_license", "license_id", "at"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    license_id: Mapped[int] = mapped_column(ForeignKey("licenses.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    actor: Mapped[str] = mapped_column(String(200))
    #: ``rehost`` (admin/support) or ``activation`` (a new machine used the same key).
    via: Mapped[str] = mapped_column(String(16))
    old_locking_id: Mapped[str | None] = mapped_column(String(410), nullable=True)
    new_locking_id: Mapped[str] = mapped_column(String(410))
    granted: Mapped[bool] = mapped_column(Boolean)
    #: ``connect``, ``allowance``, ``interval``, ``authorized``, ``portal`` or ``none``.
    rule: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    old_container: Mapped[str | None] = mapped_column(String(16), nullable=True)


class RecoveredMachine(Base):
    """An installation whose license moved away: its next check-in is answered with
    ``lock`` (container blacklisted) or ``revoke`` (only this license withdrawn)."""

    __tablename__ = "recovered_machines"
    __table_args__ = (Index("ix_recovered_license_system", "license_id", "system_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    license_id: Mapped[int] = mapped_column(ForeignKey("licenses.id", ondelete="CASCADE"))
    system_id: Mapped[str] = mapped_column(String(64))
    locking_id: Mapped[str] = mapped_column(String(410))
    agent_key: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(16))
    recovered_at: Mapped[datetime] = mapped_column(UtcDateTime())
    #: The container the blacklist file's [SERIALS] entry for this move is scoped to (a
    #: ``tessera/2`` entry). NULL: the entry has the day grain of ``tessera/1``, for moves
    #: recorded before migration 0012 and instance-bound licenses, whose copies name no
    #: Locking ID to match.
    file_locking_id: Mapped[str | None] = mapped_column(String(410), nullable=True)


class BlacklistEntryRow(Base):
    """A blacklisted container. ``scope`` is ``container`` (everything on it is locked) or
    ``recovered`` (only licenses recovered away from it are withdrawn)."""

    __tablename__ = "blacklist"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    locking_id: Mapped[str] = mapped_column(String(410), unique=True)
    scope: Mapped[str] = mapped_column(String(16))
    since: Mapped[date] = mapped_column(Date)
    #: Days the shipped blacklist file waits before it acts (check-in and activation don't).
    delay_days: Mapped[int] = mapped_column(Integer)
    added_at: Mapped[datetime] = mapped_column(UtcDateTime())
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)


class BlacklistHit(Base):
    """A blacklisted container caught in the act, for sales to follow up."""

    __tablename__ = "blacklist_hits"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    locking_id: Mapped[str] = mapped_column(String(410))
    serial: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: ``checkin`` or ``activation``.
    how: Mapped[str] = mapped_column(String(16))
    #: What it got: ``lock``, ``revoke`` or ``refused``.
    action: Mapped[str] = mapped_column(String(16))
    #: Hits on the same license left out before this one by the server's refusal limit
    #: (migration 0007): every hit is counted, not every one is a row.
    suppressed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class BlacklistExport(Base):
    """One exported blacklist file; its id is the file's sequence number."""

    __tablename__ = "blacklist_exports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    actor: Mapped[str] = mapped_column(String(200))
    containers: Mapped[int] = mapped_column(Integer)
    serials: Mapped[int] = mapped_column(Integer)


# ---------------------------------------------------------------------------- user-bound
# licenses (credentials and leases) and webhooks: migration 0003


class UserCredential(Base):
    """The current credential of one user on a user-bound license.

    Only the credential's public key and generation are kept: the private key went into the
    credential file and nowhere else. Re-issuing replaces the key and bumps the generation.
    """

    __tablename__ = "user_credentials"
    __table_args__ = (UniqueConstraint("license_id", "user_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    license_id: Mapped[int] = mapped_column(ForeignKey("licenses.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(String(64))
    generation: Mapped[int] = mapped_column(Integer)
    public_key: Mapped[str] = mapped_column(String(64))
    issued_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Lease(Base):
    """A feature in use under a credential until ``expires_at`` (renewed by heartbeats).

    ``(license_id, feature, slot)`` is unique and slots run below the licensed count, so the
    count holds even if two transactions ever raced past the row lock.
    """

    __tablename__ = "leases"
    __table_args__ = (
        UniqueConstraint("license_id", "feature", "slot"),
        Index("ix_leases_expiry", "license_id", "feature", "expires_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    lease_id: Mapped[str] = mapped_column(String(64), unique=True)
    license_id: Mapped[int] = mapped_column(ForeignKey("licenses.id", ondelete="CASCADE"))
    credential_id: Mapped[int] = mapped_column(
        ForeignKey("user_credentials.id", ondelete="CASCADE"), index=True
    )
    feature: Mapped[str] = mapped_column(String(330))
    slot: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())


class LeaseNonce(Base):
    """Nonces of recent lease requests: a replayed request is refused (kept for the window
    in which a request's own time is accepted)."""

    __tablename__ = "lease_nonces"
    nonce: Mapped[str] = mapped_column(String(32), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)


class WebhookEndpoint(Base):
    """A receiver of license events. The HMAC secret is stored encrypted (key from the pepper)."""

    __tablename__ = "webhook_endpoints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(String(2000))
    secret: Mapped[str] = mapped_column(Text)
    events: Mapped[str] = mapped_column(Text, default="")
    ca_pem: Mapped[str | None] = mapped_column(Text, nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class WebhookDelivery(Base):
    """The outbox: one row per event and endpoint, written in the transaction that caused the
    event, delivered (and retried) by the server's background worker."""

    __tablename__ = "webhook_outbox"
    __table_args__ = (
        Index("ix_webhook_outbox_due", "status", "next_attempt_at"),
        # One endpoint's due rows, oldest first: the worker claims per endpoint (0013).
        Index("ix_webhook_outbox_endpoint_due", "endpoint_id", "status", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    endpoint_id: Mapped[int] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True
    )
    event_id: Mapped[str] = mapped_column(String(40))
    event: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime())
    locked_until: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(300), nullable=True)
