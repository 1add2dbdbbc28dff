"""Recovery (rehost) of a license into a new container, and the blacklist of old ones.

A recovery moves a license from its bound machine (the *old container*) to a new Locking
ID. It is granted by the first rule that allows it, in this order:

``connect``
    Connect is on for the license and the old machine checked in (or was activated)
    within the license's failover period: the old container will hear of the recovery at
    its next check-in, so recoveries are unlimited.
``allowance``
    Fewer rule-based recoveries (``allowance`` + ``interval``) than ``recovery_allowance``.
``interval``
    The last rule-based recovery is at least ``recovery_interval_days`` ago.
``authorized``
    Support authorized extra recoveries (``license authorize-recovery``); one is used up.

``portal``
    The vendor's recovery portal (``[recovery]`` in ``tessera.toml``, see
    :mod:`.portal`) is asked, outside any transaction; its answer decides, and a timeout
    or error denies.

Otherwise it is denied. Every decision, granted or denied, is a row of ``recoveries`` and
a line in the audit log. The old container is then either blacklisted (whole container:
``lock`` at its next check-in, refusal at its next activation, an entry in the exported
blacklist file) or only loses this license (``revoke`` at its next check-in).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tessera.core import sign_document
from tessera.core.blacklist import Blacklist, BlacklistEntry, sign_blacklist
from tessera.core.clock import utc
from tessera.core.fingerprint import LockingId
from tessera.core.model import MatchLevel
from tessera.core.signing import SigningKey
from tessera.server import audit, webhooks
from tessera.server.errors import Conflict, Invalid, NotFound, RecordedRefusal
from tessera.server.licenses import check_access, get_license, license_document
from tessera.server.models import (
    BlacklistEntryRow,
    BlacklistExport,
    BlacklistHit,
    LicenseRow,
    Machine,
    RecoveredMachine,
    Recovery,
)
from tessera.server.portal import PortalVerdict
from tessera.server.tokens import Principal, Role, require

__all__ = [
    "Decision",
    "NeedsPortal",
    "OldContainer",
    "add_to_blacklist",
    "authorize_recovery",
    "blacklist_entry",
    "blacklist_hits",
    "decide",
    "export_blacklist",
    "list_blacklist",
    "list_recoveries",
    "record_hit",
    "recover_machine",
    "rehost",
]

log = logging.getLogger("tessera.server")
OldContainer = Literal["blacklist", "revoke"]
#: System ID of a slot reserved by ``rehost`` until the new machine activates.
PENDING_PREFIX = "rehost-"


class NeedsPortal(Exception):
    """The rule says no and a portal is configured: ask it (outside the transaction, which
    is rolled back) and run the request again with its verdict. Raised again when the
    verdict answers another move than the one the re-run would make (see
    :meth:`~tessera.server.portal.PortalVerdict.answers`)."""

    def __init__(self, question: dict[str, Any]) -> None:
        super().__init__("the recovery portal must be asked")
        self.question = question


@dataclass(frozen=True, slots=True)
class Decision:
    granted: bool
    rule: str
    reason: str


def _connect_active(row: LicenseRow, old: Machine | None, now: datetime) -> bool:
    """Connect counts as active when the old machine was heard of within its failover period."""
    if not row.connect or old is None:
        return False
    last = old.last_checkin_at or old.activated_at
    return utc(now) - utc(last) <= timedelta(days=row.failover_days)


def decide(session: Session, row: LicenseRow, old: Machine | None, now: datetime) -> Decision:
    """Apply the license's recovery rule (see the module docstring); changes nothing."""
    if _connect_active(row, old, now):
        return Decision(True, "connect", "Connect is active on the license: recoveries are unlimited")
    used, last = session.execute(
        select(func.count(Recovery.id), func.max(Recovery.at)).where(
            Recovery.license_id == row.id,
            Recovery.granted.is_(True),
            Recovery.rule.in_(("allowance", "interval")),
        )
    ).one()
    allowance = row.recovery_allowance
    if allowance is not None and used < allowance:
        return Decision(True, "allowance", f"recovery {used + 1} of the allowance of {allowance}")
    interval = row.recovery_interval_days
    next_at: datetime | None = None
    if interval is not None:
        # Counted from the last rule-based recovery, or from the day the license was issued.
        next_at = utc(last or row.created_at) + timedelta(days=interval)
        if utc(now) >= next_at:
            return Decision(True, "interval", f"no rule-based recovery in the last {interval} days")
    if row.recoveries_authorized > 0:
        return Decision(True, "authorized", "authorized by support")
    if allowance is None and interval is None:
        why = "it has no recovery rule and Connect is not active on it"
    else:
        why = f"its recovery allowance is used up ({used} of {allowance or 0})"
        if next_at is not None:
            why += f", the next one is possible from {next_at.date().isoformat()}"
    return Decision(
        False, "none", f"license {row.serial} cannot be recovered: {why}; support can authorize one"
    )


