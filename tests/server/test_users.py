"""Portal users: the password policy, sign-in, lockout and sessions (both backends)."""

from __future__ import annotations

from datetime import timedelta

import pyotp
import pytest
from sqlalchemy import func, select

from tessera.core.clock import ManualClock
from tessera.server import users
from tessera.server.app import ServerState
from tessera.server.errors import Conflict, Forbidden, Invalid, NotFound
from tessera.server.models import AuditEntry, Customer, PortalSession, PortalUser
from tessera.server.tokens import Principal, Role

from .helpers import setup_license

GOOD = "tidal-orbit-cactus-lantern"


@pytest.mark.parametrize(
    ("password", "why"),
    [
        ("short-1A!", "at least 12"),
        ("password1234", "too weak"),
        ("qwertyuiop12", "too weak"),
        ("maria.keller2026", "too weak"),  # the user name itself
        ("aaaaaaaaaaaaaaaa", "too weak"),
        ("tessera12345", "too weak"),
        ("x" * 257, "at most 256"),
        ("tidal-orbit\x00cactus", "control characters"),
    ],
)
def test_weak_passwords_are_refused_with_the_reason(password: str, why: str) -> None:
    with pytest.raises(Invalid, match=why) as caught:
        users.check_password(password, username="maria.keller")
    assert str(caught.value).startswith("password:")


@pytest.mark.parametrize(
    "password", [GOOD, "Correct horse battery staple", "üüüx7Q!pLm#92vR", "tidal-orbit-cactus-lantern-" * 4]
)
def test_strong_passwords_pass(password: str) -> None:
    users.check_password(password, username="maria.keller")


def test_generated_passwords_pass() -> None:
    for _ in range(20):
        users.check_password(users.generate_password(), username="maria.keller")


def _user(state: ServerState, admin: Principal) -> None:
    with state.db.write() as session:
        users.create_user(
            session, admin, username="maria.keller", password=GOOD, role=Role.SUPPORT, now=state.now()
        )


def _sign_in(
    state: ServerState, name: str, password: str
) -> tuple[str, users.SignedIn] | users.SignInRefused:
    with state.db.write() as session:
        return users.sign_in(session, name, password, state.now(), pepper=state.pepper)


def test_the_password_is_stored_as_argon2id_only(state: ServerState, admin: Principal) -> None:
    _user(state, admin)
    with state.db.read() as session:
        stored = session.execute(select(PortalUser.password_hash)).scalar_one()
    assert stored.startswith("$argon2id$") and GOOD not in stored


def test_create_user_checks_name_scope_and_duplicates(state: ServerState, admin: Principal) -> None:
    with state.db.write() as session:
        with pytest.raises(Invalid, match="username"):
            users.create_user(
                session, admin, username="Maria Keller", password=GOOD, role=Role.ADMIN, now=state.now()
            )
        with pytest.raises(Invalid, match="customer_id"):
            users.create_user(
                session, admin, username="cust", password=GOOD, role=Role.CUSTOMER, now=state.now()
            )
        with pytest.raises(NotFound, match="customer 99"):
            users.create_user(
                session,
                admin,
                username="cust",
                password=GOOD,
                role=Role.CUSTOMER,
                now=state.now(),
                customer_id=99,
            )
        with pytest.raises(Invalid, match="partner"):
            users.create_user(
                session, admin, username="part", password=GOOD, role=Role.PARTNER, now=state.now()
            )
    _user(state, admin)
    with state.db.write() as session, pytest.raises(Conflict, match="exists"):
        users.create_user(
            session, admin, username="maria.keller", password=GOOD, role=Role.ADMIN, now=state.now()
        )
    support = Principal(7, "s", Role.SUPPORT)
    with state.db.write() as session, pytest.raises(Forbidden):
        users.create_user(session, support, username="other", password=GOOD, role=Role.ADMIN, now=state.now())


def test_sign_in_gives_a_session_whose_secret_is_stored_hashed(state: ServerState, admin: Principal) -> None:
    _user(state, admin)
    outcome = _sign_in(state, "Maria.Keller ", GOOD)  # as typed: case and spaces do not matter
    assert not isinstance(outcome, users.SignInRefused)
    secret, signed_in = outcome
    assert (
        signed_in.principal.role is Role.SUPPORT and signed_in.principal.actor == "support:user/maria.keller"
    )
    with state.db.write() as session:
        assert session.execute(select(PortalSession.token_hash)).scalar_one() != secret
        again = users.resolve_session(session, secret, state.now())
    assert again is not None and again.csrf_token == signed_in.csrf_token
    with state.db.write() as session:
        assert users.resolve_session(session, secret + "x", state.now()) is None
        assert users.resolve_session(session, None, state.now()) is None


