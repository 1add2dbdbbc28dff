"""Bodies that cannot be parsed at all get a 422 naming ``body`` with the reason."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tessera.server.app import ServerState, create_app


def test_invalid_utf8_and_deep_nesting_name_the_body(state: ServerState, admin_token: str) -> None:
    client = TestClient(create_app(state), headers={"Authorization": f"Bearer {admin_token}"})
    headers = {"Content-Type": "application/json"}
    for body, reason in [
        (b'{"name":"bad\xff"}', "UTF-8"),
        (b"[" * 100_000, "nested too deeply"),
    ]:
        answer = client.post("/api/v1/customers", content=body, headers=headers)
        assert answer.status_code == 422, answer.text
        (error,) = answer.json()["detail"]
        assert error["loc"] == ["body"] and reason in error["msg"]
    assert client.get("/api/v1/audit").json() == []
