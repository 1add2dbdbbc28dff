"""API tokens and roles over real HTTP: 401 without a token, 403 outside the role."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from tessera.core.licensekey import generate_license_key
from tessera.server.app import Interfaces, ServerState, create_app
from tessera.server.models import ApiToken, LicenseRow

from .conftest import LiveServer
from .helpers import agent


def _token(admin: httpx.Client, role: str, **extra: Any) -> str:
    response = admin.post("/api/v1/tokens", json={"name": f"{role}-token", "role": role, **extra})
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


@pytest.fixture
def world(live_server: LiveServer, admin_token: str) -> dict[str, Any]:
    """A product with a partner feature, two customers, a license each, a token per role."""
    admin = live_server.client(admin_token)
    assert (
        admin.post(
            "/api/v1/products",
            json={
                "code": "cortex",
                "name": "Cortex",
                "features": [{"code": "uniplex"}, {"code": "backup"}],
            },
        ).status_code
        == 201
    )
    assert admin.post("/api/v1/partners", json={"code": "acme", "name": "ACME"}).status_code == 201
    alice = admin.post("/api/v1/customers", json={"name": "Alice", "city": "Bonn"}).json()["id"]
    bob = admin.post("/api/v1/customers", json={"name": "Bob"}).json()["id"]

    def issue(client: httpx.Client, customer: int, feature: str = "uniplex") -> httpx.Response:
        return client.post(
            "/api/v1/licenses",
            json={
                "customer_id": customer,
                "product": "cortex",
                "entitlements": [{"feature": feature, "count": 1}],
            },
        )

    tokens = {role: _token(admin, role) for role in ("support", "sales", "readonly")}
    tokens["partner"] = _token(admin, "partner", partner="acme")
    tokens["customer"] = _token(admin, "customer", customer_id=alice)
    alice_license = issue(admin, alice).json()
    bob_license = issue(admin, bob).json()
    return {
        "server": live_server,
        "admin": admin,
        "tokens": tokens,
        "alice": alice,
        "bob": bob,
        "alice_license": alice_license,
        "bob_license": bob_license,
        "issue": issue,
    }


def test_no_or_bad_token_is_401(world: dict[str, Any]) -> None:
    server: LiveServer = world["server"]
    for client in (server.client(), server.client("tsk_not-a-real-token")):
        for method, path in (("GET", "/api/v1/products"), ("POST", "/api/v1/customers")):
            response = client.request(method, path, json={"name": "x"})
            assert response.status_code == 401, (method, path, response.text)
            assert "token" in response.json()["detail"]
    # The health check and the Connect endpoints need no token (agents have none).
    assert server.client().get("/api/v1/health").status_code == 200


def test_tokens_are_stored_hashed(world: dict[str, Any]) -> None:
    server: LiveServer = world["server"]
    with server.state.db.read() as session:
        hashes = set(session.execute(select(ApiToken.token_hash)).scalars())
    for token in world["tokens"].values():
        assert token not in hashes and len(token) > 40


def test_roles(world: dict[str, Any]) -> None:
    server: LiveServer = world["server"]
    tokens = world["tokens"]
    issue = world["issue"]
    serial = world["alice_license"]["serial"]
    bob_serial = world["bob_license"]["serial"]
    as_ = {role: server.client(token) for role, token in tokens.items()}

    # readonly: reads everything, changes nothing
    assert as_["readonly"].get(f"/api/v1/licenses/{serial}").status_code == 200
    assert as_["readonly"].post("/api/v1/customers", json={"name": "x"}).status_code == 403
    assert as_["readonly"].patch(f"/api/v1/licenses/{serial}", json={"status": "revoked"}).status_code == 403
    # sales: customers and licenses, not products or tokens
    assert as_["sales"].post("/api/v1/customers", json={"name": "Carol"}).status_code == 201
    assert issue(as_["sales"], world["bob"]).status_code == 201
    assert as_["sales"].post("/api/v1/products", json={"code": "x", "name": "X"}).status_code == 403
    assert as_["sales"].post("/api/v1/tokens", json={"name": "t", "role": "admin"}).status_code == 403
    # support: changes licenses, does not issue them
    assert (
        as_["support"]
        .patch(
            f"/api/v1/licenses/{serial}",
            json={"entitlements": [{"feature": "uniplex", "count": 3}]},
        )
        .status_code
        == 200
    )
    assert issue(as_["support"], world["bob"]).status_code == 403
    # customer: only its own licenses, read only
    assert as_["customer"].get(f"/api/v1/licenses/{serial}").status_code == 200
    assert as_["customer"].get(f"/api/v1/licenses/{bob_serial}").status_code == 404
    assert as_["customer"].patch(f"/api/v1/licenses/{serial}", json={"status": "revoked"}).status_code == 403
    assert issue(as_["customer"], world["alice"]).status_code == 403
    # listing: everyone sees what they may read, no more
    assert [r["serial"] for r in as_["customer"].get("/api/v1/licenses").json()] == [serial]
    everything = {r["serial"] for r in as_["readonly"].get("/api/v1/licenses").json()}
    assert {serial, bob_serial} <= everything
    only_bob = as_["readonly"].get("/api/v1/licenses", params={"customer_id": world["bob"]}).json()
    assert bob_serial in {r["serial"] for r in only_bob} and serial not in {r["serial"] for r in only_bob}
    assert as_["partner"].get("/api/v1/licenses").json() == []
    assert server.client().get("/api/v1/licenses").status_code == 401


def test_partner_stays_in_its_namespace(world: dict[str, Any]) -> None:
    server: LiveServer = world["server"]
    partner = server.client(world["tokens"]["partner"])
    issue = world["issue"]
    outside = partner.post("/api/v1/products/cortex/features", json={"code": "partner.other.x"})
    assert outside.status_code == 403 and "partner.acme." in outside.json()["detail"]
    inside = partner.post("/api/v1/products/cortex/features", json={"code": "partner.acme.reporting"})
    assert inside.status_code == 201, inside.text
    carol = partner.post("/api/v1/customers", json={"name": "Carol"}).json()["id"]
    assert issue(partner, carol, "uniplex").status_code == 403
    own = issue(partner, carol, "partner.acme.reporting")
    assert own.status_code == 201, own.text
    assert partner.get(f"/api/v1/licenses/{own.json()['serial']}").status_code == 200
    assert partner.get(f"/api/v1/licenses/{world['alice_license']['serial']}").status_code == 404


def test_offline_activation_over_the_api(world: dict[str, Any]) -> None:
    server: LiveServer = world["server"]
    request = agent(7).activation(world["alice_license"]["key"])
    customer = server.client(world["tokens"]["customer"])
    response = customer.post("/api/v1/activate-offline", content=request.to_json())
    assert response.status_code == 200, response.text
    assert response.json()["serial"] == world["alice_license"]["serial"]
    assert "[SIGNATURE]" in response.json()["license"]
    other = agent(8).activation(world["bob_license"]["key"])
    assert customer.post("/api/v1/activate-offline", content=other.to_json()).status_code == 404
    assert server.client().post("/api/v1/activate-offline", content=other.to_json()).status_code == 401


def test_optional_interfaces_can_be_switched_off(state: ServerState, admin_token: str) -> None:
    app = create_app(state, Interfaces(admin_api=False, offline_activation=False))
    paths = set(app.openapi()["paths"])
    assert paths == {
        "/api/v1/activate",
        "/api/v1/recover",
        "/api/v1/checkin",
        "/api/v1/lease",
        "/api/v1/health",
    }
    only_offline = create_app(state, Interfaces(admin_api=False, offline_activation=True))
    assert "/api/v1/activate-offline" in only_offline.openapi()["paths"]
    assert "/api/v1/licenses" not in only_offline.openapi()["paths"]


def test_partner_neither_sees_nor_uses_orders_nor_drops_vendor_features(world: dict[str, Any]) -> None:
    server: LiveServer = world["server"]
    admin: httpx.Client = world["admin"]
    partner = server.client(world["tokens"]["partner"])
    assert admin.post("/api/v1/products/cortex/features", json={"code": "partner.acme.x"}).status_code == 201
    # Vendor orders: one of Bob's, one cancelled.
    for number, customer in (("PO-B1", world["bob"]), ("PO-A1", world["alice"])):
        made = admin.post(
            "/api/v1/licenses",
            json={"customer_id": customer, "product": "cortex", "order": number,
                  "entitlements": [{"feature": "uniplex", "count": 1}]},
        )  # fmt: skip
        assert made.status_code == 201, made.text
    assert admin.post("/api/v1/orders/PO-A1/cancel").status_code == 200
    carol = partner.post("/api/v1/customers", json={"name": "Carol"}).json()["id"]
    for number in ("PO-B1", "PO-A1", "PO-NEW"):
        answer = partner.post(
            "/api/v1/licenses",
            json={"customer_id": carol, "product": "cortex", "order": number,
                  "entitlements": [{"feature": "partner.acme.x", "count": 1}]},
        )  # fmt: skip
        assert answer.status_code == 403, answer.text
        detail = answer.json()["detail"]
        assert detail.startswith("order:") and "customer" not in detail and "cancelled" not in detail
    assert [x["serial"] for x in admin.get("/api/v1/orders/PO-B1").json()["licenses"]] != []
    assert len(admin.get("/api/v1/orders/PO-B1").json()["licenses"]) == 1
    assert admin.get("/api/v1/orders/PO-NEW").status_code == 404
    # The partner's license, to which the vendor added a feature of its own.
    own = partner.post(
        "/api/v1/licenses",
        json={"customer_id": carol, "product": "cortex",
              "entitlements": [{"feature": "partner.acme.x", "count": 1}]},
    )  # fmt: skip
    serial = own.json()["serial"]
    changed = admin.patch(
        f"/api/v1/licenses/{serial}",
        json={
            "entitlements": [{"feature": "uniplex", "count": 2}],
            "emergency": ["uniplex", "partner.acme.x"],
        },
    )
    assert changed.status_code == 200, changed.text
    revision = changed.json()["revision"]
    for body, field in (
        ({"remove": ["uniplex"]}, "remove[0]"),
        ({"emergency": []}, "emergency"),
        ({"emergency": ["partner.acme.x"]}, "emergency"),
    ):
        answer = partner.patch(f"/api/v1/licenses/{serial}", json=body)
        assert answer.status_code == 403, (body, answer.text)
        assert answer.json()["detail"].startswith(field)
    assert partner.get(f"/api/v1/licenses/{serial}").json()["revision"] == revision
    # Within its namespace it still changes what it likes, keeping the vendor's emergency feature.
    ok = partner.patch(f"/api/v1/licenses/{serial}", json={"emergency": ["uniplex"]})
    assert ok.status_code == 200, ok.text
    assert ok.json()["emergency"] == ["uniplex"]


def test_an_offline_request_with_a_short_agent_key_is_422_naming_it(world: dict[str, Any]) -> None:
    server: LiveServer = world["server"]
    body = json.loads(agent(7).activation(world["alice_license"]["key"]).to_json())
    body["agent_key"] = "AAAA"
    response = world["admin"].post("/api/v1/activate-offline", content=json.dumps(body))
    assert response.status_code == 422 and "agent_key" in response.json()["detail"], response.text
    assert server.client().get("/api/v1/health").status_code == 200


def test_other_customers_objects_answer_exactly_like_missing_ones(world: dict[str, Any]) -> None:
    """QA: 403 "belongs to another customer" for an existing object and 404 for a missing one
    told a customer (or partner) which serials, orders, customers and keys exist (serials
    and customer ids are sequential)."""
    server: LiveServer = world["server"]
    admin: httpx.Client = world["admin"]
    bob_serial = world["bob_license"]["serial"]
    made = admin.post(
        "/api/v1/licenses",
        json={"customer_id": world["bob"], "product": "cortex", "order": "PO-2",
              "entitlements": [{"feature": "uniplex", "count": 1}]},
    )  # fmt: skip
    assert made.status_code == 201, made.text
    missing_serial = "2099-999999"

    def same(client: httpx.Client, path: str, missing_path: str, found: str, missing: str) -> None:
        there, absent = client.get(path), client.get(missing_path)
        assert there.status_code == absent.status_code == 404, (path, there.text, absent.text)
        assert there.json()["detail"].replace(found, missing) == absent.json()["detail"], (path, there.text)

    customer = server.client(world["tokens"]["customer"])
    partner = server.client(world["tokens"]["partner"])
    for client in (customer, partner):
        for suffix in ("", "/revisions", "/leases"):
            same(
                client, f"/api/v1/licenses/{bob_serial}{suffix}",
                f"/api/v1/licenses/{missing_serial}{suffix}", bob_serial, missing_serial,
            )  # fmt: skip
    same(customer, "/api/v1/orders/PO-2", "/api/v1/orders/PO-404", "PO-2", "PO-404")
    same(
        customer, f"/api/v1/customers/{world['bob']}", "/api/v1/customers/999999", str(world["bob"]), "999999"
    )
    assert customer.get(f"/api/v1/customers/{world['alice']}").status_code == 200
    # A customer may not change its own licenses: said only about its own.
    own = world["alice_license"]["serial"]
    assert customer.patch(f"/api/v1/licenses/{own}", json={"status": "revoked"}).status_code == 403
    # Offline activation with another customer's key: as an unknown key.
    for client in (customer, partner):
        answers = [
            client.post("/api/v1/activate-offline", content=agent(9).activation(key).to_json())
            for key in (world["bob_license"]["key"], generate_license_key())
        ]
        assert [(a.status_code, a.json()) for a in answers] == [(404, {"detail": "unknown license key"})] * 2


def test_a_partner_sees_and_licenses_only_its_own_customers(world: dict[str, Any]) -> None:
    """QA: a partner token read any vendor customer (ids are sequential) and issued licenses
    to it. A partner's namespace holds the customers it created and those holding one of
    its licenses; any other answers exactly as a missing one."""
    server: LiveServer = world["server"]
    admin: httpx.Client = world["admin"]
    partner = server.client(world["tokens"]["partner"])
    assert admin.post("/api/v1/products/cortex/features", json={"code": "partner.acme.x"}).status_code == 201
    assert admin.post("/api/v1/partners", json={"code": "beta", "name": "Beta"}).status_code == 201
    beta = server.client(_token(admin, "partner", partner="beta"))
    body = {"product": "cortex", "entitlements": [{"feature": "partner.acme.x", "count": 1}]}
    alice = world["alice"]
    missing = 999_999
    for client in (partner, beta):
        there, absent = client.get(f"/api/v1/customers/{alice}"), client.get(f"/api/v1/customers/{missing}")
        assert (there.status_code, absent.status_code) == (404, 404)
        assert there.json()["detail"].replace(str(alice), str(missing)) == absent.json()["detail"]
    before = admin.get("/api/v1/licenses").json()
    for path, extra in (("/api/v1/licenses", {}), ("/api/v1/licenses/bulk", {"count": 2})):
        refused = partner.post(path, json={**body, **extra, "customer_id": alice})
        assert refused.status_code == 404 and refused.json()["detail"] == f"customer {alice} not found", path
    assert admin.get("/api/v1/licenses").json() == before  # nothing issued
    # Its own customer: read and licensed; not the other partner's.
    carol = partner.post("/api/v1/customers", json={"name": "Carol", "city": "Graz"})
    assert carol.status_code == 201, carol.text
    carol_id = carol.json()["id"]
    assert partner.get(f"/api/v1/customers/{carol_id}").json()["licensee"] == "Carol, Graz"
    assert partner.post("/api/v1/licenses", json={**body, "customer_id": carol_id}).status_code == 201
    assert beta.get(f"/api/v1/customers/{carol_id}").status_code == 404
    assert admin.get(f"/api/v1/customers/{carol_id}").status_code == 200  # the vendor sees every one
    # A vendor customer that holds one of the partner's licenses (issued before this rule)
    # stays the partner's: it sees that customer on the license anyway.
    with server.state.db.write() as session:
        row = session.execute(
            select(LicenseRow).where(LicenseRow.serial == world["alice_license"]["serial"])
        ).scalar_one()
        row.partner_id = (
            session.execute(select(ApiToken.partner_id).where(ApiToken.role == "partner")).scalars().first()
        )
    assert partner.get(f"/api/v1/customers/{alice}").status_code == 200
    assert partner.post("/api/v1/licenses", json={**body, "customer_id": alice}).status_code == 201
    assert beta.get(f"/api/v1/customers/{alice}").status_code == 404
