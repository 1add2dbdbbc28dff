"""Orders: made by their first license, one customer each, listed, cancelled (revoking their
licenses), scoped by role, and backfilled from the order references licenses carried."""

from __future__ import annotations

import json
from typing import Any

import httpx
from alembic import command
from sqlalchemy import select

from tessera.server.app import ServerState
from tessera.server.migrate import alembic_config, upgrade
from tessera.server.models import AuditEntry, Order, WebhookDelivery
from tessera.server.tokens import Role, create_token

from .conftest import START, serve


def _setup(client: httpx.Client) -> dict[str, int]:
    assert (
        client.post(
            "/api/v1/products", json={"code": "cortex", "name": "Cortex", "features": [{"code": "uniplex"}]}
        ).status_code
        == 201
    )
    return {
        name: client.post("/api/v1/customers", json={"name": name}).json()["id"] for name in ("alpha", "beta")
    }


def _issue(client: httpx.Client, customer: int, order: str | None, **extra: Any) -> httpx.Response:
    body: dict[str, Any] = {
        "customer_id": customer,
        "product": "cortex",
        "entitlements": [{"feature": "uniplex", "count": 2}],
        **extra,
    }
    if order is not None:
        body["order"] = order
    return client.post("/api/v1/licenses", json=body)


def _token(state: ServerState, role: Role, **scope: int) -> str:
    with state.db.write() as session:
        return create_token(session, name=role.value, role=role, now=START, **scope)[1]


