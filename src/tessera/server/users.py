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

import base64
import functools
import hashlib
import hmac
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
from tessera.server.errors import Conflict, Invalid, NotFound
from tessera.server.models import PortalSession, PortalUser
from tessera.server.tokens import Principal, Role, require

__all__ = [
    "IDLE_TIMEOUT",
    "LOCKOUT",
    "MAX_FAILED_LOGINS",
    "MIN_PASSWORD_LENGTH",
    "SESSION_LIFETIME",
    "WRONG_SIGN_IN",
    "SignInRefused",
    "SignedIn",
    "TotpOffer",
    "change_own_password",
    "check_password",
    "create_user",
    "disable_totp",
    "enable_totp",
    "generate_password",
    "genuine_offer",
    "list_users",
    "offer_totp",
    "resolve_session",
    "sign_in",
    "sign_out",
    "totp_uri",
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

#: The one answer to an unknown name, a wrong password and a locked account alike, so
#: that it does not tell which names exist; it still tells a user who mistyped several
#: times why even the right password is refused for a while.
WRONG_SIGN_IN = (
    f"wrong user name or password (after {MAX_FAILED_LOGINS} wrong attempts in a row an account "
    f"is locked for {LOCKOUT.seconds // 60} minutes, or until an administrator unlocks it)"
)

_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{2,63}$")
_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user name is unknown, so that answer takes as long as a
    wrong password. Made at the first sign-in, not at import (tens of ms, 64 MiB)."""
    return _hasher.hash(secrets.token_urlsafe(16))


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
        "two_factor": user.totp_secret is not None,
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
    reset_two_factor: bool = False,
) -> PortalUser:
    """Set a new password, disable or enable, unlock, turn two-step sign-in off (a lost
    phone) (admins only). A new password or a disabled account ends the user's sessions."""
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
    if reset_two_factor and user.totp_secret is not None:
        user.totp_secret = None
        user.totp_last_step = None
        changes["two_factor"] = "reset"
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
    #: The user signs in with a code from an authenticator app as well.
    two_factor: bool = False


@dataclass(frozen=True, slots=True)
class SignInRefused:
    """Why a sign-in failed; returned, not raised, so the failure count is committed."""

    reason: str
    #: The refusal locked the account and ended its sessions (the browser must sign in again).
    signed_out: bool = False


def _csrf(secret: str) -> str:
    # Derived from the cookie's secret: nothing more to store, and no other session's forms
    # can be replayed into this one.
    return hashlib.sha256(b"tessera-portal-csrf\x00" + secret.encode("utf-8")).hexdigest()


def sign_in(
    session: Session,
    username: str,
    password: str,
    now: datetime,
    *,
    code: str = "",
    pepper: bytes,
) -> tuple[str, SignedIn] | SignInRefused:
    """Check the password (and, for a user with two-step sign-in, the code); return a new
    session's secret (for the cookie) and who it is, or why not. A wrong name, a wrong
    password and a locked account get one answer (:data:`WRONG_SIGN_IN`) after the same
    argon2 work, so neither the answer nor its time tells that a name exists; only someone
    who knows the password learns more (a missing, wrong or used code, a disabled account).
    A wrong code counts towards the lockout like a wrong password."""
    user = session.execute(
        select(PortalUser).where(PortalUser.username == username.strip().lower()).with_for_update()
    ).scalar_one_or_none()
    if user is None or len(password) > MAX_PASSWORD_LENGTH * 4:
        _verify(_dummy_hash(), password[: MAX_PASSWORD_LENGTH * 4])
        return SignInRefused(WRONG_SIGN_IN)
    right = _verify(user.password_hash, password)  # locked or not: the same work, the same time
    if user.locked_until is not None and user.locked_until > now:
        return SignInRefused(WRONG_SIGN_IN)  # even the right password: the lock holds
    if not right:
        _fail(session, user, now)
        return SignInRefused(WRONG_SIGN_IN)
    if user.disabled:
        return SignInRefused("this account is disabled")
    if user.totp_secret is not None:
        refused = _check_code(session, user, code, now, pepper)
        if refused is not None:
            return refused
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
    return secret, SignedIn(
        _principal(user), user.username, _csrf(secret), row.id, two_factor=user.totp_secret is not None
    )


def _fail(session: Session, user: PortalUser, now: datetime) -> None:
    user.failed_logins += 1
    if user.failed_logins >= MAX_FAILED_LOGINS:
        user.locked_until = now + LOCKOUT
        user.failed_logins = 0
        audit.append(
            session, at=now, actor=f"user/{user.username}", action="user.locked",
            target=f"user:{user.username}",
            details={"after_failed_logins": MAX_FAILED_LOGINS, "until": user.locked_until.isoformat()},
        )  # fmt: skip


def _locked(user: PortalUser, now: datetime) -> SignInRefused | None:
    """Inside a session the user is known, so the lock may be named (unlike at sign-in)."""
    if user.locked_until is not None and user.locked_until > now:
        return SignInRefused(
            f"this account is locked until {user.locked_until.strftime('%H:%M')} UTC after too many "
            "wrong attempts (or until an administrator unlocks it)"
        )
    return None


def _wrong_in_session(session: Session, user: PortalUser, now: datetime, wrong: str) -> SignInRefused:
    """A wrong password or code given on the Account page counts towards the same lockout
    as at sign-in: otherwise a stolen session (a browser left open) could guess them
    without limit. The attempt that locks the account also ends every session of the user,
    so the guessing session is gone too."""
    _fail(session, user, now)
    if user.locked_until is not None and user.locked_until > now:
        session.execute(delete(PortalSession).where(PortalSession.user_id == user.id))
        return SignInRefused(
            f"{wrong}; after {MAX_FAILED_LOGINS} wrong attempts in a row this account is locked "
            f"for {LOCKOUT.seconds // 60} minutes and you are signed out",
            signed_out=True,
        )
    left = MAX_FAILED_LOGINS - user.failed_logins
    return SignInRefused(
        f"{wrong} ({left} more wrong {'attempt locks' if left == 1 else 'attempts lock'} "
        f"the account for {LOCKOUT.seconds // 60} minutes)"
    )


def _check_code(
    session: Session, user: PortalUser, code: str, now: datetime, pepper: bytes
) -> SignInRefused | None:
    """None when ``code`` is the user's current TOTP code, not used before."""
    code = code.replace(" ", "").strip()
    if not code:
        return SignInRefused("enter the 6-digit code from your authenticator app")
    assert user.totp_secret is not None
    step = _code_step(_open_secret(pepper, user.id, user.totp_secret), code, now)
    if step is None:
        _fail(session, user, now)
        return SignInRefused("wrong code from the authenticator app")
    if user.totp_last_step is not None and step <= user.totp_last_step:
        _fail(session, user, now)
        return SignInRefused("this code was used already: wait for the next one")
    user.totp_last_step = step
    return None


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
    return SignedIn(
        _principal(user), user.username, _csrf(secret), row.id, stale, user.totp_secret is not None
    )


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


def change_own_password(
    session: Session, signed_in: SignedIn, current: str, new: str, now: datetime
) -> SignInRefused | None:
    """A user's own new password; the current one must be given. Other sessions end.
    A wrong current password is returned, not raised, so that it counts towards the
    lockout (the transaction commits); a weak new password raises :class:`Invalid`."""
    user = _user(session, signed_in.username)
    refused = _locked(user, now)
    if refused is not None:
        return refused
    if not _verify(user.password_hash, current[: MAX_PASSWORD_LENGTH * 4]):
        return _wrong_in_session(session, user, now, "current password: wrong")
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
    return None


# ---------------------------------------------------------------------------- two-step sign-in

#: Codes of the step before and after the current one are accepted too (clock drift).
CODE_WINDOW = 1
_ISSUER = "Tessera"


def _totp_key(pepper: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(hashes.SHA256(), 32, salt=None, info=b"tessera portal totp").derive(pepper)


def _seal_secret(pepper: bytes, user_id: int, secret: str) -> str:
    """The TOTP secret encrypted at rest: the database alone does not give it away."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(12)
    sealed = AESGCM(_totp_key(pepper)).encrypt(nonce, secret.encode("ascii"), f"user:{user_id}".encode())
    return base64.b64encode(nonce + sealed).decode("ascii")


def _open_secret(pepper: bytes, user_id: int, sealed: str) -> str:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    raw = base64.b64decode(sealed)
    return AESGCM(_totp_key(pepper)).decrypt(raw[:12], raw[12:], f"user:{user_id}".encode()).decode("ascii")


def _code_step(secret: str, code: str, now: datetime) -> int | None:
    """The time step ``code`` belongs to (within :data:`CODE_WINDOW`), or None."""
    import pyotp
    from pyotp.exceptions import OTPVerificationError

    if not (code.isdigit() and len(code) == 6):
        return None
    try:
        return int(pyotp.TOTP(secret).verify_and_get_timecode(code, for_time=now, valid_window=CODE_WINDOW))
    except OTPVerificationError:
        return None


@dataclass(frozen=True, slots=True)
class TotpOffer:
    """A new secret for the user to put into an authenticator app, and the proof (an HMAC
    under the pepper) that this server made it for this user, so the confirming form can
    carry it back without the server keeping anything in between."""

    secret: str
    uri: str
    proof: str


def _offer_proof(pepper: bytes, username: str, secret: str) -> str:
    return hmac.new(
        _totp_key(pepper), f"offer\x00{username}\x00{secret}".encode(), hashlib.sha256
    ).hexdigest()


def genuine_offer(signed_in: SignedIn, secret: str, proof: str, pepper: bytes) -> bool:
    """Whether this server offered ``secret`` to this user (the form carried it back)."""
    return hmac.compare_digest(proof, _offer_proof(pepper, signed_in.username, secret))


def offer_totp(signed_in: SignedIn, pepper: bytes) -> TotpOffer:
    import pyotp

    secret = pyotp.random_base32()
    return TotpOffer(
        secret, totp_uri(secret, signed_in.username), _offer_proof(pepper, signed_in.username, secret)
    )


def totp_uri(secret: str, username: str) -> str:
    """The ``otpauth://`` link an authenticator app takes (also as a QR code)."""
    import pyotp

    return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=_ISSUER)


def enable_totp(
    session: Session,
    signed_in: SignedIn,
    secret: str,
    proof: str,
    code: str,
    now: datetime,
    pepper: bytes,
    *,
    current_code: str = "",
) -> SignInRefused | None:
    """Turn two-step sign-in on once the user shows a code of the offered secret.

    While it is on, the offer replaces the secret (a new phone) only with a current code of
    the old one as well: otherwise a session alone (a browser left open) could swap in an
    authenticator of its own, which turning it off does not allow, and the user's own app
    would be dead. A wrong or used current code is returned, not raised, so that it counts
    towards the lockout like at sign-in; a missing one is asked for without counting."""
    if not genuine_offer(signed_in, secret, proof, pepper):
        raise Invalid("code: this set-up has expired; start again")
    user = _user(session, signed_in.username)
    replacing = user.totp_secret is not None
    if replacing:
        refused = _locked(user, now)
        if refused is not None:
            return refused
    step = _code_step(secret, code.replace(" ", ""), now)
    if step is None:
        raise Invalid("code: wrong code; check the app's clock and enter the code it shows now")
    if user.totp_secret is not None:
        current_code = current_code.replace(" ", "").strip()
        if not current_code:
            return SignInRefused("current code: enter the code the app you use now shows")
        old = _code_step(_open_secret(pepper, user.id, user.totp_secret), current_code, now)
        if old is None or (user.totp_last_step is not None and old <= user.totp_last_step):
            return _wrong_in_session(session, user, now, "current code: wrong or used code")
    user.totp_secret = _seal_secret(pepper, user.id, secret)
    user.totp_last_step = step
    details: dict[str, object] = {"enabled": True}
    if replacing:
        details["replaced"] = True
    audit.append(
        session, at=now, actor=signed_in.principal.actor, action="user.two-factor",
        target=f"user:{user.username}", details=details,
    )  # fmt: skip
    return None


def disable_totp(
    session: Session, signed_in: SignedIn, code: str, now: datetime, pepper: bytes
) -> SignInRefused | None:
    """Turn it off again; a current code is needed (not only the session). A wrong or used
    code is returned, not raised, so that it counts towards the lockout like at sign-in."""
    user = _user(session, signed_in.username)
    if user.totp_secret is None:
        raise Invalid("code: two-step sign-in is off already")
    refused = _locked(user, now)
    if refused is not None:
        return refused
    step = _code_step(_open_secret(pepper, user.id, user.totp_secret), code.replace(" ", ""), now)
    if step is None or (user.totp_last_step is not None and step <= user.totp_last_step):
        return _wrong_in_session(session, user, now, "code: wrong or used code")
    user.totp_secret = None
    user.totp_last_step = None
    audit.append(
        session, at=now, actor=signed_in.principal.actor, action="user.two-factor",
        target=f"user:{user.username}", details={"enabled": False},
    )  # fmt: skip
    return None
