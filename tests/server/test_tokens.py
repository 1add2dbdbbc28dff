"""Listing and revoking API tokens over real HTTP (SQLite and PostgreSQL): no secret or
hash is ever shown, a revoked token stops at once, the last admin token stays."""

from __future__ import annotations

import importlib
import json
import secrets
from typing import Any

import httpx
from sqlalchemy import select

from tessera.core.clock import ManualClock
from tessera.core.signing import SigningKey
from tessera.server import audit
from tessera.server.app import ServerState
from tessera.server.migrate import upgrade
from tessera.server.models import ApiToken, AuditEntry
from tessera.server.storage import Database
from tessera.server.tokens import MAX_TOKEN_NAME, Role, create_token, resolve_token

from .conftest import START, LiveServer
from .helpers import setup_license


def _make(admin: httpx.Client, **body: Any) -> dict[str, Any]:
    response = admin.post("/api/v1/tokens", json=body)
    assert response.status_code == 201, response.text
    made: dict[str, Any] = response.json()
    return made


def _audit(admin: httpx.Client, action: str) -> list[dict[str, Any]]:
    entries = admin.get("/api/v1/audit").json()
    return [e for e in entries if e["action"] == action]


def test_list_shows_every_token_without_secrets(live_server: LiveServer, admin_token: str) -> None:
    admin = live_server.client(admin_token)
    assert admin.post("/api/v1/partners", json={"code": "acme", "name": "ACME"}).status_code == 201
    made = _make(admin, name="reseller", role="partner", partner="acme")
    listed = admin.get("/api/v1/tokens")
    assert listed.status_code == 200, listed.text
    rows = {t["name"]: t for t in listed.json()}
    assert set(rows) == {"http-admin", "reseller"}
    assert rows["reseller"] == {
        "id": made["id"],
        "name": "reseller",
        "role": "partner",
        "partner": "acme",
        "customer_id": None,
        "created_at": rows["reseller"]["created_at"],
        "revoked": False,
    }
    assert made["token"] not in listed.text and admin_token not in listed.text
    assert "hash" not in listed.text
    readonly = live_server.client(_make(admin, name="auditor", role="readonly")["token"])
    assert readonly.get("/api/v1/tokens").status_code == 403


def test_revoke_stops_the_token_at_once_and_is_audited(live_server: LiveServer, admin_token: str) -> None:
    admin = live_server.client(admin_token)
    made = _make(admin, name="ci", role="sales")
    sales = live_server.client(made["token"])
    assert sales.post("/api/v1/customers", json={"name": "Alice"}).status_code == 201
    revoked = admin.delete(f"/api/v1/tokens/{made['id']}")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked"] is True and revoked.json()["own"] is False
    assert sales.get("/api/v1/products").status_code == 401
    assert {t["id"]: t["revoked"] for t in admin.get("/api/v1/tokens").json()}[made["id"]] is True
    entries = _audit(admin, "token.revoke")
    assert len(entries) == 1 and entries[0]["target"] == f"token:{made['id']}"
    assert entries[0]["actor"] == "admin:http-admin"
    # Again: nothing changes, nothing more in the audit log.
    assert admin.delete(f"/api/v1/tokens/{made['id']}").status_code == 200
    assert len(_audit(admin, "token.revoke")) == 1


def test_revoke_refuses_unknown_ids_other_roles_and_the_last_admin(
    live_server: LiveServer, admin_token: str
) -> None:
    admin = live_server.client(admin_token)
    before = admin.get("/api/v1/tokens").json()
    assert admin.delete("/api/v1/tokens/999999").status_code == 404
    for bad in ("0", "-1", "abc", str(2**31)):
        response = admin.delete(f"/api/v1/tokens/{bad}")
        assert response.status_code == 422, (bad, response.text)
        assert "token_id" in response.text
    support = _make(admin, name="desk", role="support")
    as_support = live_server.client(support["token"])
    assert as_support.delete(f"/api/v1/tokens/{support['id']}").status_code == 403
    own_id = next(t["id"] for t in before if t["name"] == "http-admin")
    last = admin.delete(f"/api/v1/tokens/{own_id}")
    assert last.status_code == 409 and "last active admin token" in last.json()["detail"]
    assert admin.get("/api/v1/products").status_code == 200  # still works
    assert not _audit(admin, "token.revoke")