def test_an_order_collects_its_licenses_and_cancels_them(state: ServerState, admin_token: str) -> None:
    with serve(state) as live, live.client(admin_token) as client:
        customers = _setup(client)
        first = _issue(client, customers["alpha"], "PO-4711").json()
        second = _issue(client, customers["alpha"], "PO-4711").json()
        _issue(client, customers["alpha"], None)
        bulk = client.post(
            "/api/v1/licenses/bulk",
            json={"customer_id": customers["beta"], "product": "cortex", "count": 3, "order": "PO-4712",
                  "entitlements": [{"feature": "uniplex", "count": 1}]},
        )  # fmt: skip
        assert bulk.status_code == 201, bulk.text
        wrong = _issue(client, customers["beta"], "PO-4711")
        assert wrong.status_code == 422
        assert (
            wrong.json()["detail"]
            == f"order: PO-4711 is an order of customer {customers['alpha']}, not of {customers['beta']}"
        )

        order = client.get("/api/v1/orders/PO-4711").json()
        assert order["customer_id"] == customers["alpha"] and order["status"] == "open"
        assert [lic["serial"] for lic in order["licenses"]] == [first["serial"], second["serial"]]
        listed = {o["number"]: o["licenses"] for o in client.get("/api/v1/orders").json()}
        assert listed == {"PO-4711": 2, "PO-4712": 3}
        only_beta = client.get("/api/v1/orders", params={"customer_id": customers["beta"]}).json()
        assert [o["number"] for o in only_beta] == ["PO-4712"]
        assert client.get("/api/v1/orders/PO-9999").status_code == 404

        hook = client.post(
            "/api/v1/webhooks", json={"url": "https://erp.example/hooks", "events": ["order.cancelled"]}
        )
        assert hook.status_code == 201, hook.text
        cancelled = client.post("/api/v1/orders/PO-4711/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        assert {lic["status"] for lic in cancelled.json()["licenses"]} == {"revoked"}
        revoked = client.get(f"/api/v1/licenses/{first['serial']}").json()
        assert revoked["status"] == "revoked" and revoked["revision"] == 2  # a central change
        assert cancelled.json()["cancelled_now"] is True
        twice = client.post("/api/v1/orders/PO-4711/cancel")  # no error, no change
        assert twice.status_code == 200 and twice.json()["cancelled_now"] is False, twice.text
        assert twice.json()["cancelled_at"] == cancelled.json()["cancelled_at"]
        assert client.get(f"/api/v1/licenses/{first['serial']}").json()["revision"] == 2
        again = _issue(client, customers["alpha"], "PO-4711")
        assert again.status_code == 422 and "cancelled" in again.json()["detail"]
        assert client.get("/api/v1/orders/PO-4712").json()["status"] == "open"
    with state.db.read() as session:
        actions = (
            session.execute(select(AuditEntry.action).where(AuditEntry.target.like("order:%")))
            .scalars()
            .all()
        )
        events = session.execute(select(WebhookDelivery.event, WebhookDelivery.payload)).all()
    assert actions == ["order.create", "order.create", "order.cancel"]
    assert [event for event, _ in events] == ["order.cancelled"]
    assert json.loads(events[0][1])["data"]["revoked"] == [first["serial"], second["serial"]]


def test_orders_are_scoped_by_role(state: ServerState, admin_token: str) -> None:
    with serve(state) as live, live.client(admin_token) as client:
        customers = _setup(client)
        _issue(client, customers["alpha"], "PO-1")
        _issue(client, customers["beta"], "PO-2")
        alpha = live.client(_token(state, Role.CUSTOMER, customer_id=customers["alpha"]))
        assert [o["number"] for o in alpha.get("/api/v1/orders").json()] == ["PO-1"]
        assert alpha.get("/api/v1/orders/PO-1").status_code == 200
        assert alpha.get("/api/v1/orders/PO-2").json() == {"detail": "order 'PO-2' not found"}
        assert alpha.post("/api/v1/orders/PO-1/cancel").status_code == 403
        readonly = live.client(_token(state, Role.READONLY))
        assert len(readonly.get("/api/v1/orders").json()) == 2
        assert readonly.post("/api/v1/orders/PO-2/cancel").status_code == 403
        assert live.client().get("/api/v1/orders").status_code == 401


def test_existing_order_references_become_orders(state: ServerState, admin_token: str) -> None:
    with serve(state) as live, live.client(admin_token) as client:
        customers = _setup(client)
        _issue(client, customers["beta"], "PO-7")
        _issue(client, customers["beta"], "PO-7")
        _issue(client, customers["alpha"], "PO-8")
    config = alembic_config()
    with state.db.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0008")  # orders were only texts on licenses then
    upgrade(state.db)
    with state.db.read() as session:
        made = {o.number: o.customer_id for o in session.execute(select(Order)).scalars()}
    assert made == {"PO-7": customers["beta"], "PO-8": customers["alpha"]}


def test_order_numbers_are_one_url_segment(state: ServerState, admin_token: str) -> None:
    """A "/" made orders that could not be shown or cancelled: refused at issue (naming the
    real limit); orders made before that stay readable and cancellable."""
    with serve(state) as live, live.client(admin_token) as client:
        customers = _setup(client)
        for number in ("PO/2026/7", "PO?1", "PO#1", " PO-1", "PO\t1", "PO%2F1"):
            answer = _issue(client, customers["alpha"], number)
            assert answer.status_code == 422, (number, answer.text)
            (error,) = answer.json()["detail"]
            assert error["loc"] == ["body", "order"] and "1-100 characters" in error["msg"]
        too_long = _issue(client, customers["alpha"], "P" * 101)
        assert too_long.status_code == 422 and "100 characters" in too_long.text
        assert _issue(client, customers["alpha"], "PO 2026.07:1+a_b-c").status_code == 201
        assert client.get("/api/v1/orders").json()[0]["number"] == "PO 2026.07:1+a_b-c"
        with state.db.write() as session:  # as issue accepted it before
            session.add(
                Order(number="PO/2026/7", customer_id=customers["alpha"], created_at=START, status="open")
            )
        for url in ("/api/v1/orders/PO%2F2026%2F7", "/api/v1/orders/PO/2026/7"):
            shown = client.get(url)
            assert shown.status_code == 200 and shown.json()["number"] == "PO/2026/7", shown.text
        cancelled = client.post("/api/v1/orders/PO%2F2026%2F7/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


def test_an_encoded_slash_does_not_reach_another_route(state: ServerState, admin_token: str) -> None:
    with serve(state) as live, live.client(admin_token) as client:
        customers = _setup(client)
        serial = _issue(client, customers["alpha"], None).json()["serial"]
        assert client.get(f"/api/v1/licenses/{serial}/revisions").status_code == 200
        for url in (f"/api/v1/licenses/{serial}%2Frevisions", f"/api/v1/licenses/{serial}%2frevisions"):
            answer = client.get(url)
            assert answer.status_code == 404 and answer.json() == {"detail": "no such endpoint"}


def test_a_license_of_a_cancelled_order_stays_revoked(state: ServerState, admin_token: str) -> None:
    """Cancelling revoked it; reactivating it would hand out what the vendor took back: 409,
    naming the order. Its other terms may still change, and other revoked licenses may
    be reactivated."""
    with serve(state) as live, live.client(admin_token) as client:
        customers = _setup(client)
        serial = _issue(client, customers["alpha"], "PO-3").json()["serial"]
        loose = _issue(client, customers["alpha"], None).json()["serial"]
        assert client.post("/api/v1/orders/PO-3/cancel").status_code == 200
        refused = client.patch(f"/api/v1/licenses/{serial}", json={"status": "active"})
        assert refused.status_code == 409, refused.text
        assert refused.json()["detail"] == (
            f"status: license {serial} belongs to order PO-3, which is cancelled; "
            "it cannot be reactivated (issue a new license)"
        )
        assert client.get(f"/api/v1/licenses/{serial}").json()["status"] == "revoked"
        assert client.patch(f"/api/v1/licenses/{serial}", json={"machines": 3}).status_code == 200
        assert client.patch(f"/api/v1/licenses/{loose}", json={"status": "revoked"}).status_code == 200
        assert client.patch(f"/api/v1/licenses/{loose}", json={"status": "active"}).status_code == 200
