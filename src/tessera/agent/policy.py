"""From verified license + persisted facts + trusted time to "which features work now".

This is the only place that decides; it is a pure function so each rule (failover,
emergency, checkpoint, secure clock, expiry, lock) is testable without I/O. The result is a
:class:`Snapshot` whose ``allowed`` frozenset makes ``Agent.check`` a set lookup, valid
until ``recompute_at`` (the next moment any answer could change).

Rules, in order of precedence:

* locked (vendor's ``lock`` directive) and broken/invalid refuse everything;
* an entry of the vendor's blacklist file (``Agent.import_blacklist``) naming this
  container locks it, one naming the license withdraws it, from the entry's day on
  (``since + delay``, measured in trusted time);
* unlicensed: nothing is granted;
* failover: a Connect license whose check-in is overdue (``validation-hours`` after the last
  successful check-in) or whose last attempt failed. Everything keeps working until
  ``failover-days`` after the last successful check-in; then emergency mode grants only the
  emergency features. An installation that has never checked in (imported offline) counts
  from its first license import, once: re-importing does not restart the grace period;
* checkpoint licenses grant nothing ``checkpoint-days`` after the last successful check-in;
* secure clock: trusted time is max(system clock, high-water mark). A system clock more
  than ``CLOCK_TOLERANCE`` behind the mark is *clock-tampered*: features with an expiry
  (and checkpoint licenses) are refused until the clock agrees with the server again;
* an entitlement past its expiry (inclusive, UTC day) is not granted;
* a fresh installation that never had a license grants the product's *grace features*
  (``Agent(grace_features=...)``, none by default) for ``FRESH_GRACE_DAYS`` after its first
  start, once: state ``unlicensed`` with ``failover_days_left`` counting down.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from types import MappingProxyType

from tessera.agent.status import AgentState, AgentStatus, FeatureGrant
from tessera.agent.verification import VerifiedLicense

__all__ = ["CLOCK_TOLERANCE", "FRESH_GRACE_DAYS", "Facts", "Snapshot", "decide"]

CLOCK_TOLERANCE = timedelta(days=1)
#: the one-time grace of a fresh, never-licensed installation (when the product names
#: grace features; the same default as a license's failover period)
FRESH_GRACE_DAYS = 30
MAX_SNAPSHOT_AGE = timedelta(hours=1)
DAY = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything persisted that the decision depends on (besides the clock)."""

    verified: VerifiedLicense | None = None
    problem: tuple[AgentState, str] | None = None
    last_success: datetime | None = None
    last_failure: datetime | None = None
    #: the first failed check-in since the last successful one
    failover_since: datetime | None = None
    failure_reason: str | None = None
    grace_start: datetime | None = None
    high_water: datetime | None = None
    locked: str | None = None
    revoked: str | None = None
    installed_at: datetime | None = None
    #: the product's grace features, empty once the installation ever had a license
    grace_features: frozenset[str] = frozenset()
    over_assigned: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    #: an entry of the vendor's blacklist file naming this installation: from which (trusted)
    #: day it acts, the state it puts the installation in, and why
    blacklisted: tuple[date, AgentState, str] | None = None
    #: activated online (a server to check in with); else offline, where advice to run
    #: ``connect`` would only earn "not activated online"
    online: bool = True
    #: serial and licensee of a genuine license that cannot be used here (``problem``:
    #: the machine changed, another version), so the status still says which license it is
    about: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    status: AgentStatus
    allowed: frozenset[str]
    default_reason: str
    computed_at: float
    recompute_at: float

    def reason(self, feature: str) -> str:
        return self.status.denied.get(feature, self.default_reason)


def _next_midnight(now: datetime) -> datetime:
    return datetime.combine(now.date() + DAY, datetime.min.time(), tzinfo=UTC)


def _ceil_days(delta: timedelta) -> int:
    return max(0, math.ceil(delta.total_seconds() / 86400))