def test_wrong_and_unknown_names_get_the_same_answer(state: ServerState, admin: Principal) -> None:
    _user(state, admin)
    wrong = _sign_in(state, "maria.keller", "not-the-password")
    unknown = _sign_in(state, "nobody", GOOD)
    assert wrong == unknown == users.SignInRefused(users.WRONG_SIGN_IN)
    assert "wrong user name or password" in users.WRONG_SIGN_IN
    assert "locked for 15 minutes" in users.WRONG_SIGN_IN  # why the right password may fail


def test_five_wrong_passwords_lock_the_account_for_a_while(
    state: ServerState, admin: Principal, clock: ManualClock
) -> None:
    _user(state, admin)
    for _ in range(users.MAX_FAILED_LOGINS):
        assert isinstance(_sign_in(state, "maria.keller", "wrong-password-here"), users.SignInRefused)
    locked = _sign_in(state, "maria.keller", GOOD)  # even the right password, now
    # The same answer as a wrong password or an unknown name: it does not tell the name exists.
    assert locked == _sign_in(state, "maria.keller", "wrong-password-here") == _sign_in(state, "nobody", GOOD)
    assert locked == users.SignInRefused(users.WRONG_SIGN_IN)
    with state.db.read() as session:
        actions = session.execute(select(AuditEntry.action)).scalars().all()
    assert actions.count("user.locked") == 1
    clock.advance(users.LOCKOUT + timedelta(seconds=1))
    assert not isinstance(_sign_in(state, "maria.keller", GOOD), users.SignInRefused)


def test_an_admin_unlocks_and_a_success_resets_the_count(state: ServerState, admin: Principal) -> None:
    _user(state, admin)
    for _ in range(users.MAX_FAILED_LOGINS):
        _sign_in(state, "maria.keller", "wrong-password-here")
    with state.db.write() as session:
        users.update_user(session, admin, "maria.keller", now=state.now(), unlock=True)
    assert not isinstance(_sign_in(state, "maria.keller", GOOD), users.SignInRefused)
    for _ in range(users.MAX_FAILED_LOGINS - 1):
        _sign_in(state, "maria.keller", "wrong-password-here")
    assert not isinstance(_sign_in(state, "maria.keller", GOOD), users.SignInRefused)  # 4, then reset


def test_sessions_end_when_idle_and_after_their_lifetime(
    state: ServerState, admin: Principal, clock: ManualClock
) -> None:
    _user(state, admin)
    outcome = _sign_in(state, "maria.keller", GOOD)
    assert not isinstance(outcome, users.SignInRefused)
    secret = outcome[0]

    def alive() -> bool:  # a request: the session is looked up, and its activity recorded
        with state.db.write() as session:
            signed_in = users.resolve_session(session, secret, state.now())
            if signed_in is not None:
                users.touch_session(session, signed_in, state.now())
            return signed_in is not None

    for _ in range(int(users.SESSION_LIFETIME / timedelta(minutes=20))):
        clock.advance(timedelta(minutes=20))  # busy: never idle for 30 minutes
        assert alive()
    clock.advance(timedelta(minutes=20))
    assert not alive()  # past 12 hours in all
    outcome = _sign_in(state, "maria.keller", GOOD)
    assert not isinstance(outcome, users.SignInRefused)
    secret = outcome[0]
    clock.advance(users.IDLE_TIMEOUT + timedelta(seconds=1))
    assert not alive()


def test_disabling_or_a_new_password_ends_sessions(state: ServerState, admin: Principal) -> None:
    _user(state, admin)
    first = _sign_in(state, "maria.keller", GOOD)
    assert not isinstance(first, users.SignInRefused)
    with state.db.write() as session:
        users.update_user(session, admin, "maria.keller", now=state.now(), disabled=True)
        assert users.resolve_session(session, first[0], state.now()) is None
    assert _sign_in(state, "maria.keller", GOOD) == users.SignInRefused("this account is disabled")
    with state.db.write() as session:
        users.update_user(session, admin, "maria.keller", now=state.now(), disabled=False)
    second = _sign_in(state, "maria.keller", GOOD)
    assert not isinstance(second, users.SignInRefused)
    with state.db.write() as session:
        users.update_user(session, admin, "maria.keller", now=state.now(), password="plum-violet-harbor-92")
        assert users.resolve_session(session, second[0], state.now()) is None
        with pytest.raises(Invalid, match="too weak"):
            users.update_user(session, admin, "maria.keller", now=state.now(), password="password1234")
    assert isinstance(_sign_in(state, "maria.keller", GOOD), users.SignInRefused)
    assert not isinstance(_sign_in(state, "maria.keller", "plum-violet-harbor-92"), users.SignInRefused)