def blacklist_entry(session: Session, locking_id: str) -> BlacklistEntryRow | None:
    return session.execute(
        select(BlacklistEntryRow).where(BlacklistEntryRow.locking_id == locking_id)
    ).scalar_one_or_none()


def record_hit(
    session: Session,
    *,
    at: datetime,
    locking_id: str,
    serial: str | None,
    how: str,
    action: str,
    suppressed: int = 0,
) -> None:
    """Write down a hit; ``suppressed``: hits on the same license that the server's
    refusal limit left out since the last one written (counted here, so none is lost)."""
    log.warning(
        "blacklist hit: container %s, license %s, caught at %s (%s)",
        locking_id,
        serial,
        how,
        action,
    )
    session.add(
        BlacklistHit(
            at=at, locking_id=locking_id, serial=serial, how=how, action=action, suppressed=suppressed
        )
    )
    audit.append(
        session,
        at=at,
        actor="agent",
        action="blacklist.hit",
        target=locking_id,
        details={
            "serial": serial,
            "how": how,
            "action": action,
            **({"suppressed": suppressed} if suppressed else {}),
        },
    )
    webhooks.emit(
        session,
        "blacklist.hit",
        {"locking_id": locking_id, "serial": serial, "how": how, "action": action},
        at,
    )


def _record_decision(
    session: Session,
    row: LicenseRow,
    decision: Decision,
    *,
    now: datetime,
    actor: str,
    via: str,
    old_locking_id: str | None,
    new_locking_id: str,
    old_container: str | None,
    suppressed: int = 0,
) -> None:
    session.add(
        Recovery(
            license_id=row.id,
            at=now,
            actor=actor,
            via=via,
            old_locking_id=old_locking_id,
            new_locking_id=new_locking_id,
            granted=decision.granted,
            rule=decision.rule,
            reason=decision.reason,
            old_container=old_container if decision.granted else None,
        )
    )
    audit.append(
        session,
        at=now,
        actor=actor,
        action="license.recover" if decision.granted else "license.recover-denied",
        target=row.serial,
        details={
            "via": via,
            "from": old_locking_id,
            "to": new_locking_id,
            "rule": decision.rule,
            "reason": decision.reason,
            "old_container": old_container if decision.granted else None,
            **({"suppressed": suppressed} if suppressed else {}),
        },
    )


def _refuse(
    row_id: int,
    serial: str,
    decision: Decision,
    **kwargs: Any,
) -> RecordedRefusal:
    def record(session: Session, suppressed: int) -> None:
        row = session.get(LicenseRow, row_id)
        if row is not None:
            _record_decision(session, row, decision, suppressed=suppressed, **kwargs)

    return RecordedRefusal(decision.reason, record, serial=serial)


