"""License specifications: the TOML a vendor writes to sign a license without a server.

Example (``tessera license sign spec.toml --key keys/ -o customer.lic``)::

    licensee = "myCompany, City"
    serial = "2026-000123"
    product = "cortex"
    version = "4.*"
    binding = "machine"
    locking-id = "TL1-..."
    failover-days = 30
    emergency = ["ctxjs"]

    [locations.abc]
    backup = "1, 2027-01-15"
    uniplex = { count = 5, expiry = 2027-01-15 }
    ctxjs = 1                      # permanent
"""

from __future__ import annotations

import tomllib
from datetime import date, datetime
from typing import Any

from tessera.core.clock import utc
from tessera.core.errors import FormatError
from tessera.core.fileformat import parse_timestamp
from tessera.core.model import Entitlement, License, Location
from tessera.core.versions import VersionRange

__all__ = ["license_from_spec", "load_spec"]

_SCALARS = {
    "licensee": "licensee",
    "serial": "serial",
    "product": "product",
    "binding": "binding",
    "locking-id": "locking_id",
    "match": "match",
    "instance-id": "instance_id",
    "user-id": "user_id",
    "agent-key": "agent_key",
    "revision": "revision",
    "connect": "connect",
    "validation-hours": "validation_hours",
    "failover-days": "failover_days",
    "checkpoint-days": "checkpoint_days",
    "recovery-allowance": "recovery_allowance",
    "recovery-interval-days": "recovery_interval_days",
}


def _entitlement(feature: str, value: Any) -> Entitlement:
    if isinstance(value, bool):
        raise ValueError(f"{feature}: expected a count")
    if isinstance(value, int):
        return Entitlement(feature, value, None)
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if len(parts) != 2:
            raise ValueError(f"{feature}: expected 'count, expiry', got {value!r}")
        count, until = parts
        if not count.isdigit():
            raise ValueError(f"{feature}: bad count {count!r}")
        return Entitlement(feature, int(count), None if until == "permanent" else date.fromisoformat(until))
    if isinstance(value, dict):
        extra = set(value) - {"count", "expiry"}
        if extra or "count" not in value:
            raise ValueError(f"{feature}: expected {{ count = N, expiry = DATE }}")
        raw = value.get("expiry", "permanent")
        expiry: date | None
        if raw == "permanent":
            expiry = None
        elif isinstance(raw, str):
            expiry = date.fromisoformat(raw)
        elif isinstance(raw, date) and not isinstance(raw, datetime):
            expiry = raw
        else:
            raise ValueError(f"{feature}: expiry must be a date or 'permanent'")
        return Entitlement(feature, value["count"], expiry)
    raise ValueError(f"{feature}: expected a count, 'count, expiry' or a table")


def license_from_spec(spec: dict[str, Any], now: datetime) -> License:
    """Build a :class:`License` from a parsed spec; ``FormatError`` names the bad field."""
    known = set(_SCALARS) | {"version", "issued", "emergency", "locations"}
    for key in spec:
        if key not in known:
            raise FormatError(f"unknown field {key!r} in the license spec")
    try:
        kwargs: dict[str, Any] = {_SCALARS[k]: v for k, v in spec.items() if k in _SCALARS}
        if "version" not in spec:
            raise ValueError("the spec needs a 'version' range, e.g. \"4.*\"")
        kwargs["version"] = VersionRange.parse(str(spec["version"]))
        issued = spec.get("issued", now)
        if isinstance(issued, str):
            issued = parse_timestamp(issued)
        elif not isinstance(issued, datetime):  # a TOML date, number or array
            raise ValueError("'issued' must be a timestamp, e.g. 2026-11-22T10:00:00Z")
        kwargs["issued"] = utc(issued).replace(microsecond=0)
        kwargs["emergency"] = tuple(spec.get("emergency", ()))
        locations = spec.get("locations")
        if not isinstance(locations, dict) or not locations:
            raise ValueError("the spec needs at least one [locations.NAME] table")
        built: list[Location] = []
        for name, features in locations.items():
            if not isinstance(features, dict):
                raise ValueError(f"locations.{name} must be a table")
            built.append(Location(name, tuple(_entitlement(f, v) for f, v in features.items())))
        kwargs["locations"] = tuple(built)
        return License(**kwargs)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"license spec: {exc}") from None


def load_spec(text: str, now: datetime) -> License:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FormatError(f"license spec is not valid TOML: {exc}") from None
    return license_from_spec(data, now)
