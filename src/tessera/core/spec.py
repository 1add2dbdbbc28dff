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

import re
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


#: Keys that are switches: only TOML ``true``/``false``, since a string such as ``"off"`` is
#: truthy and would sign the opposite of what the vendor wrote.
_BOOLEANS = frozenset({"connect"})
#: Keys that are text: a number written there is a mistake, not something to stringify.
_TEXTS = frozenset({"licensee", "serial", "product", "binding", "locking-id", "match"})
_TEXTS |= frozenset({"instance-id", "user-id", "agent-key", "version"})
_DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_COUNT_RE = re.compile(r"^[0-9]{1,10}$")


def _expiry(feature: str, text: str) -> date | None:
    """Only ``YYYY-MM-DD`` or ``permanent``, the file format's forms: ``date.fromisoformat``
    also takes ``20270115`` and ISO weeks (``2027-W03-1``), which a vendor reading the spec
    back would not recognise as the date that was signed."""
    if text == "permanent":
        return None
    if not _DATE_RE.match(text):
        raise ValueError(f"{feature}: expiry {text!r} is not a date YYYY-MM-DD (or 'permanent')")
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{feature}: expiry {text!r} is not a valid date") from None


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
        if not _COUNT_RE.match(count):
            raise ValueError(f"{feature}: bad count {count!r}")
        return Entitlement(feature, int(count), _expiry(feature, until))
    if isinstance(value, dict):
        extra = set(value) - {"count", "expiry"}
        if extra or "count" not in value:
            raise ValueError(f"{feature}: expected {{ count = N, expiry = DATE }}")
        raw = value.get("expiry", "permanent")
        expiry: date | None
        if isinstance(raw, str):
            expiry = _expiry(feature, raw)
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
        for key in _BOOLEANS & spec.keys():
            if not isinstance(spec[key], bool):
                raise ValueError(f"{key!r} must be true or false (TOML booleans), not {spec[key]!r}")
        for key in _TEXTS & spec.keys():
            if not isinstance(spec[key], str):
                raise ValueError(f"{key!r} must be a string in quotes, not {spec[key]!r}")
        kwargs: dict[str, Any] = {_SCALARS[k]: v for k, v in spec.items() if k in _SCALARS}
        if "version" not in spec:
            raise ValueError("the spec needs a 'version' range, e.g. \"4.*\"")
        kwargs["version"] = VersionRange.parse(spec["version"])
        issued = spec.get("issued", now)
        if isinstance(issued, str):
            issued = parse_timestamp(issued)
        elif not isinstance(issued, datetime):  # a TOML date, number or array
            raise ValueError("'issued' must be a timestamp, e.g. 2026-11-22T10:00:00Z")
        elif issued is not now and issued.tzinfo is None:
            # A TOML local date-time: which zone the vendor meant is a guess.
            raise ValueError("'issued' needs a time zone, e.g. 2026-11-22T10:00:00Z")
        kwargs["issued"] = utc(issued).replace(microsecond=0)
        emergency = spec.get("emergency", [])
        if not isinstance(emergency, list) or not all(isinstance(e, str) for e in emergency):
            raise ValueError(
                f"'emergency' must be a list of feature codes, e.g. [\"ctxjs\"], not {emergency!r}"
            )
        kwargs["emergency"] = tuple(emergency)
        locations = spec.get("locations")
        if not isinstance(locations, dict) or not locations:
            raise ValueError("the spec needs at least one [locations.NAME] table")
        built: list[Location] = []
        for name, features in locations.items():
            if not isinstance(features, dict):
                raise ValueError(f"locations.{name} must be a table")
            built.append(Location(name, tuple(_entitlement(f, v) for f, v in features.items())))
        kwargs["locations"] = tuple(built)
        entitled = {e.feature for loc in built for e in loc.entitlements}
        strangers = [code for code in emergency if code not in entitled]
        if strangers:
            # Emergency mode keeps entitled features running; it grants nothing new.
            raise ValueError(f"'emergency' names features the license does not grant: {', '.join(strangers)}")
        return License(**kwargs)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"license spec: {exc}") from None


def load_spec(text: str, now: datetime) -> License:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FormatError(f"license spec is not valid TOML: {exc}") from None
    return license_from_spec(data, now)
