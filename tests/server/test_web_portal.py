"""The web portal over HTTP(S) in process: sign-in, scope, offline activation, the guards.

The browser's view of the same pages is ``tests/cli/test_portal_browser.py``.
"""

from __future__ import annotations

import base64
import dataclasses
import re
from datetime import timedelta
from typing import Any
from urllib.parse import unquote

import pyotp
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from tessera.core.clock import ManualClock
from tessera.core.licensekey import license_key_digest
from tessera.core.model import License
from tessera.core.signing import Keyring
from tessera.core.verify import check_binding, load_signed
from tessera.server import catalog, licenses, users
from tessera.server.app import Interfaces, ServerState, create_app
from tessera.server.models import AuditEntry, LicenseRow
from tessera.server.schemas import CustomerIn, FeatureIn, PartnerIn
from tessera.server.tokens import Principal, Role
from tessera.server.web import FailedSignIns

from .helpers import agent, setup_license

PASSWORD = "tidal-orbit-cactus-lantern"
BASE = "https://portal.example"


class _HashOnce:
    """The product's password hasher, except that :data:`PASSWORD` is hashed once per worker.

    ``world`` gives three users that password in each of some 80 tests; hashing it anew
    for each (argon2id, 64 MiB, about 0.2 s of CPU) was a fifth of this file's time. The
    stored hash is still one the product's hasher made, and every sign-in verifies it at
    full cost; test_users.py tests the hashing itself."""

    made: str | None = None

    def __init__(self, real: Any) -> None:
        self._real = real

    def hash(self, password: str) -> str:
        if password != PASSWORD:
            return str(self._real.hash(password))
        if _HashOnce.made is None:
            _HashOnce.made = str(self._real.hash(PASSWORD))
        return _HashOnce.made

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.fixture
def world(state: ServerState, admin: Principal, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Two customers with a license each; portal users of several roles."""
    now = state.now()
    alice_serial, alice_key = setup_license(state, admin, now)
    bob_serial, bob_key = setup_license(state, admin, now, order="bob-order")
    with state.db.read() as session:
        alice_customer = licenses.get_license(session, alice_serial).customer_id
    with monkeypatch.context() as patched, state.db.write() as session:
        patched.setattr(users, "_hasher", _HashOnce(users._hasher))
        for name, role, customer in [
            ("alice", Role.CUSTOMER, alice_customer),
            ("staff", Role.SUPPORT, None),
            ("viewer", Role.READONLY, None),
        ]:
            users.create_user(
                session, admin, username=name, password=PASSWORD, role=role, now=now, customer_id=customer
            )
    return {
        "alice": (alice_serial, alice_key),
        "bob": (bob_serial, bob_key),
    }


def portal(state: ServerState, *, base_url: str = BASE) -> TestClient:
    app = create_app(state, Interfaces(web_portal=True))
    return TestClient(app, base_url=base_url, follow_redirects=False)


def sign_in(client: TestClient, username: str, password: str = PASSWORD, target: str = "") -> Any:
    return client.post("/portal/login", data={"username": username, "password": password, "next": target})


def csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', page)
    assert found, "no CSRF token on the page"
    return found.group(1)


def test_the_portal_is_off_unless_switched_on(state: ServerState) -> None:
    client = TestClient(create_app(state), base_url=BASE)
    response = client.get("/portal/login")
    assert response.status_code == 404 and response.json() == {"detail": "no such endpoint"}
    assert not any(
        path.startswith("/portal")
        for path in create_app(state, Interfaces(web_portal=True)).openapi()["paths"]
    )


def test_pages_need_a_session_and_say_where_to_sign_in(state: ServerState, world: dict[str, Any]) -> None:
    client = portal(state)
    response = client.get("/portal/licenses?q=x")
    assert response.status_code == 303
    assert unquote(response.headers["location"]) == "/portal/login?next=/portal/licenses?q=x"
    htmx = client.get("/portal/licenses", headers={"HX-Request": "true"})
    assert htmx.status_code == 204 and htmx.headers["HX-Redirect"].startswith("/portal/login")
    login = client.get("/portal/login")
    assert login.status_code == 200 and "<form" in login.text
    policy = login.headers["content-security-policy"]
    assert (
        "default-src 'none'" in policy
        and "script-src 'self'" in policy
        and "frame-ancestors 'none'" in policy
    )
    assert login.headers["cache-control"] == "no-store" and login.headers["x-frame-options"] == "DENY"
    script = client.get("/portal/static/htmx.min.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert client.get("/portal/static/../app.py").status_code == 404
    assert client.get("/portal/static/README.md").status_code == 404


def test_sign_in_sets_a_strict_cookie_and_goes_where_asked(state: ServerState, world: dict[str, Any]) -> None:
    client = portal(state)
    wrong = sign_in(client, "alice", "not-the-password")
    assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
    response = sign_in(client, "alice", target="/portal/licenses/" + world["alice"][0])
    assert (
        response.status_code == 303
        and response.headers["location"] == "/portal/licenses/" + world["alice"][0]
    )
    cookie = response.headers["set-cookie"]
    for flag in ("HttpOnly", "Secure", "SameSite=strict", "Path=/portal"):
        assert flag.lower() in cookie.lower(), cookie
    for evil in ("//evil.example/x", "https://evil.example/", "/portal/\\evil", "/elsewhere"):
        assert sign_in(portal(state), "alice", target=evil).headers["location"] == "/portal/licenses"


def _alert(page: str) -> str:
    found = re.search(r'role="alert">([^<]*)<', page)
    assert found, page
    return found.group(1)


def test_a_locked_account_answers_like_an_unknown_name(state: ServerState, world: dict[str, Any]) -> None:
    client = portal(state)
    for _ in range(users.MAX_FAILED_LOGINS):
        assert sign_in(client, "staff", "not-the-password").status_code == 401
    answers = [
        sign_in(client, "staff", PASSWORD),  # locked now: even the right password
        sign_in(client, "staff", "not-the-password"),
        sign_in(client, "nobody-here", PASSWORD),
    ]
    assert [a.status_code for a in answers] == [401, 401, 401]
    assert {_alert(a.text) for a in answers} == {users.WRONG_SIGN_IN.replace("'", "&#39;")}
    assert "locked for 15 minutes" in answers[0].text and "locked until" not in answers[0].text
    assert "set-cookie" not in answers[0].headers


def test_sign_in_never_leaves_the_portal_by_dot_segments(state: ServerState, world: dict[str, Any]) -> None:
    for evil in (
        "/portal/../api/v1/tokens",
        "/portal/%2e%2e/api/v1/tokens",
        "/portal/%2E%2E/%2e%2e//evil.example/x",
        "/portal/licenses/../../metrics",
        "/portal/./../api",
        "/portal/..%2f..%2fapi",
        "/portal/..",
        "/portal/licenses\t/x",
    ):
        location = sign_in(portal(state), "alice", target=evil).headers["location"]
        assert location == "/portal/licenses", (evil, location)
    serial = world["alice"][0]
    for fine, where in (
        (f"/portal/orders/../licenses/{serial}", f"/portal/licenses/{serial}"),
        ("/portal/./licenses?q=x", "/portal/licenses?q=x"),
    ):
        assert sign_in(portal(state), "alice", target=fine).headers["location"] == where
    form = portal(state).get("/portal/login", params={"next": "/portal/../api/v1/tokens"})
    assert 'value="/portal/licenses"' in form.text and "api/v1" not in form.text


def test_plain_http_gets_no_secure_flag(state: ServerState, world: dict[str, Any]) -> None:
    """Behind ``server run --no-tls`` (a TLS proxy in front) the cookie must still work."""
    client = portal(state, base_url="http://portal.example")
    response = sign_in(client, "alice")
    assert "secure" not in response.headers["set-cookie"].lower()
    out = client.post("/portal/logout", data={"csrf": csrf(client.get("/portal/licenses").text)})
    cleared = out.headers["set-cookie"].lower()
    assert "secure" not in cleared and "httponly" in cleared and "samesite=strict" in cleared


def test_a_customer_sees_only_its_own_licenses(state: ServerState, world: dict[str, Any]) -> None:
    client = portal(state)
    sign_in(client, "alice")
    page = client.get("/portal/licenses")
    assert page.status_code == 200
    assert world["alice"][0] in page.text and world["bob"][0] not in page.text
    detail = client.get(f"/portal/licenses/{world['alice'][0]}")
    assert detail.status_code == 200 and "uniplex" in detail.text and "Not activated" in detail.text
    # Another customer's license answers exactly as a missing one (serials are sequential).
    other = client.get(f"/portal/licenses/{world['bob'][0]}")
    missing = client.get("/portal/licenses/2099-999999")
    assert other.status_code == missing.status_code == 404
    assert _alert(other.text).replace(world["bob"][0], "2099-999999") == _alert(missing.text)


def test_staff_see_everything_and_search(state: ServerState, world: dict[str, Any]) -> None:
    client = portal(state)
    sign_in(client, "staff")
    page = client.get("/portal/licenses")
    assert world["alice"][0] in page.text and world["bob"][0] in page.text
    one = client.get("/portal/licenses", params={"q": world["bob"][0][-3:]})
    assert world["bob"][0] in one.text and world["alice"][0] not in one.text
    none = client.get("/portal/licenses", params={"q": "no-such-thing%_"})
    assert "No licenses match" in none.text
    assert "No licenses match" in client.get("/portal/licenses", params={"status": "revoked"}).text


def test_offline_activation_gives_a_license_file_for_that_machine(
    state: ServerState, world: dict[str, Any], keyring: Keyring
) -> None:
    client = portal(state)
    sign_in(client, "alice")
    form = client.get("/portal/activate")
    machine = agent(3)
    request = machine.activation(world["alice"][1])
    response = client.post(
        "/portal/activate",
        data={"csrf": csrf(form.text)},
        files={"request": ("request.json", request.to_json(), "application/json")},
    )
    assert response.status_code == 200, response.text
    href = re.search(
        r'href="data:application/octet-stream;base64,([A-Za-z0-9+/=]+)" download="([^"]+)"', response.text
    )
    assert href and href.group(2) == f"{world['alice'][0]}.lic"
    license_file = load_signed(base64.b64decode(href.group(1)), keyring).document
    assert isinstance(license_file, License)
    check_binding(license_file, machine.locking_id)
    detail = client.get(f"/portal/licenses/{world['alice'][0]}")
    assert "offline" in detail.text and "Not activated" not in detail.text
    with state.db.read() as session:
        actors = session.execute(select(AuditEntry.actor)).scalars().all()
    assert "customer:user/alice" in actors


def test_bad_uploads_get_one_line_and_change_nothing(state: ServerState, world: dict[str, Any]) -> None:
    client = portal(state)
    sign_in(client, "alice")
    token = csrf(client.get("/portal/activate").text)
    garbage = client.post(
        "/portal/activate",
        data={"csrf": token},
        files={"request": ("r.json", b"{not json", "application/json")},
    )
    assert garbage.status_code == 422 and "request file:" in garbage.text
    empty = client.post("/portal/activate", data={"csrf": token})
    assert empty.status_code == 422 and "choose the file" in empty.text
    tampered = agent(4).activation(world["alice"][1]).to_json().replace(b"system-0004", b"system-0005")
    bad = client.post("/portal/activate", data={"csrf": token}, files={"request": ("r.json", tampered, "x")})
    assert bad.status_code == 422 and "bad signature" in bad.text
    other = agent(5).activation(world["bob"][1]).to_json()
    refused = client.post("/portal/activate", data={"csrf": token}, files={"request": ("r.json", other, "x")})
    assert refused.status_code == 404 and _alert(refused.text) == "unknown license key"
    staff = portal(state)
    sign_in(staff, "staff")
    assert "Not activated" in staff.get(f"/portal/licenses/{world['bob'][0]}").text


def _portal_page(response: Any, status: int) -> str:
    """A refusal as the portal promises it: a page (not JSON) with one line, its headers."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("text/html"), response.headers
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    line = _alert(response.text)
    assert line and "\n" not in line and "Traceback" not in response.text
    return line


def test_every_refusal_under_the_portal_is_a_portal_page(
    state: ServerState, world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """QA: a control character in ?next= got FastAPI's JSON 422 and a 30 MB upload the body
    limit's JSON 413, both without the portal's headers (CSP, X-Frame-Options...)."""
    client = portal(state)
    line = _portal_page(client.get("/portal/login?next=%01"), 422)
    assert line == "next: must not contain a control character (U+0001)"
    assert "no such page" in _portal_page(client.get("/portal/no-such-page"), 404)
    assert "no such file" in _portal_page(client.get("/portal/static/nothing.js"), 404)
    _portal_page(client.get("/portal/logout"), 405)
    sign_in(client, "alice")
    token = csrf(client.get("/portal/activate").text)
    huge = b"x" * (5 * 1024 * 1024)
    declared = client.post("/portal/activate", data={"csrf": token}, files={"request": ("r.json", huge, "x")})
    assert "too large" in _portal_page(declared, 413)

    def chunks() -> Any:  # no Content-Length: the limit cuts the stream off while the form is read
        yield b'--b\r\nContent-Disposition: form-data; name="request"; filename="r"\r\n\r\n'
        for _ in range(5):
            yield b"x" * (1024 * 1024)

    streamed = client.post(
        "/portal/activate", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert "too large" in _portal_page(streamed, 413)
    # The API keeps its JSON.
    api = client.get("/api/v1/nothing-here")
    assert api.status_code == 404 and api.json() == {"detail": "no such endpoint"}

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(licenses, "list_licenses", broken)
    failing = TestClient(client.app, base_url=BASE, follow_redirects=False, raise_server_exceptions=False)
    failing.cookies = client.cookies
    assert "a bug" not in _portal_page(failing.get("/portal/licenses"), 500)


def test_forms_need_the_csrf_token_and_this_site(state: ServerState, world: dict[str, Any]) -> None:
    client = portal(state)
    sign_in(client, "alice")
    request = agent(6).activation(world["alice"][1]).to_json()
    files = {"request": ("r.json", request, "application/json")}
    missing = client.post("/portal/activate", files=files)
    assert missing.status_code == 403 and "expired" in missing.text
    token = csrf(client.get("/portal/activate").text)
    foreign = client.post(
        "/portal/activate", data={"csrf": token}, files=files, headers={"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403 and "another site" in foreign.text
    assert sign_in(portal(state), "alice").status_code == 303
    cross_login = portal(state).post(
        "/portal/login",
        data={"username": "alice", "password": PASSWORD},
        headers={"Origin": "https://evil.example"},
    )
    assert cross_login.status_code == 403
    same = client.post("/portal/activate", data={"csrf": token}, files=files, headers={"Origin": BASE})
    assert same.status_code == 200


def test_readonly_may_look_but_not_activate(state: ServerState, world: dict[str, Any]) -> None:
    client = portal(state)
    sign_in(client, "viewer")
    assert world["bob"][0] in client.get("/portal/licenses").text
    page = client.get("/portal/activate")
    assert page.status_code == 403 and "Offline activation</a>" not in page.text


def test_sign_out_ends_the_session(state: ServerState, world: dict[str, Any]) -> None:
    client = portal(state)
    sign_in(client, "staff")
    token = csrf(client.get("/portal/licenses").text)
    stolen = client.cookies.get("tessera_portal")
    response = client.post("/portal/logout", data={"csrf": token})
    assert response.status_code == 303 and response.headers["location"] == "/portal/login"
    cleared = response.headers["set-cookie"].lower()
    for flag in ("tessera_portal=", "max-age=0", "httponly", "secure", "samesite=strict", "path=/portal"):
        assert flag in cleared, cleared
    assert "samesite=lax" not in cleared
    thief = portal(state)
    thief.cookies.set("tessera_portal", stolen or "", domain="portal.example", path="/portal")
    assert thief.get("/portal/licenses").status_code == 303


def test_changing_the_password_in_the_portal(state: ServerState, world: dict[str, Any]) -> None:
    client = portal(state)
    sign_in(client, "staff")
    token = csrf(client.get("/portal/account").text)
    weak = client.post(
        "/portal/account",
        data={"csrf": token, "current": PASSWORD, "new": "password1234", "repeat": "password1234"},
    )
    assert weak.status_code == 422 and "too weak" in weak.text
    differ = client.post(
        "/portal/account", data={"csrf": token, "current": PASSWORD, "new": "a" * 12, "repeat": "b" * 12}
    )
    assert differ.status_code == 422 and "differ" in differ.text
    new = "plum-violet-harbor-92"
    done = client.post(
        "/portal/account", data={"csrf": token, "current": PASSWORD, "new": new, "repeat": new}
    )
    assert done.status_code == 200 and "Your password is changed" in done.text
    assert client.get("/portal/licenses").status_code == 200  # this browser stays signed in
    assert sign_in(portal(state), "staff").status_code == 401
    assert sign_in(portal(state), "staff", new).status_code == 303


def _failed_logins(state: ServerState, username: str) -> tuple[int, Any]:
    from tessera.server.models import PortalUser

    with state.db.read() as session:
        user = session.execute(select(PortalUser).where(PortalUser.username == username)).scalar_one()
        return user.failed_logins, user.locked_until


def test_wrong_current_passwords_count_towards_the_lockout(state: ServerState, world: dict[str, Any]) -> None:
    """A session (a browser left open) must not guess the password without limit."""
    client = portal(state)
    sign_in(client, "staff")
    token = csrf(client.get("/portal/account").text)
    new = "plum-violet-harbor-92"
    for attempt in range(1, users.MAX_FAILED_LOGINS):
        wrong = client.post(
            "/portal/account", data={"csrf": token, "current": f"guess-{attempt}", "new": new, "repeat": new}
        )
        assert wrong.status_code == 403 and "current password: wrong" in wrong.text
        assert f"{users.MAX_FAILED_LOGINS - attempt} more wrong" in wrong.text
        assert _failed_logins(state, "staff") == (attempt, None)
    last = client.post("/portal/account", data={"csrf": token, "current": "guess", "new": new, "repeat": new})
    assert last.status_code == 403 and "locked for 15 minutes and you are signed out" in last.text
    cleared = last.headers["set-cookie"]
    assert "tessera_portal=" in cleared and "max-age=0" in cleared.lower()
    assert _failed_logins(state, "staff")[1] is not None  # locked
    # The session is gone (also when the browser keeps sending the old cookie)...
    assert client.get("/portal/account").status_code == 303
    # ...and the right password no longer signs in until the lock ends.
    assert sign_in(portal(state), "staff").status_code == 401
    with state.db.read() as session:
        actions = session.execute(select(AuditEntry.action)).scalars().all()
    assert actions.count("user.locked") == 1 and "user.password" not in actions


def test_a_session_of_a_locked_account_cannot_guess(state: ServerState, world: dict[str, Any]) -> None:
    client = portal(state)
    sign_in(client, "staff")
    token = csrf(client.get("/portal/account").text)
    for _ in range(users.MAX_FAILED_LOGINS):  # someone else locks the account at the sign-in
        sign_in(portal(state), "staff", "not-the-password")
    new = "plum-violet-harbor-92"
    refused = client.post(
        "/portal/account", data={"csrf": token, "current": PASSWORD, "new": new, "repeat": new}
    )
    assert refused.status_code == 403 and "this account is locked until" in refused.text
    assert sign_in(portal(state), "staff", new).status_code == 401  # nothing changed


def test_wrong_codes_to_turn_two_step_off_count_towards_the_lockout(
    state: ServerState, world: dict[str, Any], clock: ManualClock
) -> None:
    client = portal(state)
    sign_in(client, "staff")
    token = csrf(client.get("/portal/account").text)
    offer = client.post("/portal/account/two-factor/start", data={"csrf": token})
    secret = re.search(r'name="secret" value="([A-Z2-7]+)"', offer.text)
    proof = re.search(r'name="proof" value="([0-9a-f]{64})"', offer.text)
    assert secret and proof
    totp = pyotp.TOTP(secret.group(1))
    fields = {"csrf": token, "secret": secret.group(1), "proof": proof.group(1), "code": totp.at(state.now())}
    assert client.post("/portal/account/two-factor/enable", data=fields).status_code == 200
    clock.advance(timedelta(seconds=90))
    good = totp.at(state.now())
    bad = "000000" if good != "000000" else "111111"
    for attempt in range(1, users.MAX_FAILED_LOGINS):
        wrong = client.post("/portal/account/two-factor/disable", data={"csrf": token, "code": bad})
        assert wrong.status_code == 403 and "code: wrong or used code" in wrong.text
        assert _failed_logins(state, "staff") == (attempt, None)
    last = client.post("/portal/account/two-factor/disable", data={"csrf": token, "code": bad})
    assert last.status_code == 403 and "you are signed out" in last.text
    assert client.get("/portal/account").status_code == 303
    with state.db.read() as session:
        assert session.execute(select(func.count()).select_from(users.PortalSession)).scalar_one() == 0
    # Still on: the right code after the lock changes nothing without a session.
    after = client.post("/portal/account/two-factor/disable", data={"csrf": token, "code": good})
    assert after.status_code == 303
    assert _failed_logins(state, "staff")[1] is not None


def test_users_over_the_admin_api(state: ServerState, admin_token: str, world: dict[str, Any]) -> None:
    client = TestClient(create_app(state), base_url=BASE, headers={"Authorization": f"Bearer {admin_token}"})
    made = client.post("/api/v1/users", json={"username": "ops", "role": "admin"})
    assert made.status_code == 201, made.text
    generated = made.json()["password"]
    assert len(generated) >= 20 and made.json()["role"] == "admin"
    weak = client.post(
        "/api/v1/users", json={"username": "weak", "role": "admin", "password": "password1234"}
    )
    assert weak.status_code == 422 and weak.json()["detail"].startswith("password: too weak")
    bad_name = client.post("/api/v1/users", json={"username": "Has Space", "role": "admin"})
    assert bad_name.status_code == 422 and bad_name.json()["detail"][0]["loc"] == ["body", "username"]
    assert client.post("/api/v1/users", json={"username": "ops", "role": "admin"}).status_code == 409
    listed = {u["username"]: u for u in client.get("/api/v1/users").json()}
    assert set(listed) == {"alice", "staff", "viewer", "ops"} and "password" not in str(
        listed["ops"].get("password")
    )
    reset = client.patch("/api/v1/users/ops", json={"generate_password": True, "disabled": True})
    assert reset.status_code == 200 and reset.json()["disabled"] and reset.json()["password"] != generated
    assert client.patch("/api/v1/users/nobody", json={"unlock": True}).status_code == 404
    both = client.patch("/api/v1/users/ops", json={"generate_password": True, "password": "x"})
    assert both.status_code == 422
    customer = TestClient(create_app(state), base_url=BASE)
    assert customer.get("/api/v1/users").status_code == 401


def test_a_database_outage_is_a_503_page(
    state: ServerState, world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = portal(state)
    sign_in(client, "staff")

    def down() -> Any:
        raise OperationalError("SELECT 1", None, Exception("connection refused"))

    monkeypatch.setattr(state.db, "read", down)
    monkeypatch.setattr(state.db, "write", down)
    page = client.get("/portal/licenses")
    assert page.status_code == 503 and page.headers["retry-after"] == "5"
    assert "cannot reach its database" in page.text
    assert sign_in(portal(state), "staff").status_code == 503


def test_page_views_keep_a_session_alive_until_it_idles(
    state: ServerState, world: dict[str, Any], clock: ManualClock
) -> None:
    client = portal(state)
    sign_in(client, "staff")
    for _ in range(3):  # 60 minutes in all, never 30 without a page view
        clock.advance(timedelta(minutes=20))
        assert client.get("/portal/licenses").status_code == 200
    clock.advance(users.IDLE_TIMEOUT + timedelta(seconds=1))
    assert client.get("/portal/licenses").status_code == 303


def test_staff_revoke_and_reactivate_a_license(state: ServerState, world: dict[str, Any]) -> None:
    serial = world["bob"][0]
    staff = portal(state)
    sign_in(staff, "staff")
    page = staff.get(f"/portal/licenses/{serial}")
    assert "Revoke license" in page.text
    revoked = staff.post(
        f"/portal/licenses/{serial}/status", data={"csrf": csrf(page.text), "status": "revoked"}
    )
    assert revoked.status_code == 303 and revoked.headers["location"] == f"/portal/licenses/{serial}"
    page = staff.get(f"/portal/licenses/{serial}")
    assert "revoked" in page.text and "Reactivate license" in page.text
    bad = staff.post(f"/portal/licenses/{serial}/status", data={"csrf": csrf(page.text), "status": "gone"})
    assert bad.status_code == 422
    assert (
        staff.post(
            f"/portal/licenses/{serial}/status", data={"csrf": csrf(page.text), "status": "active"}
        ).status_code
        == 303
    )
    with state.db.read() as session:
        row = licenses.get_license(session, serial)
        assert row.status == "active" and row.revision == 3  # two central changes
    for name in ("viewer", "alice"):
        other = portal(state)
        sign_in(other, name)
        token = csrf(other.get("/portal/licenses").text)
        assert "Revoke license" not in other.get(f"/portal/licenses/{world['alice'][0]}").text
        refused = other.post(
            f"/portal/licenses/{world['alice'][0]}/status", data={"csrf": token, "status": "revoked"}
        )
        assert refused.status_code == 403


def test_orders_in_the_portal(state: ServerState, world: dict[str, Any], admin: Principal) -> None:
    staff = portal(state)
    sign_in(staff, "staff")
    listed = staff.get("/portal/orders")
    assert listed.status_code == 200 and "bob-order" in listed.text
    detail = staff.get("/portal/orders/bob-order")
    assert world["bob"][0] in detail.text and "Cancel order" not in detail.text  # support may not
    refused = staff.post("/portal/orders/bob-order/cancel", data={"csrf": csrf(detail.text)})
    assert refused.status_code == 403
    alice = portal(state)
    sign_in(alice, "alice")
    assert "bob-order" not in alice.get("/portal/orders").text
    foreign, missing = alice.get("/portal/orders/bob-order"), alice.get("/portal/orders/no-order")
    assert foreign.status_code == missing.status_code == 404
    assert _alert(foreign.text).replace("bob-order", "no-order") == _alert(missing.text)
    with state.db.write() as session:
        users.create_user(
            session, admin, username="boss", password=PASSWORD, role=Role.ADMIN, now=state.now()
        )
    boss = portal(dataclasses.replace(state, two_step_roles=frozenset()))  # no set-up needed here
    sign_in(boss, "boss")
    detail = boss.get("/portal/orders/bob-order")
    assert "Cancel order" in detail.text
    done = boss.post("/portal/orders/bob-order/cancel", data={"csrf": csrf(detail.text)})
    assert done.status_code == 303
    after = boss.get("/portal/orders/bob-order")
    assert "cancelled" in after.text and "Cancel order" not in after.text
    assert boss.get(f"/portal/licenses/{world['bob'][0]}").text.count("revoked") >= 1


def test_two_step_sign_in_through_the_pages(
    state: ServerState, world: dict[str, Any], clock: ManualClock, admin_token: str
) -> None:
    client = portal(state)
    sign_in(client, "staff")
    account = client.get("/portal/account")
    assert "Set up two-step sign-in" in account.text
    offer = client.post("/portal/account/two-factor/start", data={"csrf": csrf(account.text)})
    assert offer.status_code == 200
    secret = re.search(r'name="secret" value="([A-Z2-7]+)"', offer.text)
    proof = re.search(r'name="proof" value="([0-9a-f]{64})"', offer.text)
    assert secret and proof and "otpauth://totp/Tessera:staff?secret=" in offer.text
    assert '<div class="qr" role="img"' in offer.text and "<svg" in offer.text  # for the camera
    totp = pyotp.TOTP(secret.group(1))
    fields = {"csrf": csrf(offer.text), "secret": secret.group(1), "proof": proof.group(1)}
    wrong = client.post("/portal/account/two-factor/enable", data={**fields, "code": "000000"})
    assert wrong.status_code == 422 and "wrong code" in wrong.text and secret.group(1) in wrong.text
    done = client.post("/portal/account/two-factor/enable", data={**fields, "code": totp.at(state.now())})
    assert done.status_code == 200 and "Two-step sign-in is on" in done.text
    clock.advance(timedelta(seconds=30))

    fresh = portal(state)
    needs = sign_in(fresh, "staff")
    assert needs.status_code == 401 and "enter the 6-digit code" in needs.text
    ok = fresh.post(
        "/portal/login", data={"username": "staff", "password": PASSWORD, "code": totp.at(state.now())}
    )
    assert ok.status_code == 303
    api = TestClient(create_app(state), base_url=BASE, headers={"Authorization": f"Bearer {admin_token}"})
    assert {u["username"]: u["two_factor"] for u in api.get("/api/v1/users").json()}["staff"] is True
    reset = api.patch("/api/v1/users/staff", json={"reset_two_factor": True})
    assert reset.status_code == 200 and reset.json()["two_factor"] is False
    assert sign_in(portal(state), "staff").status_code == 303


def test_an_admin_sets_up_two_step_sign_in_before_anything_else(
    state: ServerState, world: dict[str, Any], admin: Principal, clock: ManualClock
) -> None:
    """``[web_portal] two_step_roles``: admin by default."""
    with state.db.write() as session:
        users.create_user(
            session, admin, username="boss", password=PASSWORD, role=Role.ADMIN, now=state.now()
        )
    serial = world["bob"][0]
    client = portal(state)
    signed_in = sign_in(client, "boss", target=f"/portal/licenses/{serial}")
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/portal/account#two-factor"
    for path in ("/portal/licenses", f"/portal/licenses/{serial}", "/portal/orders", "/portal/activate"):
        response = client.get(path)
        assert response.status_code == 303 and response.headers["location"] == "/portal/account#two-factor"
    htmx = client.get("/portal/licenses?q=x", headers={"HX-Request": "true"})
    assert htmx.status_code == 204 and htmx.headers["HX-Redirect"] == "/portal/account#two-factor"
    account = client.get("/portal/account")
    assert account.status_code == 200
    assert (
        "Your role (admin) requires two-step sign-in" in account.text
        and "Set up two-step sign-in" in account.text
    )
    token = csrf(account.text)
    revoke = client.post(f"/portal/licenses/{serial}/status", data={"csrf": token, "status": "revoked"})
    assert revoke.status_code == 303 and revoke.headers["location"] == "/portal/account#two-factor"
    with state.db.read() as session:
        assert licenses.get_license(session, serial).status == "active"  # nothing was done
    offer = client.post("/portal/account/two-factor/start", data={"csrf": token})
    secret = re.search(r'name="secret" value="([A-Z2-7]+)"', offer.text)
    proof = re.search(r'name="proof" value="([0-9a-f]{64})"', offer.text)
    assert secret and proof
    code = pyotp.TOTP(secret.group(1)).at(state.now())
    fields = {"csrf": token, "secret": secret.group(1), "proof": proof.group(1), "code": code}
    done = client.post("/portal/account/two-factor/enable", data=fields)
    assert done.status_code == 200 and "Two-step sign-in is on" in done.text
    assert "requires two-step sign-in" not in done.text
    assert "required for your role" in done.text and "Turn two-step sign-in off" not in done.text
    assert client.get(f"/portal/licenses/{serial}").status_code == 200  # the portal is open now
    clock.advance(timedelta(seconds=30))
    refused = client.post(
        "/portal/account/two-factor/disable",
        data={"csrf": token, "code": pyotp.TOTP(secret.group(1)).at(state.now())},
    )
    assert refused.status_code == 403 and "required for the role admin" in refused.text
    again = portal(state)
    assert sign_in(again, "boss").status_code == 401  # the code is needed now
    out = client.post("/portal/logout", data={"csrf": token})
    assert out.status_code == 303 and out.headers["location"] == "/portal/login"


def _offer(page: str) -> tuple[str, str]:
    secret = re.search(r'name="secret" value="([A-Z2-7]+)"', page)
    proof = re.search(r'name="proof" value="([0-9a-f]{64})"', page)
    assert secret and proof, page
    return secret.group(1), proof.group(1)


def test_a_session_cannot_swap_the_authenticator_without_a_current_code(
    state: ServerState, world: dict[str, Any], admin: Principal, clock: ManualClock
) -> None:
    """QA: start + enable with a code of the NEW secret replaced the old one (200), even
    for a role that requires two-step sign-in; the old authenticator was dead."""
    with state.db.write() as session:
        users.create_user(
            session, admin, username="boss", password=PASSWORD, role=Role.ADMIN, now=state.now()
        )
    client = portal(state)
    sign_in(client, "boss")
    token = csrf(client.get("/portal/account").text)
    secret, proof = _offer(client.post("/portal/account/two-factor/start", data={"csrf": token}).text)
    old = pyotp.TOTP(secret)
    fields = {"csrf": token, "secret": secret, "proof": proof, "code": old.at(state.now())}
    assert client.post("/portal/account/two-factor/enable", data=fields).status_code == 200
    clock.advance(timedelta(seconds=30))
    account = client.get("/portal/account")
    assert "Move to a new authenticator app" in account.text
    offer = client.post("/portal/account/two-factor/start", data={"csrf": token})
    assert offer.status_code == 200 and "Code from the app you use now" in offer.text
    secret, proof = _offer(offer.text)
    new = pyotp.TOTP(secret)
    fields = {"csrf": token, "secret": secret, "proof": proof, "code": new.at(state.now())}
    swapped = client.post("/portal/account/two-factor/enable", data=fields)
    assert swapped.status_code == 403 and "current code: enter" in swapped.text
    assert secret in swapped.text  # the same offer again, to finish with the current code
    good = old.at(state.now())
    bad = "000000" if good != "000000" else "111111"
    wrong = client.post("/portal/account/two-factor/enable", data={**fields, "current": bad})
    assert wrong.status_code == 403 and "current code: wrong or used code" in wrong.text
    assert _failed_logins(state, "boss") == (1, None)
    # The old authenticator still signs in; the new one does not.
    assert (
        portal(state)
        .post("/portal/login", data={"username": "boss", "password": PASSWORD, "code": new.at(state.now())})
        .status_code
        == 401
    )
    done = client.post("/portal/account/two-factor/enable", data={**fields, "current": good})
    assert done.status_code == 200 and "the new app" in done.text
    clock.advance(timedelta(seconds=30))
    for code, status in ((old.at(state.now()), 401), (new.at(state.now()), 303)):
        fields = {"username": "boss", "password": PASSWORD, "code": code}
        assert portal(state).post("/portal/login", data=fields).status_code == status


def test_roles_outside_the_rule_need_no_set_up(state: ServerState, world: dict[str, Any]) -> None:
    client = portal(state)
    assert sign_in(client, "staff").headers["location"] == "/portal/licenses"  # support: not required
    assert client.get("/portal/licenses").status_code == 200
    strict = portal(dataclasses.replace(state, two_step_roles=frozenset({"admin", "support"})))
    assert sign_in(strict, "staff").headers["location"] == "/portal/account#two-factor"
    assert strict.get("/portal/licenses").status_code == 303


def test_sales_issues_a_license_and_sees_its_key_once(
    state: ServerState, world: dict[str, Any], admin: Principal
) -> None:
    with state.db.write() as session:
        users.create_user(
            session, admin, username="seller", password=PASSWORD, role=Role.SALES, now=state.now()
        )
        customer = licenses.get_license(session, world["alice"][0]).customer_id
    client = portal(state)
    sign_in(client, "seller")
    start = client.get("/portal/licenses/new")
    assert start.status_code == 200 and 'href="/portal/licenses/new"' in start.text  # in the menu
    assert '<option value="cortex">' in start.text and 'name="count:uniplex"' not in start.text
    form = client.get("/portal/licenses/new?product=cortex")
    assert form.status_code == 200
    for field in ("count:uniplex", "expiry:backup", "emergency:reporting", "machines", "binding"):
        assert f'name="{field}"' in form.text
    assert f'<option value="{customer} myCompany, Berlin">' in form.text  # staff get suggestions
    fields = {
        "csrf": csrf(form.text),
        "product": "cortex",
        "customer": f"{customer} myCompany, Berlin",
        "count:uniplex": "7",
        "expiry:uniplex": "2027-03-31",
        "count:backup": "1",
        "emergency:backup": "on",
        "machines": "3",
        "binding": "machine",
        "failover_days": "14",
        "connect": "on",
        "order": "PO-web-1",
    }
    issued = client.post("/portal/licenses/new", data=fields)
    assert issued.status_code == 201, issued.text
    serial = re.search(r"<code>([0-9]{4}-[0-9]{6})</code>", issued.text)
    key = re.search(r'<code class="secret">([A-Z0-9-]+)</code>', issued.text)
    assert serial and key and "it is shown this once" in issued.text
    with state.db.read() as session:
        row = licenses.get_license(session, serial.group(1))
        assert row.key_digest == license_key_digest(key.group(1), state.pepper)
        view = licenses.license_view(row)
    assert view["machines_allowed"] == 3 and view["failover_days"] == 14 and view["order"] == "PO-web-1"
    assert view["features"] == {
        "uniplex": {"count": 7, "expiry": "2027-03-31"},
        "backup": {"count": 1, "expiry": "permanent"},
    }
    assert view["emergency"] == ["backup"]
    assert client.get(f"/portal/licenses/{serial.group(1)}").status_code == 200
    with state.db.read() as session:
        entry = session.scalars(select(AuditEntry).where(AuditEntry.target == serial.group(1))).first()
    assert entry is not None and entry.action == "license.issue" and "seller" in entry.actor


def test_a_partner_issues_only_to_its_own_customers_in_the_portal(
    state: ServerState, world: dict[str, Any], admin: Principal
) -> None:
    """The portal's form goes through the same rule as the API: a partner's customers are
    the ones it created (or that hold its licenses); it is offered those, not the vendor's."""
    with state.db.write() as session:
        acme = catalog.create_partner(session, admin, PartnerIn(code="acme", name="ACME"), state.now())
        catalog.add_feature(session, admin, "cortex", FeatureIn(code="partner.acme.x"))
        users.create_user(
            session, admin, username="reseller", password=PASSWORD, role=Role.PARTNER, now=state.now(),
            partner_code="acme",
        )  # fmt: skip
        vendors = licenses.get_license(session, world["alice"][0]).customer_id
        partner = Principal(-1, "reseller", Role.PARTNER, partner_id=acme.id)
        carol = catalog.create_customer(session, partner, CustomerIn(name="Carol"), state.now()).id
    client = portal(state)
    sign_in(client, "reseller")
    form = client.get("/portal/licenses/new?product=cortex")
    assert f'<option value="{carol} Carol">' in form.text and "myCompany" not in form.text
    fields = {"csrf": csrf(form.text), "product": "cortex", "count:partner.acme.x": "1", "machines": "1"}
    refused = client.post("/portal/licenses/new", data={**fields, "customer": str(vendors)})
    assert refused.status_code == 404 and f"customer {vendors} not found" in refused.text
    issued = client.post("/portal/licenses/new", data={**fields, "customer": str(carol)})
    assert issued.status_code == 201, issued.text


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"count:uniplex": "many"}, "uniplex: the count must be a whole number"),
        ({"count:uniplex": "", "count:backup": ""}, "features: give a count for at least one feature"),
        ({"expiry:uniplex": "2027-13-01"}, "uniplex (expiry): input should be a valid date"),
        ({"machines": "0"}, "machines: input should be greater than or equal to 1"),
        ({"customer": "Acme"}, "customer: choose a customer (their number)"),
        ({"customer": "999999"}, "customer 999999 not found"),
        ({"binding": "planet"}, "binding: input should be"),
        ({"order": "bob-order"}, "order: bob-order is an order of customer"),
    ],
)
def test_a_bad_new_license_form_names_the_field_and_issues_nothing(
    state: ServerState, world: dict[str, Any], admin: Principal, change: dict[str, str], words: str
) -> None:
    with state.db.write() as session:
        users.create_user(
            session, admin, username="seller", password=PASSWORD, role=Role.SALES, now=state.now()
        )
        customer = licenses.get_license(session, world["alice"][0]).customer_id
        before = session.scalar(select(func.count()).select_from(LicenseRow))
    client = portal(state)
    sign_in(client, "seller")
    form = client.get("/portal/licenses/new?product=cortex")
    fields = {"csrf": csrf(form.text), "product": "cortex", "customer": str(customer), "count:uniplex": "2"}
    fields["count:backup"] = "1"
    response = client.post("/portal/licenses/new", data={**fields, **change})
    assert 400 <= response.status_code < 500 and words in response.text, response.text
    assert 'name="count:uniplex"' in response.text  # the form comes back, filled in
    with state.db.read() as session:
        assert session.scalar(select(func.count()).select_from(LicenseRow)) == before


def test_only_issuing_roles_see_the_new_license_form(state: ServerState, world: dict[str, Any]) -> None:
    for name in ("alice", "staff", "viewer"):  # customer, support, readonly
        client = portal(state)
        sign_in(client, name)
        assert 'href="/portal/licenses/new"' not in client.get("/portal/licenses").text
        refused = client.get("/portal/licenses/new?product=cortex")
        assert refused.status_code == 403 and "needs the role admin, sales or partner" in refused.text
    client = portal(state)
    sign_in(client, "staff")
    token = csrf(client.get("/portal/account").text)
    posted = client.post(
        "/portal/licenses/new", data={"csrf": token, "product": "cortex", "count:backup": "1"}
    )
    assert posted.status_code == 403


def test_support_changes_a_licenses_terms_as_a_new_revision(
    state: ServerState, world: dict[str, Any]
) -> None:
    serial = world["alice"][0]
    client = portal(state)
    sign_in(client, "staff")
    assert f'href="/portal/licenses/{serial}/edit"' in client.get(f"/portal/licenses/{serial}").text
    form = client.get(f"/portal/licenses/{serial}/edit")
    assert form.status_code == 200
    for filled in (
        'name="count:uniplex" value="5"',
        'name="expiry:uniplex" value="2027-01-15"',
        'name="count:backup" value="1"',
        'name="count:reporting" value=""',
        'name="machines" value="1"',
    ):
        assert filled in form.text, filled
    fields = {
        "csrf": csrf(form.text),
        "revision": "1",
        "count:uniplex": "5",
        "expiry:uniplex": "2027-01-15",
        "count:backup": "1",
        "machines": "1",
        "failover_days": "30",
        "validation_hours": "24",
        "version": "*",
        "connect": "on",
    }
    same = client.post(f"/portal/licenses/{serial}/edit", data=fields)
    assert same.status_code == 200 and "Nothing was changed" in same.text
    changed = client.post(
        f"/portal/licenses/{serial}/edit",
        data={**fields, "count:uniplex": "9", "count:backup": "", "count:reporting": "2", "machines": "4",
              "emergency:reporting": "on"},
    )  # fmt: skip
    assert changed.status_code == 303 and changed.headers["location"] == f"/portal/licenses/{serial}"
    with state.db.read() as session:
        view = licenses.license_view(licenses.get_license(session, serial))
        entry = session.scalars(
            select(AuditEntry).where(AuditEntry.target == serial).order_by(AuditEntry.id.desc())
        ).first()
    assert view["revision"] == 2 and view["machines_allowed"] == 4 and view["emergency"] == ["reporting"]
    assert view["features"] == {
        "uniplex": {"count": 9, "expiry": "2027-01-15"},
        "reporting": {"count": 2, "expiry": "permanent"},
    }
    assert entry is not None and entry.action == "license.update" and "staff" in entry.actor
    stale = client.post(f"/portal/licenses/{serial}/edit", data={**fields, "machines": "7"})  # revision 1
    assert stale.status_code == 409 and "was changed meanwhile (now revision 2)" in stale.text
    bad = client.post(
        f"/portal/licenses/{serial}/edit", data={**fields, "revision": "2", "expiry:uniplex": "someday"}
    )
    assert bad.status_code == 422 and "uniplex (expiry): input should be a valid date" in bad.text
    assert 'value="someday"' in bad.text  # the form comes back as typed
    with state.db.read() as session:
        assert licenses.get_license(session, serial).revision == 2  # neither changed anything


def test_customers_and_readonly_do_not_change_terms(state: ServerState, world: dict[str, Any]) -> None:
    serial = world["alice"][0]
    for name in ("alice", "viewer"):
        client = portal(state)
        sign_in(client, name)
        assert "/edit" not in client.get(f"/portal/licenses/{serial}").text
        assert client.get(f"/portal/licenses/{serial}/edit").status_code == 403
        token = csrf(client.get("/portal/account").text)
        posted = client.post(f"/portal/licenses/{serial}/edit", data={"csrf": token, "count:uniplex": "99"})
        assert posted.status_code == 403
    with state.db.read() as session:
        assert licenses.get_license(session, serial).revision == 1


def test_a_forged_two_step_offer_is_refused(state: ServerState, world: dict[str, Any]) -> None:
    """Found by the portal fuzz: a made-up secret sent back to the enable form."""
    client = portal(state)
    sign_in(client, "staff")
    token = csrf(client.get("/portal/account").text)
    for secret in ("x", "JBSWY3DPEHPK3PXP"):
        forged = client.post(
            "/portal/account/two-factor/enable",
            data={"csrf": token, "secret": secret, "proof": "0" * 64, "code": "123456"},
        )
        assert forged.status_code == 422 and "set-up has expired" in forged.text
        assert 'name="secret"' not in forged.text and "Set up two-step sign-in" in forged.text  # not offered


def test_one_address_gets_a_few_failed_sign_ins_then_waits(
    state: ServerState, world: dict[str, Any], clock: ManualClock
) -> None:
    """Credential stuffing: one address, many names, a password or two each."""
    client = portal(state)
    for i in range(FailedSignIns.BURST):
        assert sign_in(client, f"name-{i}", "some-guess-123").status_code == 401
    refused = sign_in(client, "staff")  # even the right password waits now, unhashed
    assert refused.status_code == 429 and "too many failed sign-ins" in refused.text
    assert refused.headers["retry-after"] == "30"
    clock.advance(timedelta(seconds=FailedSignIns.SECONDS_PER_TRY))
    assert sign_in(client, "staff").status_code == 303  # one more try came back
    assert sign_in(client, "alice", "wrong-again-123").status_code == 401
    assert sign_in(client, "alice").status_code == 429


def test_every_page_has_a_plain_title(state: ServerState, world: dict[str, Any]) -> None:
    """duplicates caught the account page's sections pasted into its <title> once."""
    client = portal(state)
    assert re.search(r"<title>Sign in · Tessera license portal</title>", client.get("/portal/login").text)
    sign_in(client, "staff")
    pages = {
        "/portal/licenses": "Licenses",
        f"/portal/licenses/{world['bob'][0]}": f"License {world['bob'][0]}",
        "/portal/activate": "Offline activation",
        "/portal/account": "Account",
        "/portal/orders": "Orders",
        "/portal/orders/bob-order": "Order bob-order",
        "/portal/licenses/2099-999999": "Error 404",
    }
    for path, title in pages.items():
        text = client.get(path).text
        assert re.search(rf"<title>{re.escape(title)} · Tessera license portal</title>", text), path
        assert text.count("<title>") == 1 and text.count("<h1>") == 1, path