def _blacklist(
    session: Session,
    locking_id: str,
    *,
    scope: str,
    delay_days: int,
    now: datetime,
    actor: str,
    reason: str,
) -> BlacklistEntryRow:
    """List ``locking_id``, or make its entry stricter; an entry is never weakened.

    A container already listed keeps what it has unless the new options are stricter: the
    whole container rather than recovered licenses only, an earlier enforcement day (since
    + delay). Otherwise a later re-add (by hand, or a rehost with ``--blacklist-old
    --delay-days 90``) would postpone a blacklisting already in force, and the next
    exported file would unlock a container the previous one locked. The original reason
    stays: it says why the container was listed. Nothing changed means no audit line.
    """
    today = utc(now).date()
    entry = blacklist_entry(session, locking_id)
    if entry is None:
        entry = BlacklistEntryRow(
            locking_id=locking_id, since=today, added_at=now, scope=scope,
            delay_days=delay_days, actor=actor, reason=reason,
        )  # fmt: skip
        session.add(entry)
    else:
        widen = entry.scope != "container" and scope == "container"
        earlier = today + timedelta(days=delay_days) < entry.since + timedelta(days=entry.delay_days)
        if not widen and not earlier:
            return entry
        if earlier:  # enforced from the new, earlier day
            entry.since, entry.delay_days = today, delay_days
        if widen:
            entry.scope, entry.actor, entry.reason = "container", actor, reason
        scope, delay_days, reason = entry.scope, entry.delay_days, entry.reason
    session.flush()
    audit.append(
        session,
        at=now,
        actor=actor,
        action="blacklist.add",
        target=locking_id,
        details={"scope": scope, "delay_days": delay_days, "reason": reason},
    )
    webhooks.emit(
        session,
        "license.blacklisted",
        {"locking_id": locking_id, "scope": scope, "delay_days": delay_days, "reason": reason},
        now,
    )
    return entry


def recover_machine(
    session: Session,
    row: LicenseRow,
    old: Machine,
    *,
    new_locking_id: str,
    now: datetime,
    actor: str,
    via: str,
    old_container: OldContainer | None,
    delay_days: int = 0,
    portal: bool = False,
    portal_verdict: PortalVerdict | None = None,
) -> Decision:
    """Decide; when granted, release ``old`` and deal with its container. The caller binds
    the slot to the new machine. Raises :class:`RecordedRefusal` when denied."""
    action: OldContainer = old_container or (
        "revoke" if row.recovery_old_container == "revoke" else "blacklist"
    )
    details: dict[str, Any] = {
        "now": now,
        "actor": actor,
        "via": via,
        "old_locking_id": old.locking_id,
        "new_locking_id": new_locking_id,
        "old_container": action,
    }
    # Tolerant, as at activation: a listed container whose hardware drifted a little (a
    # new hostname) is the same machine; moving a license onto it would use up a recovery
    # and blacklist the customer's working machine.
    from tessera.server.activation import BLACKLISTED_CONTAINERS, blacklisted  # import cycle

    containers = session.execute(BLACKLISTED_CONTAINERS).scalars()
    if blacklisted(containers, new_locking_id, MatchLevel(row.match_level)):
        raise _refuse(
            row.id,
            row.serial,
            Decision(False, "none", f"the target container {new_locking_id} is blacklisted"),
            **details,
        )
    decision = decide(session, row, old, now)
    if not decision.granted and portal:
        # A verdict for another move (the license moved while the portal was asked: two
        # recoveries at once) must not be applied to this one: it would replace a machine
        # the portal never approved of replacing. Ask again about the move as it is now.
        if portal_verdict is None or not portal_verdict.answers(row.serial, old.locking_id, new_locking_id):
            raise NeedsPortal(
                {
                    "serial": row.serial,
                    "customer_id": row.customer_id,
                    "licensee": row.customer.licensee,
                    "from": old.locking_id,
                    "to": new_locking_id,
                    "via": via,
                    "at": utc(now).isoformat(),
                    "rule": decision.reason,
                }
            )
        decision = Decision(portal_verdict.allow, "portal", portal_verdict.reason)
    if not decision.granted:
        raise _refuse(row.id, row.serial, decision, **details)
    if decision.rule == "authorized":
        row.recoveries_authorized -= 1
    _record_decision(session, row, decision, **details)
    webhooks.emit(
        session,
        "license.rehosted",
        {
            "serial": row.serial,
            "from": old.locking_id,
            "to": new_locking_id,
            "via": via,
            "rule": decision.rule,
            "old_container": action,
        },
        now,
    )
    if not old.system_id.startswith(PENDING_PREFIX):
        session.add(
            RecoveredMachine(
                license_id=row.id,
                system_id=old.system_id,
                locking_id=old.locking_id,
                agent_key=old.agent_key,
                action=action,
                recovered_at=now,
                file_locking_id=old.locking_id if row.binding == "machine" else None,
            )
        )
        if action == "blacklist":
            _blacklist(
                session, old.locking_id, scope="container", delay_days=delay_days, now=now,
                actor=actor, reason=f"recovered license {row.serial} to {new_locking_id}",
            )  # fmt: skip
    return decision


