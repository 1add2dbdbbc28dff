"""Online and offline activation, and Connect check-ins (``docs/protocol.md``).

Activation binds a machine to one of the license's machine slots. The limit holds under
concurrency because the license row is locked for the whole transaction (``SELECT ... FOR
UPDATE`` on PostgreSQL; SQLite serializes writers with ``BEGIN IMMEDIATE``) and, as a
second line, ``(license_id, slot)`` is unique. Every rule (revoked, expired, binding) is
checked on every request, not only on the first binding.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, NamedTuple, Protocol

from sqlalchemy import and_, bindparam, exists, insert, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from tessera.core import sign_document
from tessera.core.clock import utc
from tessera.core.errors import SignatureError, TesseraError
from tessera.core.fingerprint import LicensedMachine, LockingId
from tessera.core.licensekey import license_key_digest
from tessera.core.model import MatchLevel
from tessera.core.protocol import (
    ActivationRequest,
    CheckinRequest,
    ServerResponse,
    derive_checkin_key,
    seal_checkin_key,
)
from tessera.core.signing import PublicKey, SigningKey
from tessera.server import audit, recovery, webhooks
from tessera.server.errors import Forbidden, NotFound, RecordedRefusal
from tessera.server.licenses import (
    EntitlementContent,
    LicenseContent,
    check_access,
    identity_document,
    instance_id_for,
    license_document,
)
from tessera.server.models import (
    BlacklistEntryRow,
    Checkin,
    EntitlementRow,
    LicenseRow,
    Machine,
    RecoveredMachine,
)
from tessera.server.portal import PortalVerdict
from tessera.server.refusals import RefusalLimit
from tessera.server.tokens import Principal, Role, require

__all__ = [
    "CHECKIN_LOOKUP",
    "RECORD_CHECKIN",
    "RECORD_MACHINE",
    "Activation",
    "CheckinFound",
    "CheckinVerdict",
    "activate",
    "activate_offline",
    "check_checkin",
    "checkin",
    "checkin_key_for",
    "checkin_lookup_columns",
    "lookup_checkin",
    "plain_verdict",
]


@dataclass(frozen=True, slots=True)
class Activation:
    serial: str
    slot: int
    license_file: str
    #: The identity part (``.par``) of an instance-bound license, else None.
    identity_file: str | None = None


def _license_by_key(session: Session, license_key: str, pepper: bytes, *, lock: bool) -> LicenseRow:
    stmt = select(LicenseRow).where(LicenseRow.key_digest == license_key_digest(license_key, pepper))
    if lock:
        stmt = stmt.with_for_update(of=LicenseRow)
    row = session.execute(stmt).unique().scalar_one_or_none()
    if row is None:
        raise NotFound("unknown license key")
    return row


class _Usable(Protocol):
    @property
    def serial(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def binding(self) -> str: ...
    @property
    def entitlements(self) -> Sequence[EntitlementContent]: ...


def check_product(request: ActivationRequest, product_code: str) -> None:
    """Before anything is bound: the agent would reject the file, the slot would be gone."""
    if request.product and request.product != product_code:
        raise Forbidden(f"this license key is for product {product_code!r}, not {request.product!r}")


def check_usable(row: _Usable, now: datetime) -> None:
    if row.status == "revoked":
        raise Forbidden(f"license {row.serial} has been revoked")
    today = utc(now).date()
    if not any(e.expiry is None or today <= e.expiry for e in row.entitlements):
        raise Forbidden(f"license {row.serial} has expired")
    if row.binding not in ("machine", "instance"):
        raise Forbidden(
            f"license {row.serial} is {row.binding}-bound: it is used through a credential, "
            "not activated on a machine"
        )


@lru_cache(maxsize=16384)
def _licensed(locking_id: str) -> LicensedMachine | None:
    """A bound machine's Locking ID, parsed and made ready for matching once: keeps slot
    scans and check-ins cheap. None if it does not parse.

    Only IDs read from the database come here, never a client's, so clients cannot fill
    the cache.
    """
    try:
        return LicensedMachine(LockingId.parse(locking_id))
    except ValueError:
        return None


def same_hardware(locking_id: str, current: LockingId, level: MatchLevel) -> bool:
    licensed = _licensed(locking_id)
    return licensed is not None and licensed.matches(current.keys, level)


def first_same_hardware(locking_ids: Iterable[str], current: LockingId, level: MatchLevel) -> int | None:
    """The position of the first bound machine that is the machine ``current``, if any.

    A new machine is compared with every bound one, so the scan is the activation's
    dearest loop on a license with many seats: a few dictionary lookups per bound machine
    (:class:`~tessera.core.fingerprint.LicensedMachine`, prepared once per Locking ID).
    """
    keys = current.keys
    for position, locking_id in enumerate(locking_ids):
        licensed = _licensed(locking_id)
        if licensed is not None and licensed.matches(keys, level):
            return position
    return None


#: Every blacklisted container (a ``recovered`` entry only withdraws recovered licenses).
BLACKLISTED_CONTAINERS = select(BlacklistEntryRow.locking_id).where(BlacklistEntryRow.scope == "container")


def blacklisted(containers: Iterable[str], locking_id: str, level: MatchLevel) -> bool:
    """Is ``locking_id`` one of the blacklisted ``containers``, exactly or, tolerant like a
    binding, a listed container whose hardware drifted a little?"""
    listed = list(containers)
    if locking_id in listed:
        return True
    if not listed:
        return False
    current = LockingId.parse(locking_id)
    return first_same_hardware(listed, current, level) is not None


def blacklist_refusal(serial: str, locking_id: str, now: datetime) -> RecordedRefusal:
    """A blacklisted container activates nothing; the attempt is a hit for follow-up."""

    def record(fresh: Session, suppressed: int) -> None:
        recovery.record_hit(
            fresh, at=now, locking_id=locking_id, serial=serial, how="activation", action="refused",
            suppressed=suppressed,
        )  # fmt: skip

    return RecordedRefusal(
        f"this machine (Locking ID {locking_id}) is blacklisted by the vendor: "
        "activation refused; contact the vendor's support",
        record,
        serial=serial,
    )


def other_hardware(serial: str) -> Forbidden:
    """The same installation on other hardware (a copied state directory, or a new
    mainboard): that is a recovery, under the recovery rule, never a silent move."""
    return Forbidden(
        f"this installation now runs on other hardware than license {serial} is "
        "bound to: ask the vendor for a rehost, or activate with --recover"
    )


def no_free_machine(serial: str, bound: int, allowed: int) -> Forbidden:
    return Forbidden(f"no free machine left on license {serial}: {bound} of {allowed} machines are bound")


def free_slot(used: Iterable[int], allowed: int) -> int | None:
    """The lowest machine slot not taken, if any."""
    taken = set(used)
    return next((s for s in range(allowed) if s not in taken), None)


def _refuse_blacklisted(session: Session, row: LicenseRow, locking_id: str, now: datetime) -> None:
    containers = session.execute(BLACKLISTED_CONTAINERS).scalars()
    if blacklisted(containers, locking_id, MatchLevel(row.match_level)):
        raise blacklist_refusal(row.serial, locking_id, now)


def _recover_onto(
    session: Session,
    row: LicenseRow,
    machine: Machine,
    request: ActivationRequest,
    now: datetime,
    actor: str,
    portal: bool,
    portal_verdict: PortalVerdict | None,
) -> str:
    """Move ``machine``'s slot to the requesting hardware under the recovery rule; the
    audit action of the activation."""
    recovery.recover_machine(
        session, row, machine, new_locking_id=request.locking_id, now=now, actor=actor,
        via="activation", old_container=None, portal=portal, portal_verdict=portal_verdict,
    )  # fmt: skip
    machine.last_checkin_at = None  # not heard of on its new hardware yet
    return "license.recover"


def _bind(
    session: Session,
    row: LicenseRow,
    request: ActivationRequest,
    now: datetime,
    signing_key: SigningKey,
    actor: str,
    *,
    offline: bool,
    recover: bool = False,
    portal: bool = False,
    portal_verdict: PortalVerdict | None = None,
) -> Activation:
    check_product(request, row.product.code)
    _refuse_blacklisted(session, row, request.locking_id, now)
    check_usable(row, now)
    # The same installation again (indexed lookup), else the same hardware (tolerant match).
    machine = session.execute(
        select(Machine).where(Machine.license_id == row.id, Machine.system_id == request.system_id)
    ).scalar_one_or_none()
    action = "license.reactivate"
    level = MatchLevel(row.match_level)
    current = LockingId.parse(request.locking_id)
    if (
        machine is not None
        and row.binding == "machine"
        and not same_hardware(machine.locking_id, current, level)
    ):
        if not recover:
            raise other_hardware(row.serial)
        action = _recover_onto(session, row, machine, request, now, actor, portal, portal_verdict)
    if machine is None:
        # Plain rows, not ORM objects: a license with many seats is scanned cheaply.
        bound = session.execute(
            select(Machine.id, Machine.slot, Machine.locking_id)
            .where(Machine.license_id == row.id)
            .order_by(Machine.slot)  # the first match is the lowest slot, on every backend
        ).all()
        # An instance is its installation, not its hardware: two instances may share a machine.
        same = (
            None
            if row.binding == "instance"
            else next((m.id for m in bound if same_hardware(m.locking_id, current, level)), None)
        )
        if same is not None:
            machine = session.get(Machine, same)
        if machine is None:
            free = free_slot((m.slot for m in bound), row.machines_allowed)
            if free is None and not recover:
                raise no_free_machine(row.serial, len(bound), row.machines_allowed)
            if free is None:
                # A recovery request (``/api/v1/recover``): the machine heard of least
                # recently is the one being replaced, if the recovery rule allows it.
                machine = min(
                    session.execute(select(Machine).where(Machine.license_id == row.id)).scalars(),
                    key=lambda m: (m.last_checkin_at or m.activated_at, m.slot),
                )
                action = _recover_onto(session, row, machine, request, now, actor, portal, portal_verdict)
            else:
                machine = Machine(license_id=row.id, slot=free, activated_at=now, delivered_revision=0)
                session.add(machine)
                action = "license.activate"
    machine.locking_id = request.locking_id
    machine.system_id = request.system_id
    machine.agent_key = request.agent_key
    machine.activated_at = now
    machine.offline = offline
    machine.delivered_revision = row.revision
    license_file, identity_file = signed_files(row, machine.slot, request, now, signing_key)
    session.flush()
    audit.append(
        session,
        at=now,
        actor=actor,
        action=action,
        target=row.serial,
        details={
            "slot": machine.slot,
            "locking_id": request.locking_id,
            "system_id": request.system_id,
            "offline": offline,
            "revision": row.revision,
        },
    )
    if action == "license.activate":
        webhooks.emit(
            session,
            "license.activated",
            {"serial": row.serial, "slot": machine.slot, "locking_id": request.locking_id,
             "offline": offline},
            now,
        )  # fmt: skip
    return Activation(row.serial, machine.slot, license_file, identity_file)


def signed_files(
    row: LicenseContent, slot: int, request: ActivationRequest, now: datetime, signing_key: SigningKey
) -> tuple[str, str | None]:
    """The license file for the activating installation, and the identity file (``.par``)
    when the license is instance-bound (else None)."""
    instance_id = instance_id_for(row.serial, slot) if row.binding == "instance" else None
    doc = license_document(
        row,
        locking_id=request.locking_id,
        agent_key=request.agent_key,
        issued=now,
        license_key=request.license_key,
        instance_id=instance_id,
    )
    license_file = sign_document(doc, signing_key)
    if instance_id is None:
        return license_file, None
    identity = identity_document(row, instance_id=instance_id, license_key=request.license_key, issued=now)
    return license_file, sign_document(identity, signing_key)


def activate(
    session: Session,
    request: ActivationRequest,
    now: datetime,
    signing_key: SigningKey,
    pepper: bytes,
    *,
    recover: bool = False,
    portal: bool = False,
    portal_verdict: PortalVerdict | None = None,
) -> ServerResponse:
    """Online activation: bind (or re-bind) this machine and answer with its license file.

    With ``recover`` a machine beyond the count is a recovery request (``recovery``)."""
    row = _license_by_key(session, request.license_key, pepper, lock=True)
    result = _bind(
        session,
        row,
        request,
        now,
        signing_key,
        f"agent:{request.system_id}",
        offline=False,
        recover=recover,
        portal=portal,
        portal_verdict=portal_verdict,
    )
    return activation_response(
        request, now, result.serial, result.license_file, result.identity_file, pepper
    ).signed(signing_key)


def activation_response(
    request: ActivationRequest,
    now: datetime,
    serial: str,
    license_file: str,
    identity_file: str | None,
    pepper: bytes,
) -> ServerResponse:
    """The answer to an online activation, still to be signed (both activation paths)."""
    return ServerResponse(
        kind="activation",
        nonce=request.nonce,
        server_time=utc(now).replace(microsecond=0),
        serial=serial,
        license=license_file,
        identity=identity_file,
        checkin_key=_sealed_checkin_key(pepper, request.agent_key),
    )


def activate_offline(
    session: Session,
    principal: Principal,
    request: ActivationRequest,
    now: datetime,
    signing_key: SigningKey,
    pepper: bytes,
    *,
    portal: bool = False,
    portal_verdict: PortalVerdict | None = None,
) -> Activation:
    """An uploaded request file: same rules as online, the license file goes back by hand."""
    require(principal, Role.ADMIN, Role.SUPPORT, Role.SALES, Role.PARTNER, Role.CUSTOMER)
    row = _license_by_key(session, request.license_key, pepper, lock=True)
    try:
        check_access(session, principal, row, write=False)
    except NotFound:  # another customer's or partner's key: exactly as an unknown one
        raise NotFound("unknown license key") from None
    return _bind(
        session, row, request, now, signing_key, principal.actor, offline=True, portal=portal,
        portal_verdict=portal_verdict,
    )  # fmt: skip


# The check-in's statements, built once: constructing SQL per request costs more than
# running it.
def checkin_lookup_columns(today: ColumnElement[Any]) -> tuple[Any, ...]:
    """What a check-in's lookup reads, in :class:`CheckinFound`'s order; ``today`` is where
    the statement takes the day from (a parameter, or a column of a batch's array)."""
    return (
        LicenseRow.id,
        LicenseRow.serial,
        LicenseRow.status,
        LicenseRow.revision,
        LicenseRow.match_level,
        LicenseRow.binding,
        Machine.id.label("machine_id"),
        Machine.slot,
        Machine.locking_id,
        Machine.agent_key,
        Machine.delivered_revision,
        # Any entitlement still valid today? (every rule on every validation, same trip)
        exists()
        .where(
            EntitlementRow.license_id == LicenseRow.id,
            or_(EntitlementRow.expiry.is_(None), EntitlementRow.expiry >= today),
        )
        .label("valid"),
        # Is this machine's container blacklisted? (the honeypot, in the same trip)
        exists()
        .where(
            BlacklistEntryRow.locking_id == Machine.locking_id,
            BlacklistEntryRow.scope == "container",
        )
        .label("blacklisted"),
    )


CHECKIN_LOOKUP = (
    select(*checkin_lookup_columns(bindparam("today")))
    .select_from(LicenseRow)
    .outerjoin(
        Machine,
        and_(Machine.license_id == LicenseRow.id, Machine.system_id == bindparam("system_id")),
    )
    .where(LicenseRow.key_digest == bindparam("digest"))
)
RECORD_MACHINE = (
    update(Machine)
    .where(Machine.id == bindparam("machine_id"))
    .values(
        last_checkin_at=bindparam("now"),
        delivered_revision=bindparam("delivered"),
        checkpoint_overdue_at=None,
    )
)
RECORD_CHECKIN = insert(Checkin).values(
    machine_id=bindparam("machine_id"), at=bindparam("now"), outcome=bindparam("outcome")
)


class CheckinFound(NamedTuple):
    """What one lookup (:data:`CHECKIN_LOOKUP`, same column order) knows of a check-in."""

    id: int
    serial: str
    status: str
    revision: int
    match_level: str
    binding: str
    machine_id: int | None
    slot: int | None
    locking_id: str | None
    agent_key: str | None
    delivered_revision: int | None
    valid: bool
    blacklisted: bool


@dataclass(frozen=True, slots=True)
class CheckinVerdict:
    """What a check-in records and answers; the response is signed only once it is recorded."""

    machine_id: int
    serial: str
    outcome: str
    delivered_revision: int
    directives: tuple[str, ...] = ()
    message: str | None = None
    license_file: str | None = None

    def response(self, request: CheckinRequest, now: datetime, signing_key: SigningKey) -> ServerResponse:
        return self.unsigned_response(request, now).signed(signing_key)

    def unsigned_response(self, request: CheckinRequest, now: datetime) -> ServerResponse:
        return ServerResponse(
            kind="checkin",
            nonce=request.nonce,
            server_time=utc(now).replace(microsecond=0),
            serial=self.serial,
            license=self.license_file,
            directives=self.directives,
            message=self.message,
        )


def lookup_checkin(session: Session, request: CheckinRequest, now: datetime, pepper: bytes) -> CheckinFound:
    found = (
        session.connection()
        .execute(
            CHECKIN_LOOKUP,
            {
                "system_id": request.system_id,
                "digest": license_key_digest(request.license_key, pepper),
                "today": utc(now).date(),
            },
        )
        .first()
    )
    if found is None:
        raise NotFound("unknown license key")
    return CheckinFound._make(found)


@lru_cache(maxsize=4)
def _checkin_secret(pepper: bytes) -> bytes:
    """The server secret check-in keys are derived from (separate from key digests)."""
    return hmac.digest(pepper, b"tessera checkin keys", hashlib.sha256)


def checkin_key_for(pepper: bytes, agent_key: str) -> bytes:
    """The check-in key of the installation registered with ``agent_key``."""
    return derive_checkin_key(_checkin_secret(pepper), agent_key)


def _sealed_checkin_key(pepper: bytes, agent_key: str) -> str:
    return seal_checkin_key(checkin_key_for(pepper, agent_key), PublicKey.from_base64(agent_key))


def _authenticate(request: CheckinRequest, agent_key: str, pepper: bytes) -> None:
    try:
        request.authenticate(agent_key, checkin_key_for(pepper, agent_key) if request.mac else b"")
    except (SignatureError, TesseraError):
        raise Forbidden("bad request signature (not signed by the key registered at activation)") from None


def check_checkin(found: CheckinFound, request: CheckinRequest, pepper: bytes) -> None:
    """The checks a check-in from a bound machine passes before anything is recorded."""
    assert found.agent_key is not None and found.locking_id is not None  # a bound machine
    _authenticate(request, found.agent_key, pepper)
    if request.locking_id == found.locking_id:
        return  # the very ID it was bound with: the same text, the same hardware
    licensed = _licensed(found.locking_id)  # cached: only IDs the server stored itself
    try:
        current = LockingId.parse(request.locking_id)
    except ValueError:
        raise Forbidden("malformed Locking ID") from None
    if licensed is None:
        raise Forbidden("malformed Locking ID")
    # An instance-bound license moves with its instance (identity file and agent key), so
    # only a machine-bound one must still be on its machine.
    if found.binding != "instance" and not licensed.matches(current.keys, MatchLevel(found.match_level)):
        raise Forbidden(f"this machine no longer matches the one license {found.serial} is bound to")


def plain_verdict(found: CheckinFound, held_revision: int = 0) -> CheckinVerdict | None:
    """The verdict on a bound, not blacklisted machine; None when a new revision must go out.

    It must when this machine was not sent the current revision yet, or when its agent says
    it holds an older one (``held_revision``, 0 from older agents): the answer that carried
    the file was lost on the way, after the server had recorded it as delivered.
    """
    assert found.machine_id is not None and found.delivered_revision is not None
    if found.status == "revoked":
        return CheckinVerdict(
            found.machine_id, found.serial, "revoked", found.delivered_revision, ("revoke",),
            f"license {found.serial} has been revoked",
        )  # fmt: skip
    if found.delivered_revision != found.revision or 0 < held_revision < found.revision:
        return None
    return _expired_or(CheckinVerdict(found.machine_id, found.serial, "ok", found.delivered_revision), found)


def _expired_or(verdict: CheckinVerdict, found: CheckinFound) -> CheckinVerdict:
    if found.valid:
        return verdict
    return CheckinVerdict(
        verdict.machine_id, verdict.serial, "expired", verdict.delivered_revision, verdict.directives,
        f"license {found.serial} has expired", verdict.license_file,
    )  # fmt: skip


def checkin(
    session: Session,
    request: CheckinRequest,
    now: datetime,
    signing_key: SigningKey,
    pepper: bytes,
    *,
    hits: RefusalLimit | None = None,
) -> ServerResponse:
    """Periodic validation: record it, and ship the license again if it changed centrally.

    The plain case (most check-ins) is also served by :mod:`tessera.server.checkins` in
    batches; this is the whole rule set, for every case, in a transaction of its own.
    ``hits``: the server's limit on recorded blacklist hits (a blacklisted machine that
    keeps checking in is told to lock every time, and written down within the limit).
    """
    found = lookup_checkin(session, request, now, pepper)
    if found.machine_id is None:
        return _checkin_recovered(session, request, found.id, found.serial, now, signing_key, pepper, hits)
    assert found.locking_id is not None and found.agent_key is not None and found.slot is not None
    check_checkin(found, request, pepper)
    verdict: CheckinVerdict | None
    if found.blacklisted:
        # The honeypot: the whole container stops, every license on it.
        _hit(session, hits, now, found.locking_id, found.serial, "lock")
        assert found.delivered_revision is not None
        verdict = CheckinVerdict(
            found.machine_id, found.serial, "locked", found.delivered_revision, ("lock",),
            "this machine's container is blacklisted by the vendor",
        )  # fmt: skip
    else:
        verdict = plain_verdict(found, request.revision)
    if verdict is None:
        row = session.get(LicenseRow, found.id)
        assert row is not None  # read in this transaction
        doc = license_document(
            row,
            locking_id=found.locking_id,
            agent_key=found.agent_key,
            issued=now,
            license_key=request.license_key,
            instance_id=instance_id_for(found.serial, found.slot) if found.binding == "instance" else None,
        )
        verdict = _expired_or(
            CheckinVerdict(
                found.machine_id, found.serial, "updated", found.revision,
                license_file=sign_document(doc, signing_key),
            ),
            found,
        )  # fmt: skip
    conn = session.connection()
    conn.execute(
        RECORD_MACHINE, {"machine_id": found.machine_id, "now": now, "delivered": verdict.delivered_revision}
    )
    conn.execute(RECORD_CHECKIN, {"machine_id": found.machine_id, "now": now, "outcome": verdict.outcome})
    return verdict.response(request, now, signing_key)


def _checkin_recovered(
    session: Session,
    request: CheckinRequest,
    license_id: int,
    serial: str,
    now: datetime,
    signing_key: SigningKey,
    pepper: bytes,
    hits: RefusalLimit | None = None,
) -> ServerResponse:
    """The old machine of a recovered license checks in: it learns what became of it."""
    old = session.execute(
        select(RecoveredMachine)
        .where(
            RecoveredMachine.license_id == license_id,
            RecoveredMachine.system_id == request.system_id,
        )
        .order_by(RecoveredMachine.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    if old is None:
        raise Forbidden(f"this installation is not activated for license {serial}")
    _authenticate(request, old.agent_key, pepper)
    entry = recovery.blacklist_entry(session, old.locking_id)
    if entry is not None and entry.scope == "container":
        directives: tuple[str, ...] = ("lock",)
        message = "this machine's container is blacklisted by the vendor"
    else:
        directives = ("revoke",)
        message = f"license {serial} was recovered to another machine"
    _hit(session, hits, now, old.locking_id, serial, directives[0])
    return ServerResponse(
        kind="checkin",
        nonce=request.nonce,
        server_time=utc(now).replace(microsecond=0),
        serial=serial,
        directives=directives,
        message=message,
    ).signed(signing_key)


def _hit(
    session: Session, hits: RefusalLimit | None, now: datetime, locking_id: str, serial: str, action: str
) -> None:
    """A check-in caught by the blacklist or a recovery, written down within ``hits``."""
    suppressed = 0 if hits is None else hits.admit(serial, now)
    if suppressed is not None:
        recovery.record_hit(
            session, at=now, locking_id=locking_id, serial=serial, how="checkin", action=action,
            suppressed=suppressed,
        )  # fmt: skip