def decide(facts: Facts, clock_now: datetime) -> Snapshot:
    """The snapshot for ``facts`` at system-clock time ``clock_now``."""
    horizon = clock_now + MAX_SNAPSHOT_AGE
    hw = facts.high_water
    tampered = hw is not None and clock_now < hw - CLOCK_TOLERANCE
    now = max(clock_now, hw) if hw is not None else clock_now
    recompute = [horizon, _next_midnight(clock_now)]

    def refuse_all(state: AgentState, message: str, **extra: object) -> Snapshot:
        status = AgentStatus(state, None, message=message, **extra)  # type: ignore[arg-type]
        return _snap(status, frozenset(), message, clock_now, min(recompute))

    if facts.locked is not None:
        return refuse_all(AgentState.LOCKED, facts.locked)
    if facts.blacklisted is not None and now.date() >= facts.blacklisted[0]:
        return refuse_all(facts.blacklisted[1], facts.blacklisted[2])
    if facts.problem is not None:
        serial, licensee = facts.about or (None, None)
        return refuse_all(facts.problem[0], facts.problem[1], serial=serial, licensee=licensee)
    verified = facts.verified
    if verified is None:
        message = facts.revoked or (
            "no license: activate online (tessera agent activate) or import a license file"
        )
        if facts.revoked is None and facts.grace_features and facts.installed_at is not None:
            return _fresh_grace(facts, facts.installed_at, now, clock_now, message, recompute)
        return refuse_all(AgentState.UNLICENSED, message)
    lic = verified.license
    about = {
        "serial": lic.serial,
        "licensee": lic.licensee,
        "location": verified.location.name,
        "last_checkin": facts.last_success,
        "failover_since": facts.failover_since,
        "over_assigned": facts.over_assigned,
    }

    state = AgentState.NORMAL
    days_left: int | None = None
    message = "licensed"
    emergency = False
    checkpoint_lapsed: str | None = None
    anchor = facts.last_success or facts.grace_start
    if lic.connect and anchor is not None:
        due = anchor + timedelta(hours=lic.validation_hours)
        # a success clears last_failure, so any recorded failure is newer than the success
        failed_last = facts.last_failure is not None
        end = anchor + timedelta(days=lic.failover_days)
        why = ""
        if now >= due or failed_last:
            why = facts.failure_reason or "the license server has not been reached since it was due"
            if now >= end:
                state, emergency, days_left = AgentState.EMERGENCY, True, 0
                message = (
                    f"emergency mode: no successful check-in for {lic.failover_days} days "
                    f"({why}); only emergency features work; {_advice(facts)}"
                )
            else:
                state, days_left = AgentState.FAILOVER, _ceil_days(end - now)
                message = (
                    f"failover: {why}; everything works for {days_left} more day(s), then "
                    "only emergency features"
                )
                recompute.append(end)
        else:
            recompute.append(due)
        if lic.checkpoint_days is not None:
            checkpoint_end = anchor + timedelta(days=lic.checkpoint_days)
            if now >= checkpoint_end:
                checkpoint_lapsed = (
                    f"checkpoint license: valid {lic.checkpoint_days} day(s) after the last "
                    "successful check-in, which is overdue; run 'tessera agent connect'"
                )
            else:
                recompute.append(checkpoint_end)
    if checkpoint_lapsed is not None and emergency:
        # Emergency mode would say "only emergency features work": past its checkpoint, a
        # checkpoint license grants none, the emergency features included.
        message = (
            f"emergency mode: no successful check-in for {lic.failover_days} days ({why}), "
            f"past the checkpoint license's {lic.checkpoint_days} day(s), so every feature is "
            f"refused (the emergency features too) until a check-in succeeds; {_advice(facts)}"
        )
    elif checkpoint_lapsed is not None:
        # Failover would say "everything works": for a checkpoint license nothing does.
        message = (
            f"checkpoint license: no successful check-in for {lic.checkpoint_days} day(s), so "
            "every feature is refused until a check-in succeeds"
            + ("" if state is AgentState.NORMAL else f" ({why})")
            + f"; {_advice(facts)}"
        )
    if tampered:
        state = AgentState.CLOCK_TAMPERED
        message = (
            "the system clock was set back (it is behind time this agent already saw); "
            "time-limited features are refused until the clock is correct and a check-in "
            "with the license server succeeds"
        )

    today: date = now.date()
    grants: dict[str, FeatureGrant] = {}
    denied: dict[str, str] = {}
    for e in verified.location.entitlements:
        if e.count == 0:
            denied[e.feature] = "licensed with a count of 0"
        elif not e.valid_on(today):
            denied[e.feature] = f"expired on {e.expiry}"
        elif checkpoint_lapsed is not None:
            denied[e.feature] = checkpoint_lapsed
        elif tampered and (e.expiry is not None or lic.checkpoint_days is not None):
            denied[e.feature] = "time-limited feature refused: the system clock was set back"
        elif emergency and e.feature not in lic.emergency:
            denied[e.feature] = "emergency mode: only the emergency features work"
        else:
            grants[e.feature] = FeatureGrant(e.feature, e.count, e.expiry)
    status = AgentStatus(
        state,
        days_left,
        MappingProxyType(grants),
        MappingProxyType(denied),
        message,
        **about,  # type: ignore[arg-type]
    )
    return _snap(
        status,
        frozenset(grants),
        f"not licensed here (license {lic.serial})",
        clock_now,
        min(recompute),
    )


def _advice(facts: Facts) -> str:
    if facts.online:
        return "run 'tessera agent connect' once the server is reachable"
    return (
        "this installation was activated offline: import a new license file from the vendor "
        "(tessera agent import), or activate online (tessera agent activate)"
    )


def _fresh_grace(
    facts: Facts,
    installed_at: datetime,
    now: datetime,
    clock_now: datetime,
    message: str,
    recompute: list[datetime],
) -> Snapshot:
    """A fresh installation, never licensed: the product's grace features, once, for
    ``FRESH_GRACE_DAYS`` from the first start (kept in the state, so it never restarts)."""
    end = installed_at + timedelta(days=FRESH_GRACE_DAYS)
    if now >= end:
        status = AgentStatus(AgentState.UNLICENSED, 0, message=message + " (grace period over)")
        return _snap(status, frozenset(), status.message, clock_now, min(recompute))
    recompute.append(end)
    left = _ceil_days(end - now)
    grants = {f: FeatureGrant(f, 1, end.date()) for f in sorted(facts.grace_features)}
    status = AgentStatus(
        AgentState.UNLICENSED,
        left,
        MappingProxyType(grants),
        message=f"{message}; first-start grace: {left} day(s) left with the grace features",
    )
    return _snap(status, frozenset(grants), message, clock_now, min(recompute))


def _snap(
    status: AgentStatus, allowed: frozenset[str], reason: str, clock_now: datetime, until: datetime
) -> Snapshot:
    return Snapshot(status, allowed, reason, clock_now.timestamp(), until.timestamp())