def rehost(
    session: Session,
    principal: Principal,
    serial: str,
    *,
    locking_id: str,
    slot: int | None,
    old_container: OldContainer | None,
    delay_days: int,
    now: datetime,
    signing_key: SigningKey,
    portal: bool = False,
    portal_verdict: PortalVerdict | None = None,
) -> dict[str, Any]:
    """Support moves a license to a new container; the new machine then activates with the
    same key (its slot is reserved for that Locking ID) or imports the file returned here."""
    require(principal, Role.ADMIN, Role.SUPPORT)
    try:
        LockingId.parse(locking_id)
    except ValueError as exc:
        raise Invalid(f"locking_id: {exc}") from None
    row = get_license(session, serial, for_update=True)
    check_access(session, principal, row, write=True)
    if row.status == "revoked":
        raise Conflict(f"license {serial} has been revoked")
    machines = list(
        session.execute(select(Machine).where(Machine.license_id == row.id).order_by(Machine.slot)).scalars()
    )
    if slot is not None:
        old = next((m for m in machines if m.slot == slot), None)
        if old is None:
            raise NotFound(f"license {serial} has no machine in slot {slot}")
    elif len(machines) == 1:
        old = machines[0]
    elif not machines:
        raise Conflict(f"license {serial} is bound to no machine: the new machine can activate")
    else:
        raise Invalid(f"slot: license {serial} is bound to {len(machines)} machines; name one")
    if old.locking_id == locking_id:
        raise Conflict(f"license {serial} is already bound to {locking_id}")
    decision = recover_machine(
        session, row, old, new_locking_id=locking_id, now=now, actor=principal.actor,
        via="rehost", old_container=old_container, delay_days=delay_days, portal=portal,
        portal_verdict=portal_verdict,
    )  # fmt: skip
    # The slot is reserved for the new Locking ID; its agent binds it at activation.
    old.locking_id = locking_id
    old.system_id = PENDING_PREFIX + secrets.token_hex(16)
    old.agent_key = ""
    old.activated_at = now
    old.last_checkin_at = None
    old.delivered_revision = row.revision
    old.offline = False
    session.flush()
    license_file = None
    if not row.sealed:  # a sealed file needs the license key, which only the agent has
        doc = license_document(row, locking_id=locking_id, agent_key=None, issued=now)
        license_file = sign_document(doc, signing_key)
    return {
        "serial": row.serial,
        "slot": old.slot,
        "locking_id": locking_id,
        "rule": decision.rule,
        "reason": decision.reason,
        "license": license_file,
    }


def authorize_recovery(
    session: Session, principal: Principal, serial: str, count: int, now: datetime
) -> dict[str, Any]:
    require(principal, Role.ADMIN, Role.SUPPORT)
    row = get_license(session, serial, for_update=True)
    check_access(session, principal, row, write=True)
    row.recoveries_authorized += count
    audit.append(
        session,
        at=now,
        actor=principal.actor,
        action="license.authorize-recovery",
        target=row.serial,
        details={"count": count, "open": row.recoveries_authorized},
    )
    return {"serial": row.serial, "recoveries_authorized": row.recoveries_authorized}


def list_recoveries(session: Session, principal: Principal, serial: str) -> list[dict[str, Any]]:
    require(principal, Role.SUPPORT, Role.SALES, Role.READONLY)
    row = get_license(session, serial)
    check_access(session, principal, row, write=False)
    rows = session.execute(
        select(Recovery).where(Recovery.license_id == row.id).order_by(Recovery.id)
    ).scalars()
    return [
        {
            "at": utc(r.at).isoformat(),
            "actor": r.actor,
            "via": r.via,
            "from": r.old_locking_id,
            "to": r.new_locking_id,
            "granted": r.granted,
            "rule": r.rule,
            "reason": r.reason,
            "old_container": r.old_container,
        }
        for r in rows
    ]