def test_an_admin_may_revoke_its_own_token_while_another_admin_remains(
    live_server: LiveServer, admin_token: str
) -> None:
    admin = live_server.client(admin_token)
    second = _make(admin, name="second-admin", role="admin")
    own_id = next(t["id"] for t in admin.get("/api/v1/tokens").json() if t["name"] == "http-admin")
    revoked = admin.delete(f"/api/v1/tokens/{own_id}")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["own"] is True
    assert admin.get("/api/v1/products").status_code == 401
    other = live_server.client(second["token"])
    assert other.delete(f"/api/v1/tokens/{second['id']}").status_code == 409  # now the last one
    (entry,) = _audit(other, "token.revoke")
    assert entry["details"]["own"] is True


def test_a_token_name_always_fits_the_actor_column(live_server: LiveServer, admin_token: str) -> None:
    """The audit's and revisions' actor is ``role:name`` in 200 characters: a longer name
    is refused when the token is made, not by the database at each of its writes."""
    admin = live_server.client(admin_token)
    for length in (MAX_TOKEN_NAME + 1, 200):
        response = admin.post("/api/v1/tokens", json={"name": "n" * length, "role": "customer"})
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", "name"]
    assert "n" * 200 not in admin.get("/api/v1/tokens").text
    assert MAX_TOKEN_NAME + len(":readonly") == 200
    # The longest name writes, on PostgreSQL too (its VARCHAR(200) is enforced).
    product = {"code": "cortex", "name": "Cortex", "features": [{"code": "uniplex"}]}
    assert admin.post("/api/v1/products", json=product).status_code == 201
    alice = admin.post("/api/v1/customers", json={"name": "Alice"}).json()["id"]
    long_name = "é" * MAX_TOKEN_NAME
    sales = live_server.client(_make(admin, name=long_name, role="sales")["token"])
    entitlements = [{"feature": "uniplex", "count": 1}]
    issued = sales.post(
        "/api/v1/licenses", json={"customer_id": alice, "product": "cortex", "entitlements": entitlements}
    )
    assert issued.status_code == 201, issued.text
    support = live_server.client(_make(admin, name=long_name, role="support")["token"])
    serial = issued.json()["serial"]
    changed = support.patch(f"/api/v1/licenses/{serial}", json={"machines": 2})
    assert changed.status_code == 200, changed.text
    actors = {e["action"]: e["actor"] for e in admin.get("/api/v1/audit").json()}
    assert actors["license.issue"] == f"sales:{long_name}"
    assert actors["license.update"] == f"support:{long_name}"


def test_the_initial_token_name_is_reserved(live_server: LiveServer, admin_token: str) -> None:
    admin = live_server.client(admin_token)
    for name in ("initial-admin", "Initial-Admin", " initial-admin "):
        response = admin.post("/api/v1/tokens", json={"name": name, "role": "readonly"})
        assert response.status_code == 422, (name, response.text)
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", "name"]
        assert "reserved" in error["msg"] or name != name.strip()  # padding is refused anyway
    assert [t["name"] for t in admin.get("/api/v1/tokens").json()] == ["http-admin"]
    assert _make(admin, name="initial-admin-2", role="readonly")["name"] == "initial-admin-2"