def test_changing_ones_own_password_keeps_this_session_only(state: ServerState, admin: Principal) -> None:
    _user(state, admin)
    here = _sign_in(state, "maria.keller", GOOD)
    there = _sign_in(state, "maria.keller", GOOD)
    assert not isinstance(here, users.SignInRefused) and not isinstance(there, users.SignInRefused)
    with state.db.write() as session:
        refused = users.change_own_password(session, here[1], "wrong", "plum-violet-harbor-92", state.now())
    assert refused is not None and refused.reason.startswith("current password: wrong")
    with state.db.write() as session, pytest.raises(Invalid, match="too weak"):
        users.change_own_password(session, here[1], GOOD, "password1234", state.now())
    with state.db.write() as session:
        users.change_own_password(session, here[1], GOOD, "plum-violet-harbor-92", state.now())
    with state.db.write() as session:
        assert users.resolve_session(session, here[0], state.now()) is not None
        assert users.resolve_session(session, there[0], state.now()) is None
        assert session.execute(select(func.count()).select_from(PortalSession)).scalar_one() == 1


def test_a_customer_user_is_scoped_to_its_customer(state: ServerState, admin: Principal) -> None:
    setup_license(state, admin, state.now())
    with state.db.read() as session:
        customer_id = session.execute(select(Customer.id)).scalar_one()
    with state.db.write() as session:
        users.create_user(
            session,
            admin,
            username="buyer",
            password=GOOD,
            role=Role.CUSTOMER,
            now=state.now(),
            customer_id=customer_id,
        )
    outcome = _sign_in(state, "buyer", GOOD)
    assert not isinstance(outcome, users.SignInRefused)
    assert outcome[1].principal.customer_id == customer_id and outcome[1].principal.role is Role.CUSTOMER


def _two_factor(
    state: ServerState, admin: Principal, clock: ManualClock
) -> tuple[users.SignedIn, pyotp.TOTP]:
    """maria.keller with two-step sign-in on (set up as the portal does it)."""
    _user(state, admin)
    outcome = _sign_in(state, "maria.keller", GOOD)
    assert not isinstance(outcome, users.SignInRefused)
    offer = users.offer_totp(outcome[1], state.pepper)
    totp = pyotp.TOTP(offer.secret)
    with state.db.write() as session, pytest.raises(Invalid, match="expired"):
        users.enable_totp(
            session, outcome[1], offer.secret, "0" * 64, totp.at(state.now()), state.now(), state.pepper
        )
    with state.db.write() as session, pytest.raises(Invalid, match="wrong code"):
        users.enable_totp(session, outcome[1], offer.secret, offer.proof, "000000", state.now(), state.pepper)
    with state.db.write() as session:
        users.enable_totp(
            session, outcome[1], offer.secret, offer.proof, totp.at(state.now()), state.now(), state.pepper
        )
    clock.advance(timedelta(seconds=30))
    return outcome[1], totp


def test_two_step_sign_in_needs_a_fresh_code(
    state: ServerState, admin: Principal, clock: ManualClock
) -> None:
    _, totp = _two_factor(state, admin, clock)
    with state.db.read() as session:
        stored = session.execute(select(PortalUser.totp_secret)).scalar_one()
    assert stored is not None and totp.secret not in stored  # sealed at rest

    def attempt(code: str) -> tuple[str, users.SignedIn] | users.SignInRefused:
        with state.db.write() as session:
            return users.sign_in(session, "maria.keller", GOOD, state.now(), code=code, pepper=state.pepper)

    assert attempt("") == users.SignInRefused("enter the 6-digit code from your authenticator app")
    assert attempt("123") == users.SignInRefused("wrong code from the authenticator app")
    code = totp.at(state.now())
    signed = attempt(code)
    assert not isinstance(signed, users.SignInRefused) and signed[1].two_factor
    assert attempt(code) == users.SignInRefused("this code was used already: wait for the next one")
    clock.advance(timedelta(seconds=30))
    assert not isinstance(attempt(totp.at(state.now())), users.SignInRefused)
    # Wrong codes count towards the lockout like wrong passwords.
    for _ in range(users.MAX_FAILED_LOGINS):
        attempt("000000")
    locked = attempt(totp.at(state.now() + timedelta(seconds=30)))
    assert locked == users.SignInRefused(users.WRONG_SIGN_IN)
    # A code from the wrong password's attempt never gets checked: same answer as always.
    with state.db.write() as session:
        users.update_user(session, admin, "maria.keller", now=state.now(), unlock=True)
        wrong = users.sign_in(
            session, "maria.keller", "not-it", state.now(), code="000000", pepper=state.pepper
        )
    assert wrong == users.SignInRefused(users.WRONG_SIGN_IN)


