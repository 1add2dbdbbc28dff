"""The license model as immutable value objects.

A :class:`License` is the *feature part* (``.lic``): who may use which features, how many,
until when, where. An :class:`Identity` is the *identity part* (``.par``) of an
instance-bound installation: it names licensee, serial, location and version and carries the
instance's admin secret, hashed. Both are checked on construction, so an object that exists
is a valid document; parsers and the server build them and never have to re-validate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from enum import StrEnum

from tessera.core.clock import utc
from tessera.core.errors import shown
from tessera.core.versions import VersionRange

__all__ = [
    "Binding",
    "Entitlement",
    "Identity",
    "License",
    "Location",
    "MatchLevel",
    "check_feature_code",
    "check_location_name",
    "check_product_code",
    "check_serial",
]

FEATURE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}(\.[A-Za-z0-9][A-Za-z0-9_-]{0,63}){0,4}$")
PRODUCT_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
SERIAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LOCATION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
LOCKING_ID_RE = re.compile(r"^TL1-[A-Z2-7]{8,400}$")
INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{7,63}$")
B64_RE = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
SECRET_HASH_RE = re.compile(r"^scrypt\$[0-9]+\$[0-9]+\$[0-9]+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$")
_FEATURE_MATCH = FEATURE_RE.match
MAX_COUNT = 1_000_000_000
MAX_TEXT = 200


class Binding(StrEnum):
    """Where a license may live (the "container")."""

    MACHINE = "machine"
    INSTANCE = "instance"
    USER = "user"


class MatchLevel(StrEnum):
    """How many Locking ID components must still agree for a machine to match."""

    STRICT = "strict"
    MEDIUM = "medium"
    LOOSE = "loose"


def _check(pattern: re.Pattern[str], value: str, what: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(f"invalid {what}: {shown(value)}")
    return value


def check_feature_code(value: str) -> str:
    return _check(FEATURE_RE, value, "feature code")


def check_product_code(value: str) -> str:
    return _check(PRODUCT_RE, value, "product code")


def check_serial(value: str) -> str:
    return _check(SERIAL_RE, value, "serial number")


def check_location_name(value: str) -> str:
    return _check(LOCATION_RE, value, "location name")


def check_text(value: str, what: str) -> str:
    if (
        not isinstance(value, str)
        or not value
        or value != value.strip()
        or len(value) > MAX_TEXT
        or not value.isprintable()  # every character printable (and not empty, checked above)
    ):
        raise ValueError(f"invalid {what}: {shown(value)} (1-{MAX_TEXT} printable characters)")
    return value


def _check_timestamp(value: datetime, what: str) -> None:
    if type(value) is datetime and value.tzinfo is UTC and not value.microsecond:
        return  # the usual case (parsers and clocks give exactly this): UTC, whole seconds
    if not isinstance(value, datetime) or value.tzinfo is None or value.microsecond:
        raise ValueError(f"invalid {what}: must be a UTC time in whole seconds")
    if utc(value) != value or value.utcoffset() is None or value.utcoffset().total_seconds():  # type: ignore[union-attr]
        raise ValueError(f"invalid {what}: must be in UTC")


@dataclass(frozen=True, slots=True)
class Entitlement:
    """``feature = count, expiry``: up to ``count`` users or interfaces until ``expiry``.

    ``expiry`` is inclusive (the feature works through that whole UTC day); ``None`` means
    permanent.
    """

    feature: str
    count: int
    expiry: date | None = None

    def __post_init__(self) -> None:
        # Built thousands of times per bulk run and per file read: the exact types take the
        # short way through each check, anything else the general one.
        feature, count, expiry = self.feature, self.count, self.expiry
        if type(feature) is not str or not _FEATURE_MATCH(feature):
            check_feature_code(feature)
        if type(count) is not int and (isinstance(count, bool) or not isinstance(count, int)):
            raise ValueError(f"invalid count for {feature}: {shown(count)}")
        if not 0 <= count <= MAX_COUNT:
            raise ValueError(f"invalid count for {feature}: {count} (0-{MAX_COUNT})")
        if (
            expiry is not None
            and type(expiry) is not date
            and (not isinstance(expiry, date) or isinstance(expiry, datetime))
        ):
            raise ValueError(f"invalid expiry for {feature}: {shown(expiry)}")

    @property
    def permanent(self) -> bool:
        return self.expiry is None

    def valid_on(self, day: date) -> bool:
        return self.expiry is None or day <= self.expiry


@dataclass(frozen=True, slots=True)
class Location:
    """A named site of a distributed installation and the entitlements it holds."""

    name: str
    entitlements: tuple[Entitlement, ...] = ()

    def __post_init__(self) -> None:
        check_location_name(self.name)
        if type(self.entitlements) is not tuple:
            object.__setattr__(self, "entitlements", tuple(self.entitlements))
        seen: set[str] = set()
        for e in self.entitlements:
            if not isinstance(e, Entitlement):
                raise ValueError(f"location {self.name}: not an entitlement: {shown(e)}")
            if e.feature in seen:
                raise ValueError(f"location {self.name}: feature {e.feature} listed twice")
            seen.add(e.feature)

    def get(self, feature: str) -> Entitlement | None:
        for e in self.entitlements:
            if e.feature == feature:
                return e
        return None


@dataclass(frozen=True, slots=True)
class License:
    """The feature part of a license: the document a vendor signs and an agent enforces.

    ``sealed`` holds the AES-GCM encrypted location sections when the vendor chose to
    encrypt them; then ``locations`` is empty until :func:`tessera.core.sealing.unseal`.
    """

    licensee: str
    serial: str
    product: str
    version: VersionRange
    issued: datetime
    locations: tuple[Location, ...] = ()
    binding: Binding = Binding.MACHINE
    locking_id: str | None = None
    match: MatchLevel = MatchLevel.MEDIUM
    instance_id: str | None = None
    user_id: str | None = None
    revision: int = 1
    connect: bool = True
    validation_hours: int = 24
    failover_days: int = 30
    checkpoint_days: int | None = None
    emergency: tuple[str, ...] = ()
    recovery_allowance: int | None = None
    recovery_interval_days: int | None = None
    agent_key: str | None = None
    sealed: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_text(self.licensee, "licensee")
        check_serial(self.serial)
        check_product_code(self.product)
        if not isinstance(self.version, VersionRange):
            raise ValueError(f"invalid version range: {shown(self.version)}")
        _check_timestamp(self.issued, "issued time")
        # Normalize only what needs it (parsers already pass enums and tuples).
        if type(self.binding) is not Binding:
            object.__setattr__(self, "binding", Binding(self.binding))
        if type(self.match) is not MatchLevel:
            object.__setattr__(self, "match", MatchLevel(self.match))
        if type(self.locations) is not tuple:
            object.__setattr__(self, "locations", tuple(self.locations))
        if type(self.emergency) is not tuple:
            object.__setattr__(self, "emergency", tuple(self.emergency))
        names: set[str] = set()
        for loc in self.locations:
            if not isinstance(loc, Location):
                raise ValueError(f"not a location: {shown(loc)}")
            if loc.name in names:
                raise ValueError(f"location {loc.name} listed twice")
            names.add(loc.name)
        if self.sealed is not None:
            if self.locations:
                raise ValueError("a sealed license carries no clear-text locations")
            _check(B64_RE, self.sealed, "sealed entitlements")
        elif not self.locations:
            raise ValueError("a license needs at least one location")
        if self.binding is Binding.MACHINE and self.locking_id is None:
            raise ValueError("a machine-bound license needs a locking-id")
        if self.binding is Binding.INSTANCE and self.instance_id is None:
            raise ValueError("an instance-bound license needs an instance-id")
        if self.binding is Binding.USER and self.user_id is None:
            raise ValueError("a user-bound license needs a user-id")
        if self.locking_id is not None:
            _check(LOCKING_ID_RE, self.locking_id, "locking-id")
        if self.instance_id is not None:
            _check(INSTANCE_ID_RE, self.instance_id, "instance-id")
        if self.user_id is not None:
            _check(INSTANCE_ID_RE, self.user_id, "user-id")
        if self.agent_key is not None:
            _check(B64_RE, self.agent_key, "agent-key")
        _positive(self.revision, "revision", 1)
        _positive(self.validation_hours, "validation-hours", 1)
        _positive(self.failover_days, "failover-days", 0)
        if self.checkpoint_days is not None:
            _positive(self.checkpoint_days, "checkpoint-days", 1)
        if self.recovery_allowance is not None:
            _positive(self.recovery_allowance, "recovery-allowance", 0)
        if self.recovery_interval_days is not None:
            _positive(self.recovery_interval_days, "recovery-interval-days", 0)
        if len(set(self.emergency)) != len(self.emergency):
            raise ValueError("emergency feature listed twice")
        for code in self.emergency:
            check_feature_code(code)

    def location(self, name: str | None = None) -> Location:
        """The named location, or the only/first one when ``name`` is None."""
        if name is None:
            if not self.locations:
                raise KeyError("license has no clear-text locations (sealed?)")
            return self.locations[0]
        for loc in self.locations:
            if loc.name == name:
                return loc
        raise KeyError(f"license {self.serial} has no location {shown(name)}")

    def evolve(self, **changes: object) -> License:
        """A copy with ``changes`` applied (and validated)."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Identity:
    """The identity part (``.par``) of an instance-bound installation.

    ``admin_secret`` is the scrypt hash of the instance's administration secret: the clear
    secret is shown to the customer once and never stored.
    """

    licensee: str
    serial: str
    product: str
    version: VersionRange
    location: str
    instance_id: str
    admin_secret: str
    issued: datetime

    def __post_init__(self) -> None:
        check_text(self.licensee, "licensee")
        check_serial(self.serial)
        check_product_code(self.product)
        if not isinstance(self.version, VersionRange):
            raise ValueError(f"invalid version range: {shown(self.version)}")
        check_location_name(self.location)
        _check(INSTANCE_ID_RE, self.instance_id, "instance-id")
        _check(SECRET_HASH_RE, self.admin_secret, "admin-secret hash")
        _check_timestamp(self.issued, "issued time")

    def evolve(self, **changes: object) -> Identity:
        return replace(self, **changes)  # type: ignore[arg-type]


def _positive(value: int, what: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_COUNT:
        raise ValueError(f"invalid {what}: {shown(value)}")