def add_to_blacklist(
    session: Session,
    principal: Principal,
    locking_id: str,
    *,
    recovered_only: bool,
    delay_days: int,
    reason: str,
    now: datetime,
) -> dict[str, Any]:
    require(principal, Role.ADMIN, Role.SUPPORT)
    try:
        LockingId.parse(locking_id)
    except ValueError as exc:
        raise Invalid(f"locking_id: {exc}") from None
    entry = _blacklist(
        session, locking_id, scope="recovered" if recovered_only else "container",
        delay_days=delay_days, now=now, actor=principal.actor, reason=reason,
    )  # fmt: skip
    return _entry_view(entry)


def _entry_view(entry: BlacklistEntryRow) -> dict[str, Any]:
    return {
        "locking_id": entry.locking_id,
        "scope": entry.scope,
        "since": entry.since.isoformat(),
        "delay_days": entry.delay_days,
        "reason": entry.reason,
    }


def list_blacklist(session: Session, principal: Principal) -> list[dict[str, Any]]:
    require(principal, Role.SUPPORT, Role.SALES, Role.READONLY)
    rows = session.execute(select(BlacklistEntryRow).order_by(BlacklistEntryRow.id)).scalars()
    return [_entry_view(e) for e in rows]


def export_blacklist(
    session: Session, principal: Principal, now: datetime, signing_key: SigningKey
) -> dict[str, Any]:
    """The signed file for the next product version; each export gets the next sequence."""
    require(principal, Role.ADMIN, Role.SUPPORT)
    entries = list(session.execute(select(BlacklistEntryRow)).scalars())
    containers = [
        BlacklistEntry(e.locking_id, e.since, e.delay_days) for e in entries if e.scope == "container"
    ]
    # Licenses that only lost their old container: the serial is withdrawn on the copies
    # bound to that container issued by the time of the move (one entry per move, tessera/2),
    # or, for moves recorded without a container, on every copy issued before the day of the
    # move (the latest such move per license, tessera/1).
    delays = {e.locking_id: e.delay_days for e in entries}
    by_day: dict[str, BlacklistEntry] = {}
    scoped: dict[tuple[str, str, datetime], BlacklistEntry] = {}
    revoked = session.execute(
        select(RecoveredMachine, LicenseRow.serial)
        .join(LicenseRow, LicenseRow.id == RecoveredMachine.license_id)
        .where(RecoveredMachine.action == "revoke")
        .order_by(RecoveredMachine.recovered_at)
    ).all()
    for machine, serial in revoked:
        delay = delays.get(machine.locking_id, 0)
        if machine.file_locking_id is None:
            by_day[serial] = BlacklistEntry(serial, utc(machine.recovered_at).date(), delay)
            continue
        moved = utc(machine.recovered_at).replace(microsecond=0)
        scoped[(serial, machine.file_locking_id, moved)] = BlacklistEntry.moved_away(
            serial, machine.file_locking_id, moved, delay
        )
    serials = [*by_day.values(), *scoped.values()]
    export = BlacklistExport(at=now, actor=principal.actor, containers=len(containers), serials=len(serials))
    session.add(export)
    session.flush()
    blacklist = Blacklist(utc(now).replace(microsecond=0), export.id, tuple(containers), tuple(serials))
    audit.append(
        session,
        at=now,
        actor=principal.actor,
        action="blacklist.export",
        target=f"blacklist:{export.id}",
        details={"containers": len(containers), "serials": len(serials)},
    )
    return {
        "sequence": export.id,
        "containers": len(containers),
        "serials": len(serials),
        "file": sign_blacklist(blacklist, signing_key),
    }


def blacklist_hits(session: Session, principal: Principal) -> list[dict[str, Any]]:
    require(principal, Role.SUPPORT, Role.SALES, Role.READONLY)
    rows = session.execute(select(BlacklistHit).order_by(BlacklistHit.id)).scalars()
    return [
        {
            "at": utc(h.at).isoformat(),
            "locking_id": h.locking_id,
            "serial": h.serial,
            "how": h.how,
            "action": h.action,
            # Hits on the same license before this one that the refusal limit did not
            # write down: this row stands for 1 + suppressed hits.
            "suppressed": h.suppressed,
        }
        for h in rows
    ]
