"""User-bound licenses: credentials for people, and leases of features under them.

A credential names one user of one user-bound license; only its public key and generation
are stored. Re-issuing bumps the generation, replaces the key and frees the leases held
under the old one, so a lost or stolen file stops working at its next request.

A lease holds one unit of a feature's count until it expires; heartbeats (``renew``) push
the expiry out, ``release`` frees it at once, and an expired lease is freed by the next
request that needs its slot. Every lease in force counts, also one granted before the
count was lowered; such a lease ends at its next renewal unless a slot under the new count
is free (docs/leases.md). The count holds under concurrency for the same reasons as
machine activations: the license row is locked for the transaction (``FOR UPDATE`` on
PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), and ``(license, feature, slot)`` is unique and a
lease takes (or moves into) a slot only below the count.

A refused request changes nothing: the service raises :class:`LeaseRefused` (its
transaction rolls back), and the HTTP layer records the refusal in a transaction of its
own (:func:`record_refusal`: audit log and the ``lease.denied`` webhook).
"""

from __future__ import annotations

import logging
import os
import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from tessera.core.clock import utc
from tessera.core.credential import (
    Credential,
    LeaseRequest,
    LeaseResponse,
    check_user_id,
    render_credential,
)
from tessera.core.errors import SignatureError
from tessera.core.signing import SigningKey
from tessera.server import audit, webhooks
from tessera.server.errors import Forbidden, Invalid
from tessera.server.licenses import check_access, get_license
from tessera.server.models import Lease, LeaseNonce, LicenseRow, UserCredential
from tessera.server.refusals import RefusalLimit
from tessera.server.tokens import Principal, Role, require

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "MAX_CLOCK_SKEW",
    "LeaseRefused",
    "RefusalLimit",
    "handle_lease",
    "issue_credential",
    "list_leases",
    "record_refusal",
]

DEFAULT_LEASE_SECONDS = 300
#: A lease request's own time may differ this much from the server's; nonces are kept twice
#: as long, so a request can never be replayed: first the nonce, later the time refuses it.
MAX_CLOCK_SKEW = timedelta(minutes=15)


log = logging.getLogger("tessera.server")


