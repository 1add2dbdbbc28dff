"""What the agent reports: immutable value objects with a JSON form for ``agent status``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from tessera.core.fileformat import format_timestamp

__all__ = ["AgentState", "AgentStatus", "FeatureGrant", "FeatureSeats"]


class AgentState(StrEnum):
    """The installation's licensing state, as ``agent status`` names it (SPEC section 6)."""

    UNLICENSED = "unlicensed"
    NORMAL = "normal"
    FAILOVER = "failover"
    EMERGENCY = "emergency"
    BROKEN = "broken"
    INVALID = "invalid"
    CLOCK_TAMPERED = "clock-tampered"
    LOCKED = "locked"


@dataclass(frozen=True, slots=True)
class FeatureGrant:
    """A feature usable right now: how many users/interfaces, until when (None: permanent)."""

    feature: str
    count: int
    expiry: date | None

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "expiry": "permanent" if self.expiry is None else self.expiry.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class FeatureSeats:
    """Who holds a feature here; ``over_assigned`` > 0 after the licensed count was reduced."""

    feature: str
    licensed: int
    subjects: tuple[str, ...]

    @property
    def over_assigned(self) -> int:
        return max(0, len(self.subjects) - self.licensed)

    @property
    def free(self) -> int:
        return max(0, self.licensed - len(self.subjects))

    def to_json(self) -> dict[str, Any]:
        return {
            "licensed": self.licensed,
            "assigned": list(self.subjects),
            "free": self.free,
            "over_assigned": self.over_assigned,
        }


def _ts_or_none(value: datetime | None) -> str | None:
    return None if value is None else format_timestamp(value)


def _frozen(mapping: Mapping[str, FeatureGrant]) -> Mapping[str, FeatureGrant]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """A snapshot of the installation's licensing state.

    ``message`` tells the administrator what is wrong and what to do; ``denied`` names the
    licensed features refused right now and why (expired, emergency mode, clock set back).
    """

    state: AgentState
    failover_days_left: int | None
    features: Mapping[str, FeatureGrant] = field(default_factory=lambda: _frozen({}))
    denied: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    message: str = ""
    serial: str | None = None
    licensee: str | None = None
    location: str | None = None
    last_checkin: datetime | None = None
    failover_since: datetime | None = None
    over_assigned: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "failover_days_left": self.failover_days_left,
            "features": {code: g.to_json() for code, g in sorted(self.features.items())},
            "denied": dict(sorted(self.denied.items())),
            "message": self.message,
            "serial": self.serial,
            "licensee": self.licensee,
            "location": self.location,
            "last_checkin": None if self.last_checkin is None else format_timestamp(self.last_checkin),
            "failover_since": _ts_or_none(self.failover_since),
            "over_assigned": dict(sorted(self.over_assigned.items())),
        }