def test_scope_fields_must_fit_the_role_and_are_audited(live_server: LiveServer, admin_token: str) -> None:
    admin = live_server.client(admin_token)
    assert admin.post("/api/v1/partners", json={"code": "acme", "name": "ACME"}).status_code == 201
    alice = admin.post("/api/v1/customers", json={"name": "Alice"}).json()["id"]
    refused = [
        ({"role": "admin", "customer_id": alice}, "customer_id: only a customer token"),
        ({"role": "readonly", "partner": "acme"}, "partner: only a partner token"),
        ({"role": "partner", "partner": "acme", "customer_id": alice}, "customer_id: only a customer token"),
        ({"role": "customer", "customer_id": alice, "partner": "acme"}, "partner: only a partner token"),
    ]
    for body, message in refused:
        response = admin.post("/api/v1/tokens", json={"name": "t1", **body})
        assert response.status_code == 422, (body, response.text)
        assert response.json()["detail"].startswith(message), response.text
    assert [t["name"] for t in admin.get("/api/v1/tokens").json()] == ["http-admin"]
    _make(admin, name="reseller", role="partner", partner="acme")
    _make(admin, name="alice", role="customer", customer_id=alice)
    details = {e["details"]["name"]: e["details"] for e in _audit(admin, "token.create")}
    assert details["reseller"] == {
        "name": "reseller", "role": "partner", "partner": "acme", "customer_id": None
    }  # fmt: skip
    assert details["alice"] == {"name": "alice", "role": "customer", "partner": None, "customer_id": alice}


def test_migration_0011_shortens_the_names_of_older_tokens_to_fit_the_actor(db_url: str) -> None:
    """Before names were capped, the API took 200 characters: on PostgreSQL every audited
    write by such a token failed. The migration gives it a name that fits (its first
    characters and its id), keeps tokens that shared a long prefix apart, leaves every
    other name alone and records the old name in the audit log, whose chain stays whole."""
    db = Database(db_url)
    try:
        upgrade(db, "0010")
        names = {"long": "é" * 200, "twin": "é" * 196 + "twin", "edge": "n" * MAX_TOKEN_NAME, "short": "ops"}
        with db.write() as session:
            audit.append(session, at=START, actor="admin:ops", action="x", target="x", details={})
            made = {k: create_token(session, name=n, role=Role.ADMIN, now=START) for k, n in names.items()}
        ids = {key: row.id for key, (row, _) in made.items()}
        upgrade(db)
        upgrade(db)  # a second run changes nothing

        def state_of_tokens() -> tuple[dict[str, str], list[AuditEntry]]:
            with db.read() as session:
                named = {key: session.get_one(ApiToken, ids[key]).name for key in names}
                assert audit.verify_chain(session).ok
                entries = session.execute(select(AuditEntry).order_by(AuditEntry.id)).scalars().all()
            return named, [e for e in entries if e.action == "token.rename"]

        named, renames = state_of_tokens()
        assert named["edge"] == names["edge"] and named["short"] == names["short"]
        for key in ("long", "twin"):
            suffix = f"… (token {ids[key]})"
            assert named[key] == names[key][: MAX_TOKEN_NAME - len(suffix)] + suffix
        assert named["long"] != named["twin"]
        assert [(e.actor, e.target, json.loads(e.details)) for e in renames] == [
            ("migration:0011", f"token:{ids[key]}", {"old_name": names[key], "name": named[key]})
            for key in ("long", "twin")
        ]
        # The renamed token writes, on PostgreSQL too (whose VARCHAR(200) is enforced).
        key = SigningKey.generate()
        state = ServerState(db=db, signing_key=key, pepper=secrets.token_bytes(32), clock=ManualClock(START))
        with db.read() as session:
            principal = resolve_token(session, made["long"][1])
        setup_license(state, principal, START)
        with db.read() as session:
            issued = select(AuditEntry.actor).where(AuditEntry.action == "license.issue")
            assert session.execute(issued).scalars().all() == [f"admin:{named['long']}"]
    finally:
        db.dispose()


def test_migration_0011_never_renames_a_token_to_another_tokens_name() -> None:
    migration = importlib.import_module("tessera.server.migrations.versions.0011_token_names_fit_actor")
    name = "x" * 200
    first = migration.shortened(name, 7, set())
    assert first == "x" * (MAX_TOKEN_NAME - len("… (token 7)")) + "… (token 7)"
    second = migration.shortened(name, 7, {first})
    assert second == "x" * (MAX_TOKEN_NAME - len("… (token 7)") - 1) + "… (token 7)"
    assert migration.shortened(name, 7, {first}) == second  # deterministic