class LeaseRefused(Exception):
    """A lease request that must be refused; ``kind`` classifies it for records and webhooks."""

    def __init__(
        self,
        reason: str,
        kind: str,
        request: LeaseRequest,
        status: int = 403,
        *,
        in_use: int | None = None,
        count: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.request = request
        self.status = status
        self.in_use = in_use
        self.count = count


def issue_credential(
    session: Session,
    principal: Principal,
    serial: str,
    user_id: str,
    now: datetime,
    vendor_key: SigningKey,
) -> tuple[str, int, int]:
    """Make (or re-issue) ``user_id``'s credential: (file text, generation, leases freed)."""
    require(principal, Role.ADMIN, Role.SUPPORT, Role.SALES)
    try:
        check_user_id(user_id)
    except ValueError as exc:
        raise Invalid(f"user_id: {exc}") from None
    row = get_license(session, serial, for_update=True)
    check_access(session, principal, row, write=True)
    if row.binding != "user":
        raise Invalid(f"license {serial} is {row.binding}-bound; credentials are for user-bound licenses")
    if row.status == "revoked":
        raise Forbidden(f"license {serial} has been revoked")
    seed = os.urandom(32)
    public = SigningKey.from_raw(seed).public.to_base64()
    current = session.execute(
        select(UserCredential)
        .where(UserCredential.license_id == row.id, UserCredential.user_id == user_id)
        .with_for_update()
    ).scalar_one_or_none()
    freed = 0
    if current is None:
        current = UserCredential(
            license_id=row.id, user_id=user_id, generation=1, public_key=public, issued_at=now
        )
        session.add(current)
    else:
        # Count only the leases in force: expired rows wait for a lease request to delete
        # them, and were not in use (``leases_freed`` tells who lost a feature just now).
        freed = int(
            session.execute(
                select(func.count())
                .select_from(Lease)
                .where(Lease.credential_id == current.id, Lease.expires_at > now)
            ).scalar_one()
        )
        session.execute(delete(Lease).where(Lease.credential_id == current.id))
        current.generation += 1
        current.public_key = public
        current.issued_at = now
    session.flush()
    credential = Credential(row.serial, row.product.code, user_id, current.generation, public, now)
    details = {"user_id": user_id, "generation": current.generation, "leases_freed": freed}
    audit.append(
        session, at=now, actor=principal.actor, action="credential.issue", target=row.serial,
        details=details,
    )  # fmt: skip
    webhooks.emit(session, "credential.issued", {"serial": row.serial, **details}, now)
    return render_credential(credential, seed, vendor_key), current.generation, freed


def _count(row: LicenseRow, feature: str, now: datetime) -> int | None:
    """The licensed count of ``feature`` today (None: not licensed or expired)."""
    today = utc(now).date()
    counts = [
        e.count for e in row.entitlements if e.feature == feature and (e.expiry is None or today <= e.expiry)
    ]
    return max(counts) if counts else None


def _in_use(session: Session, license_id: int, feature: str, now: datetime) -> int:
    return int(
        session.execute(
            select(func.count())
            .select_from(Lease)
            .where(Lease.license_id == license_id, Lease.feature == feature, Lease.expires_at > now)
        ).scalar_one()
    )


def _slots_in_force(session: Session, license_id: int, feature: str, now: datetime) -> set[int]:
    """The slots of ``feature``'s leases in force; expired ones are deleted on the way (their
    slots are free, and the unique constraint must not trip over them)."""
    session.execute(
        delete(Lease).where(Lease.license_id == license_id, Lease.feature == feature, Lease.expires_at <= now)
    )
    return set(
        session.execute(
            select(Lease.slot).where(Lease.license_id == license_id, Lease.feature == feature)
        ).scalars()
    )


def _move_under(
    session: Session, row: LicenseRow, lease: Lease, count: int, request: LeaseRequest, now: datetime
) -> None:
    """Renewing a lease whose slot is at or above a count lowered since it was granted: it
    goes on in a free slot under the count, if there is one; else it ends here (refused: it
    stays counted until its current expiry, as every granted lease does). So the leases over
    a lowered count end at their next renewals, and the first to renew keeps a free place."""
    used = _slots_in_force(session, row.id, request.feature, now)
    free = next((s for s in range(count) if s not in used), None)
    if free is None:
        raise LeaseRefused(
            f"lease {lease.lease_id} ends: license {row.serial} now grants {count} lease(s) of "
            f"{request.feature} and all are in use (the count was lowered)",
            "denied",
            request,
            in_use=len(used),
            count=count,
        )
    lease.slot = free
    session.flush()


def handle_lease(
    session: Session,
    request: LeaseRequest,
    now: datetime,
    vendor_key: SigningKey,
    lease_seconds: int,
) -> LeaseResponse:
    """Lease, renew or release; raises :class:`LeaseRefused` with the reason otherwise."""
    row = (
        session.execute(
            select(LicenseRow).where(LicenseRow.serial == request.serial).with_for_update(of=LicenseRow)
        )
        .unique()
        .scalar_one_or_none()
    )
    if row is None:  # first: an unknown serial is a 404, whatever else is wrong (nothing recorded)
        raise LeaseRefused(f"unknown license {request.serial}", "unknown", request, 404)
    if abs(utc(request.sent_at) - utc(now)) > MAX_CLOCK_SKEW:
        raise LeaseRefused(
            "request time is too far from the server's time (check the clock; replayed?)",
            "replay",
            request,
        )
    credential = session.execute(
        select(UserCredential).where(
            UserCredential.license_id == row.id, UserCredential.user_id == request.user_id
        )
    ).scalar_one_or_none()
    if credential is None:
        raise LeaseRefused(
            f"no credential was issued to {request.user_id} on license {row.serial}",
            "forged",
            request,
        )
    if request.generation < credential.generation:
        raise LeaseRefused(
            f"this credential of {request.user_id} was replaced by a newer one "
            f"(generation {request.generation} < {credential.generation}); use the new file",
            "stale-credential",
            request,
        )
    try:
        if request.generation != credential.generation:
            raise SignatureError("unknown generation")
        request.verify_with(credential.public_key)
    except SignatureError:
        raise LeaseRefused(
            f"the request is not signed by {request.user_id}'s current credential (forged?)",
            "forged",
            request,
        ) from None
    if session.get(LeaseNonce, request.nonce) is not None:
        raise LeaseRefused("replayed request (its nonce was used before)", "replay", request)
    session.execute(delete(LeaseNonce).where(LeaseNonce.seen_at < now - 2 * MAX_CLOCK_SKEW))
    session.add(LeaseNonce(nonce=request.nonce, seen_at=now))
    if row.status == "revoked":
        raise LeaseRefused(f"license {row.serial} has been revoked", "revoked", request)
    if row.binding != "user":
        raise LeaseRefused(f"license {row.serial} is not user-bound", "unknown", request)
    count = _count(row, request.feature, now)
    if count is None:
        raise LeaseRefused(
            f"license {row.serial} has no valid feature {request.feature}", "not-licensed", request
        )
    expires: datetime | None = now + timedelta(seconds=lease_seconds)
    lease_id = request.lease_id
    if request.action == "lease":
        used = _slots_in_force(session, row.id, request.feature, now)
        # Every lease in force counts, also those in slots at or above a count lowered
        # since they were granted: a free slot under the count alone is not room.
        free = next((s for s in range(count) if s not in used), None)
        if len(used) >= count or free is None:
            over = f" ({len(used)} held: the count was lowered)" if len(used) > count else ""
            raise LeaseRefused(
                f"all {count} leases of {request.feature} on license {row.serial} are in use{over}",
                "denied",
                request,
                in_use=len(used),
                count=count,
            )
        lease_id = "ls_" + secrets.token_urlsafe(18)  # never starts with "-" (a CLI argument)
        session.add(
            Lease(
                lease_id=lease_id,
                license_id=row.id,
                credential_id=credential.id,
                feature=request.feature,
                slot=free,
                acquired_at=now,
                expires_at=now + timedelta(seconds=lease_seconds),
            )
        )
        session.flush()
    else:
        lease = session.execute(
            select(Lease).where(
                Lease.lease_id == request.lease_id,
                Lease.license_id == row.id,
                Lease.credential_id == credential.id,
                Lease.feature == request.feature,
            )
        ).scalar_one_or_none()
        if request.action == "renew":
            if lease is None or utc(lease.expires_at) <= now:
                raise LeaseRefused(
                    f"lease {request.lease_id} has expired or was released; lease again",
                    "expired",
                    request,
                )
            if lease.slot >= count:
                _move_under(session, row, lease, count, request, now)
            lease.expires_at = now + timedelta(seconds=lease_seconds)
        else:
            # Idempotent, but truthful: the answer names the lease only if this request freed
            # one in force (not one released or expired before, nor another user's).
            if lease is None or utc(lease.expires_at) <= now:
                lease_id = ""
            if lease is not None:
                session.delete(lease)
            session.flush()
            expires = None
    return LeaseResponse(
        action=request.action,
        nonce=request.nonce,
        server_time=utc(now).replace(microsecond=0),
        serial=row.serial,
        feature=request.feature,
        lease_id=lease_id,
        expires=None if expires is None else utc(expires).replace(microsecond=0),
        in_use=_in_use(session, row.id, request.feature, now),
        count=count,
    ).signed(vendor_key)


def record_refusal(session: Session, refusal: LeaseRefused, now: datetime, *, suppressed: int = 0) -> None:
    """Write down a refused lease request (its own transaction: the request changed nothing);
    ``suppressed``: refusals of its license not written down before it (:class:`RefusalLimit`)."""
    request = refusal.request
    details = {
        "user_id": request.user_id,
        "generation": request.generation,
        "feature": request.feature,
        "action": request.action,
        "kind": refusal.kind,
        "reason": refusal.reason,
    }
    if refusal.in_use is not None:
        details["in_use"] = refusal.in_use
        details["count"] = refusal.count
    if suppressed:
        details["suppressed"] = suppressed
    audit.append(
        session,
        at=now,
        actor=f"credential:{request.user_id}",
        action="lease.refused",
        target=request.serial,
        details=details,
    )
    webhooks.emit(session, "lease.denied", {"serial": request.serial, **details}, now)


def list_leases(session: Session, principal: Principal, serial: str, now: datetime) -> dict[str, object]:
    """Credentials (user id, generation) and the leases in force on a user-bound license."""
    row = get_license(session, serial)
    check_access(session, principal, row, write=False)
    credentials = (
        session.execute(
            select(UserCredential).where(UserCredential.license_id == row.id).order_by(UserCredential.user_id)
        )
        .scalars()
        .all()
    )
    users = {c.id: c.user_id for c in credentials}
    leases = session.execute(
        select(Lease)
        .where(Lease.license_id == row.id, Lease.expires_at > now)
        .order_by(Lease.feature, Lease.slot)
    ).scalars()
    return {
        "serial": row.serial,
        "credentials": [
            {
                "user_id": c.user_id,
                "generation": c.generation,
                "issued_at": utc(c.issued_at).isoformat(),
            }
            for c in credentials
        ],
        "leases": [
            {
                "lease_id": lease.lease_id,
                "feature": lease.feature,
                "user_id": users.get(lease.credential_id),
                "acquired_at": utc(lease.acquired_at).isoformat(),
                "expires_at": utc(lease.expires_at).isoformat(),
            }
            for lease in leases
        ],
    }
