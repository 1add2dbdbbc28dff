"""People who sign in to the web portal: accounts, the password policy, sign-in, sessions.

API tokens serve tools; people get a user name and a password. The password is kept as an
argon2id hash (argon2-cffi's defaults, RFC 9106's second recommendation) and must pass the
policy of :func:`check_password`. A signed-in browser holds a session cookie with 256
random bits; the server keeps only their SHA-256, as for API tokens, so a copy of the
database signs nobody in. A user acts with the rights of an API token of the same role
and scope (:class:`~tessera.server.tokens.Principal`), so every rule of the API holds in
the portal too.

Wrong passwords in a row lock the account for a while (:data:`LOCKOUT`); an unknown user
name costs the same hash as a known one, so the time of an answer does not tell which
names exist.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from tessera.server import audit, catalog
from tessera.server.errors import Conflict, Forbidden, Invalid, NotFound
from tessera.server.models import PortalSession, PortalUser
from tessera.server.tokens import Principal, Role, require

__all__ = [
    "IDLE_TIMEOUT",
    "LOCKOUT",
    "MAX_FAILED_LOGINS",
    "MIN_PASSWORD_LENGTH",
    "SESSION_LIFETIME",
    "SignInRefused",
    "SignedIn",
    "change_own_password",
    "check_password",
    "create_user",
    "generate_password",
    "list_users",
    "resolve_session",
    "sign_in",
    "sign_out",
    "touch_session",
    "update_user",
    "user_view",
]

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 256
#: zxcvbn's score (0-4) a password needs: 3 is "safely unguessable", about 10^10 guesses.
MIN_SCORE = 3
#: zxcvbn refuses longer input; a longer password is at least as strong as its start.
_SCORED_LENGTH = 72
MAX_FAILED_LOGINS = 5
LOCKOUT = timedelta(minutes=15)
#: A session ends after this long without a request, and after SESSION_LIFETIME in any case.
IDLE_TIMEOUT = timedelta(minutes=30)
SESSION_LIFETIME = timedelta(hours=12)
#: last_seen_at is written at most this often (a page view is then mostly a read).
_TOUCH_EVERY = timedelta(minutes=1)

_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{2,63}$")
_hasher = PasswordHasher()
#: Hashed when the user name is unknown, so that answer takes as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def check_password(password: str, *, username: str) -> None:
    """Refuse a weak password with :class:`Invalid` naming why.

    The policy follows NIST SP 800-63B: a minimum length, no composition rules, and a
    check against what attackers try first (zxcvbn: common passwords, words, names,
    keyboard patterns, dates, repeats, and the user name itself)."""
    normalized = unicodedata.normalize("NFKC", password)
    if len(normalized) < MIN_PASSWORD_LENGTH:
        raise Invalid(f"password: at least {MIN_PASSWORD_LENGTH} characters")
    if len(normalized) > MAX_PASSWORD_LENGTH:
        raise Invalid(f"password: at most {MAX_PASSWORD_LENGTH} characters")
    if any(unicodedata.category(c) == "Cc" for c in normalized):
        raise Invalid("password: control characters are not allowed")
    from zxcvbn import zxcvbn  # type: ignore[import-untyped]  # dictionaries load on first use

    result = zxcvbn(normalized[:_SCORED_LENGTH], user_inputs=[username, "tessera", "license"])
    if result["score"] < MIN_SCORE:
        feedback = result.get("feedback", {})
        why = feedback.get("warning") or "it is too easy to guess"
        hint = " ".join(feedback.get("suggestions", [])[:1])
        raise Invalid(f"password: too weak ({why.rstrip('.')}){'; ' + hint if hint else ''}")


def generate_password() -> str:
    """A password that passes the policy: 24 URL-safe characters (144 bits)."""
    return secrets.token_urlsafe(18)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _check_username(username: str) -> None:
    if not _USERNAME.match(username):
        raise Invalid(
            "username: 3-64 characters, lower-case letters, digits and . _ @ -, "
            "starting with a letter or digit"
        )


def user_view(user: PortalUser, now: datetime) -> dict[str, object]:
    return {
        "username": user.username,
        "role": user.role,
        "customer_id": user.customer_id,
        "partner_id": user.partner_id,
        "disabled": user.disabled,
        "locked": user.locked_until is not None and user.locked_until > now,
        "created_at": user.created_at.isoformat(),
        "password_changed_at": user.password_changed_at.isoformat(),
    }


def create_user(
    session: Session,
    principal: Principal,
    *,
    username: str,
    password: str,
    role: Role,
    now: datetime,
    partner_code: str | None = None,
    customer_id: int | None = None,
) -> PortalUser:
    """A new portal user (admins only); the same scope rules as an API token."""
    require(principal, Role.ADMIN)
    _check_username(username)
    check_password(password, username=username)
    partner_id = None
    if role is Role.PARTNER:
        if partner_code is None:
            raise Invalid("partner: a partner user needs the partner's code")
        partner_id = catalog.get_partner_by_code(session, partner_code).id
    if role is Role.CUSTOMER:
        if customer_id is None:
            raise Invalid("customer_id: a customer user needs the customer's id")
        customer_id = catalog.get_customer(session, principal, customer_id).id
    elif customer_id is not None:
        raise Invalid("customer_id: only a customer user belongs to a customer")
    if partner_code is not None and role is not Role.PARTNER:
        raise Invalid("partner: only a partner user belongs to a partner")
    taken = session.execute(select(PortalUser.id).where(PortalUser.username == username)).first()
    if taken is not None:
        raise Conflict(f"username {username!r} exists already")
    user = PortalUser(
        username=username,
        password_hash=_hasher.hash(password),
        role=role.value,
        partner_id=partner_id,
        customer_id=customer_id,
        created_at=now,
        password_changed_at=now,
        disabled=False,
        failed_logins=0,
    )
    session.add(user)
    session.flush()
    audit.append(
        session, at=now, actor=principal.actor, action="user.create", target=f"user:{username}",
        details={"role": role.value, "customer_id": customer_id, "partner_id": partner_id},
    )  # fmt: skip
    return user


def _user(session: Session, username: str) -> PortalUser:
    user = session.execute(select(PortalUser).where(PortalUser.username == username)).scalar_one_or_none()
    if user is None:
        raise NotFound(f"user {username!r} not found")
    return user


def list_users(session: Session, principal: Principal) -> list[PortalUser]:
    require(principal, Role.ADMIN)
    return list(session.execute(select(PortalUser).order_by(PortalUser.username)).scalars())


def update_user(
    session: Session,
    principal: Principal,
    username: str,
    *,
    now: datetime,
    password: str | None = None,
    disabled: bool | None = None,
    unlock: bool = False,
) -> PortalUser:
    """Set a new password, disable or enable, unlock (admins only). A new password or a
    disabled account ends the user's sessions."""
    require(principal, Role.ADMIN)
    user = _user(session, username)
    changes: dict[str, object] = {}
    if password is not None:
        check_password(password, username=username)
        user.password_hash = _hasher.hash(password)
        user.password_changed_at = now
        changes["password"] = "set"
    if disabled is not None and disabled != user.disabled:
        user.disabled = disabled
        changes["disabled"] = disabled
    if unlock or password is not None:
        if user.failed_logins or user.locked_until is not None:
            changes["unlocked"] = True
        user.failed_logins = 0
        user.locked_until = None
    if password is not None or user.disabled:
        session.execute(delete(PortalSession).where(PortalSession.user_id == user.id))
    if changes:
        audit.append(
            session, at=now, actor=principal.actor, action="user.update", target=f"user:{username}",
            details=changes,
        )  # fmt: skip
    return user


