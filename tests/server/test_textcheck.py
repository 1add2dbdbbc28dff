"""Control characters in what a client sends: a 4xx naming the field on every backend.

PostgreSQL refuses a NUL in text; before the edge check, a NUL in any looked-up or stored
string was a 503 ("the database refused the request") there and a 404/422 on SQLite.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tessera.server import users
from tessera.server.app import Interfaces, ServerState, create_app
from tessera.server.tokens import Principal, Role

from .helpers import agent, setup_license

PASSWORD = "tidal-orbit-cactus-lantern"


def _sample(schema: dict[str, Any]) -> str:
    """A harmless valid-looking value for a parameter that is not the one under test."""
    return "1" if schema.get("type") == "integer" else "x1"


def test_nul_in_any_parameter_of_any_route_is_never_a_server_error(
    state: ServerState, admin: Principal, admin_token: str
) -> None:
    serial, _ = setup_license(state, admin, state.now(), order="PO-1")
    app = create_app(state)
    client = TestClient(app, headers={"Authorization": f"Bearer {admin_token}"})
    spec = client.get("/openapi.json").json()
    tried = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            params = [p for p in operation.get("parameters", []) if p["in"] in ("path", "query")]
            for param in params:
                for poison in ("%00", "a%00b", "x%01", "%0A"):
                    values = {p["name"]: _sample(p.get("schema", {})) for p in params if p["in"] == "path"}
                    if "serial" in values:
                        values["serial"] = serial
                    query = ""
                    if param["in"] == "path":
                        values[param["name"]] = poison
                    else:
                        query = f"?{param['name']}={poison}"
                    url = re.sub(r"\{(\w+)\}", lambda m, v=values: v[m.group(1)], path) + query
                    answer = client.request(method.upper(), url, json={} if method != "get" else None)
                    tried += 1
                    assert answer.status_code < 500, (method, url, answer.status_code, answer.text)
                    if param["in"] == "query" and answer.status_code == 422:
                        assert param["name"] in answer.text
    assert tried > 40


def test_a_nul_in_a_path_or_query_parameter_is_named(state: ServerState, admin_token: str) -> None:
    client = TestClient(create_app(state), headers={"Authorization": f"Bearer {admin_token}"})
    for url, field in [
        ("/api/v1/licenses/%00", "serial"),
        ("/api/v1/orders/PO%00", "number"),
        ("/api/v1/products/co%00de", "code"),
        ("/api/v1/audit?target=%00", "target"),
    ]:
        answer = client.get(url)
        assert answer.status_code == 422, (url, answer.text)
        assert answer.json()["detail"][0]["loc"][-1] == field
        assert "NUL" in answer.json()["detail"][0]["msg"]
    answer = client.patch("/api/v1/users/a%00b", json={"disabled": True})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["path", "username"]


@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [
        ("/api/v1/blacklist", {"locking_id": "TL1-AAAAAAAA", "reason": "a\u0000b"}, ["body", "reason"]),
        ("/api/v1/webhooks", {"url": "https://a\u0000b/x"}, ["body", "url"]),
        ("/api/v1/customers", {"name": "x\u0000", "city": "Berlin"}, ["body", "name"]),
        ("/api/v1/customers", {"name": "x\u0007", "city": "Berlin"}, ["body", "name"]),
        (
            "/api/v1/products",
            {"code": "p", "name": "P", "features": [{"code": "f\u0000"}]},
            ["body", "features", 0, "code"],
        ),
        ("/api/v1/licenses", {"customer_id": 1, "product": "cortex", "order": "PO\u0000"}, ["body", "order"]),
    ],
)
def test_a_control_character_in_a_body_string_is_named_and_changes_nothing(
    state: ServerState, admin_token: str, path: str, body: dict[str, Any], loc: list[Any]
) -> None:
    client = TestClient(create_app(state), headers={"Authorization": f"Bearer {admin_token}"})
    before = client.get("/api/v1/audit").json()
    answer = client.post(path, json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == loc
    assert client.get("/api/v1/audit").json() == before


def test_text_may_hold_tabs_and_line_breaks_in_a_body(state: ServerState, admin_token: str) -> None:
    client = TestClient(create_app(state), headers={"Authorization": f"Bearer {admin_token}"})
    body = {"locking_id": agent(1).locking_id, "reason": "a\tb\r\nc"}
    answer = client.post("/api/v1/blacklist", json=body)
    assert answer.status_code == 201, answer.text


def test_a_nul_in_the_portal_is_a_4xx(state: ServerState, admin: Principal) -> None:
    now = state.now()
    serial, _ = setup_license(state, admin, now, order="PO-1")
    with state.db.write() as session:
        users.create_user(session, admin, username="seller", password=PASSWORD, role=Role.SALES, now=now)
    state.two_step_roles = frozenset()
    client = TestClient(
        create_app(state, Interfaces(web_portal=True)), base_url="https://portal.example",
        follow_redirects=False,
    )  # fmt: skip
    assert client.post("/portal/login", data={"username": "seller", "password": PASSWORD}).status_code == 303
    for url in [
        "/portal/licenses/%00",
        "/portal/licenses?q=%00",
        "/portal/orders/%00",
        "/portal/licenses/%00/edit",
        "/portal/licenses/new?product=%00",
    ]:
        answer = client.get(url)
        assert 400 <= answer.status_code < 500, (url, answer.status_code)
    page = client.get(f"/portal/licenses/{serial}/edit")
    token = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text)
    assert token is not None
    answer = client.post(
        f"/portal/licenses/{serial}/edit", data={"csrf": token.group(1), "notes": "a\u0000b"}
    )
    assert answer.status_code == 422 and "NUL" in answer.text
    signed_out = TestClient(create_app(state, Interfaces(web_portal=True)), base_url="https://portal.example")
    answer = signed_out.post("/portal/login", data={"username": "a\u0000", "password": "x"})
    assert answer.status_code == 422
