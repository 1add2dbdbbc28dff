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

from tessera.server.errors import Forbidden, Unauthorized
from tessera.server.models import ApiToken

__all__ = [
    "INITIAL_TOKEN_NAME",
    "Principal",
    "Role",
    "create_token",
    "hash_token",
    "require",
    "resolve_token",
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