def _principal(user: PortalUser) -> Principal:
    # Negative ids keep a user apart from any API token; the actor names the user.
    return Principal(-user.id, f"user/{user.username}", Role(user.role), user.partner_id, user.customer_id)


@dataclass(frozen=True, slots=True)
class SignedIn:
    """A valid session: who it is and the secret its forms must echo (CSRF)."""

    principal: Principal
    username: str
    csrf_token: str
    session_id: int
    #: The last request is over a minute ago: :func:`touch_session` should record this one.
    stale: bool = False


@dataclass(frozen=True, slots=True)
class SignInRefused:
    """Why a sign-in failed; returned, not raised, so the failure count is committed."""

    reason: str


def _csrf(secret: str) -> str:
    # Derived from the cookie's secret: nothing more to store, and no other session's forms
    # can be replayed into this one.
    return hashlib.sha256(b"tessera-portal-csrf\x00" + secret.encode("utf-8")).hexdigest()


def sign_in(
    session: Session, username: str, password: str, now: datetime
) -> tuple[str, SignedIn] | SignInRefused:
    """Check the password; return a new session's secret (for the cookie) and who it is,
    or why not: a wrong name or password (one message for both), a locked or disabled
    account."""
    user = session.execute(
        select(PortalUser).where(PortalUser.username == username.strip().lower()).with_for_update()
    ).scalar_one_or_none()
    if user is None or len(password) > MAX_PASSWORD_LENGTH * 4:
        _verify(_DUMMY_HASH, password[: MAX_PASSWORD_LENGTH * 4])
        return SignInRefused("wrong user name or password")
    if user.locked_until is not None and user.locked_until > now:
        return SignInRefused(
            f"too many wrong passwords: this account is locked until "
            f"{user.locked_until.strftime('%H:%M')} UTC (or until an administrator unlocks it)"
        )
    if not _verify(user.password_hash, password):
        user.failed_logins += 1
        if user.failed_logins >= MAX_FAILED_LOGINS:
            user.locked_until = now + LOCKOUT
            user.failed_logins = 0
            audit.append(
                session, at=now, actor=f"user/{user.username}", action="user.locked",
                target=f"user:{user.username}",
                details={"after_failed_logins": MAX_FAILED_LOGINS, "until": user.locked_until.isoformat()},
            )  # fmt: skip
        return SignInRefused("wrong user name or password")
    if user.disabled:
        return SignInRefused("this account is disabled")
    user.failed_logins = 0
    user.locked_until = None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    secret = secrets.token_urlsafe(32)
    row = PortalSession(token_hash=_hash(secret), user_id=user.id, created_at=now, last_seen_at=now)
    session.add(row)
    session.flush()
    # Sessions that ended long ago go with every sign-in (they can no longer be used).
    session.execute(
        delete(PortalSession).where(
            PortalSession.user_id == user.id, PortalSession.last_seen_at < now - SESSION_LIFETIME
        )
    )
    return secret, SignedIn(_principal(user), user.username, _csrf(secret), row.id)


