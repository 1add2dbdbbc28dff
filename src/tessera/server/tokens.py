"""API tokens and roles.

A token is 32 random bytes (``tsk_`` + URL-safe base64); the database keeps only its
SHA-256, which is enough for a secret with 256 bits of entropy (no slow hash needed: there
is nothing to guess). The secret is shown once, when the token is made.

Roles:

* ``admin``: everything;
* ``support``: read everything, change licenses, offline activation;
* ``sales``: customers and licenses (issue, change, read);
* ``partner``: features and licenses inside its own namespace (``partner.<code>.``);
* ``customer``: read and activate offline its own licenses;
* ``readonly``: read everything, change nothing.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from tessera.server import audit
from tessera.server.errors import Conflict, Forbidden, NotFound, Unauthorized
from tessera.server.models import ApiToken, Partner

__all__ = [
    "INITIAL_TOKEN_NAME",
    "MAX_TOKEN_NAME",
    "Principal",
    "Role",
    "create_token",
    "hash_token",
    "list_tokens",
    "require",
    "resolve_token",
    "revoke_token",
    "token_view",
]

TOKEN_PREFIX = "tsk_"
#: The admin token ``server init`` prints once (the security checklist asks for it revoked).
INITIAL_TOKEN_NAME = "initial-admin"


class Role(StrEnum):
    ADMIN = "admin"
    SUPPORT = "support"
    SALES = "sales"
    PARTNER = "partner"
    CUSTOMER = "customer"
    READONLY = "readonly"


#: Every change a token makes is recorded with its actor ``role:name`` in columns of 200
#: characters (audit, license revisions); a longer name would make every write fail.
MAX_ACTOR = 200
MAX_TOKEN_NAME = MAX_ACTOR - len(":") - max(len(r.value) for r in Role)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's name, role and (for partner/customer) whose data it sees."""

    token_id: int
    name: str
    role: Role
    partner_id: int | None = None
    customer_id: int | None = None

    @property
    def actor(self) -> str:
        return f"{self.role.value}:{self.name}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(
    session: Session,
    *,
    name: str,
    role: Role,
    now: datetime,
    partner_id: int | None = None,
    customer_id: int | None = None,
) -> tuple[ApiToken, str]:
    """Store a new token's hash; return the row and the secret (shown once)."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        token_hash=hash_token(secret),
        name=name,
        role=role.value,
        partner_id=partner_id,
        customer_id=customer_id,
        created_at=now,
        revoked=False,
    )
    session.add(row)
    session.flush()
    return row, secret


def resolve_token(session: Session, token: str | None) -> Principal:
    """A bearer token to a principal; 401 when missing or unknown."""
    if not token:
        raise Unauthorized("missing API token (Authorization: Bearer <token>)")
    if len(token) > 200:
        raise Unauthorized("unknown or revoked API token")
    row = session.execute(
        select(ApiToken).where(ApiToken.token_hash == hash_token(token))
    ).scalar_one_or_none()
    if row is None or row.revoked:
        raise Unauthorized("unknown or revoked API token")
    return Principal(row.id, row.name, Role(row.role), row.partner_id, row.customer_id)


def require(principal: Principal, *roles: Role) -> None:
    """403 unless the caller has one of ``roles`` (admin always may)."""
    if principal.role is not Role.ADMIN and principal.role not in roles:
        raise Forbidden(f"role {principal.role.value} may not do this")


def token_view(row: ApiToken, partner_code: str | None = None) -> dict[str, object]:
    """What an admin may see of a token: never the secret's hash (it identifies the secret
    in a copy of the database, and the listing has no use for it)."""
    return {
        "id": row.id,
        "name": row.name,
        "role": row.role,
        "partner": partner_code,
        "customer_id": row.customer_id,
        "created_at": row.created_at.isoformat(),
        "revoked": row.revoked,
    }


def list_tokens(session: Session, principal: Principal) -> list[dict[str, object]]:
    """Every token, revoked ones too (admins only): an admin finds the id to revoke here."""
    require(principal, Role.ADMIN)
    rows = session.execute(
        select(ApiToken, Partner.code)
        .outerjoin(Partner, Partner.id == ApiToken.partner_id)
        .order_by(ApiToken.id)
    ).all()
    return [token_view(row, code) for row, code in rows]


def revoke_token(session: Session, principal: Principal, token_id: int, now: datetime) -> dict[str, object]:
    """Revoke a token at once (admins only); revoking a revoked token changes nothing.

    An admin may revoke the very token it calls with (it stops working when this request
    ends), but never the last active admin token: no verb makes an admin token without
    one, so that would lock every administrator out of the API for good."""
    require(principal, Role.ADMIN)
    row = session.execute(
        select(ApiToken).where(ApiToken.id == token_id).with_for_update()
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"token {token_id} not found")
    if not row.revoked:
        if row.role == Role.ADMIN.value:
            # Lock the other admin tokens too, so two admins revoking each other's token at
            # once cannot both pass this check.
            others = session.execute(
                select(ApiToken.id)
                .where(ApiToken.role == Role.ADMIN.value, ApiToken.revoked.is_(False), ApiToken.id != row.id)
                .with_for_update()
            ).all()
            if not others:
                raise Conflict(
                    f"token {token_id} is the last active admin token: create another admin token "
                    "first (tessera token create --role admin), then revoke this one"
                )
        row.revoked = True
        audit.append(
            session, at=now, actor=principal.actor, action="token.revoke", target=f"token:{row.id}",
            details={"name": row.name, "role": row.role, "own": row.id == principal.token_id},
        )  # fmt: skip
    code = None
    if row.partner_id is not None:
        code = session.execute(select(Partner.code).where(Partner.id == row.partner_id)).scalar_one()
    return {**token_view(row, code), "own": row.id == principal.token_id}