def test_two_step_sign_in_is_turned_off_with_a_code_or_by_an_admin(
    state: ServerState, admin: Principal, clock: ManualClock
) -> None:
    signed_in, totp = _two_factor(state, admin, clock)
    with state.db.write() as session:
        refused = users.disable_totp(session, signed_in, "000000", state.now(), state.pepper)
    assert refused is not None and refused.reason.startswith("code: wrong or used code")
    with state.db.write() as session:
        users.disable_totp(session, signed_in, totp.at(state.now()), state.now(), state.pepper)
    with state.db.write() as session:
        assert users.sign_in(session, "maria.keller", GOOD, state.now(), pepper=state.pepper)
    with state.db.write() as session:
        offer = users.offer_totp(signed_in, state.pepper)
        users.enable_totp(
            session,
            signed_in,
            offer.secret,
            offer.proof,
            pyotp.TOTP(offer.secret).at(state.now()),
            state.now(),
            state.pepper,
        )
    with state.db.write() as session:
        user = users.update_user(session, admin, "maria.keller", now=state.now(), reset_two_factor=True)
        assert users.user_view(user, state.now())["two_factor"] is False
        outcome = users.sign_in(session, "maria.keller", GOOD, state.now(), pepper=state.pepper)
    assert not isinstance(outcome, users.SignInRefused)
    with state.db.read() as session:
        actions = (
            session.execute(select(AuditEntry.action).where(AuditEntry.action.like("user.%"))).scalars().all()
        )
    assert actions.count("user.two-factor") == 3 and "user.update" in actions


def test_replacing_the_two_step_secret_needs_a_current_code_of_the_old_one(
    state: ServerState, admin: Principal, clock: ManualClock
) -> None:
    """QA: a session alone (a browser left open) swapped the authenticator for one of its
    own, past the rule that turning two-step sign-in off needs a current code."""
    signed_in, old = _two_factor(state, admin, clock)
    offer = users.offer_totp(signed_in, state.pepper)
    new = pyotp.TOTP(offer.secret)

    def replace(current: str) -> users.SignInRefused | None:
        with state.db.write() as session:
            return users.enable_totp(
                session, signed_in, offer.secret, offer.proof, new.at(state.now()), state.now(),
                state.pepper, current_code=current,
            )  # fmt: skip

    def failed() -> int:
        with state.db.read() as session:
            return session.execute(select(PortalUser.failed_logins)).scalar_one()

    missing = replace("")
    assert missing is not None and missing.reason.startswith("current code: enter")
    assert failed() == 0  # a missing code is asked for, as at sign-in
    good = old.at(state.now())
    wrong = replace("000000" if good != "000000" else "111111")
    assert wrong is not None and wrong.reason.startswith("current code: wrong or used code")
    assert failed() == 1  # counts towards the lockout
    with state.db.write() as session, pytest.raises(Invalid, match="wrong code"):
        users.enable_totp(
            session, signed_in, offer.secret, offer.proof, "000000", state.now(), state.pepper,
            current_code=good,
        )  # fmt: skip
    assert replace(good) is None
    clock.advance(timedelta(seconds=30))

    def attempt(code: str) -> tuple[str, users.SignedIn] | users.SignInRefused:
        with state.db.write() as session:
            return users.sign_in(session, "maria.keller", GOOD, state.now(), code=code, pepper=state.pepper)

    assert attempt(old.at(state.now())) == users.SignInRefused("wrong code from the authenticator app")
    assert not isinstance(attempt(new.at(state.now())), users.SignInRefused)
    with state.db.read() as session:
        details = (
            session.execute(
                select(AuditEntry.details)
                .where(AuditEntry.action == "user.two-factor")
                .order_by(AuditEntry.id)
            )
            .scalars()
            .all()
        )
    assert len(details) == 2 and "replaced" in str(details[-1])


def test_every_refused_sign_in_costs_one_argon2_hash(
    state: ServerState, admin: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A locked account is checked against its hash too: the time of the answer does not
    tell a locked (so existing) account from an unknown name."""
    _user(state, admin)
    for _ in range(users.MAX_FAILED_LOGINS):
        _sign_in(state, "maria.keller", "wrong-password-here")
    calls: list[str] = []
    real = users._verify

    def counting(encoded: str, password: str) -> bool:
        calls.append(password)
        return real(encoded, password)

    monkeypatch.setattr(users, "_verify", counting)
    for name, password in [("nobody", GOOD), ("maria.keller", "wrong"), ("maria.keller", GOOD)]:
        calls.clear()
        assert _sign_in(state, name, password) == users.SignInRefused(users.WRONG_SIGN_IN)
        assert calls == [password], name