def _verify(encoded: str, password: str) -> bool:
    try:
        return _hasher.verify(encoded, password)
    except (VerificationError, InvalidHashError):
        return False


def resolve_session(session: Session, secret: str | None, now: datetime) -> SignedIn | None:
    """The cookie's session if it is still valid (None: sign in again)."""
    if not secret or len(secret) > 100:
        return None
    row = session.execute(
        select(PortalSession).where(PortalSession.token_hash == _hash(secret))
    ).scalar_one_or_none()
    if row is None:
        return None
    user = row.user
    if user.disabled or now - row.last_seen_at > IDLE_TIMEOUT or now - row.created_at > SESSION_LIFETIME:
        return None
    stale = now - row.last_seen_at >= _TOUCH_EVERY
    return SignedIn(_principal(user), user.username, _csrf(secret), row.id, stale)


def touch_session(session: Session, signed_in: SignedIn, now: datetime) -> None:
    """Record the request (the idle timeout counts from it); only a stale session needs it,
    so most page views are reads."""
    if signed_in.stale:
        session.execute(
            update(PortalSession).where(PortalSession.id == signed_in.session_id).values(last_seen_at=now)
        )


def sign_out(session: Session, secret: str | None) -> None:
    if secret and len(secret) <= 100:
        session.execute(delete(PortalSession).where(PortalSession.token_hash == _hash(secret)))


def change_own_password(session: Session, signed_in: SignedIn, current: str, new: str, now: datetime) -> None:
    """A user's own new password; the current one must be given. Other sessions end."""
    user = _user(session, signed_in.username)
    if not _verify(user.password_hash, current):
        raise Forbidden("current password: wrong")
    if new == current:
        raise Invalid("password: the new password must differ from the current one")
    check_password(new, username=user.username)
    user.password_hash = _hasher.hash(new)
    user.password_changed_at = now
    # Whoever else signed in with the old password is signed out; this browser stays.
    session.execute(
        delete(PortalSession).where(
            PortalSession.user_id == user.id, PortalSession.id != signed_in.session_id
        )
    )
    audit.append(
        session, at=now, actor=signed_in.principal.actor, action="user.password",
        target=f"user:{user.username}", details={},
    )  # fmt: skip
