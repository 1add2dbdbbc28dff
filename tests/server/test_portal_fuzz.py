"""Hypothesis against the web portal's forms: whatever a browser (or anyone) posts, the
answer is a page or a redirect, never a 500. The portal is not in the OpenAPI document,
so schemathesis (``test_api_fuzz.py``) does not reach it."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.core.clock import ManualClock
from tessera.core.signing import SigningKey
from tessera.server import users
from tessera.server.app import Interfaces, ServerState, create_app
from tessera.server.migrate import upgrade
from tessera.server.storage import Database
from tessera.server.tokens import Principal, Role, create_token

from .conftest import START
from .helpers import agent, setup_license

pytestmark = pytest.mark.fuzz

PASSWORD = "tidal-orbit-cactus-lantern"
FIELDS = [
    "csrf", "status", "current", "new", "repeat", "username", "password", "next", "request", "code",
    "secret", "proof", "x",
    # the new-license form
    "product", "customer", "count:uniplex", "expiry:uniplex", "emergency:backup", "machines", "binding",
    "match", "version", "failover_days", "checkpoint_days", "validation_hours", "order", "seal",
    # the change form
    "revision", "count:backup", "count:reporting", "connect",
]  # fmt: skip


def _portal(tmp_path: Path) -> tuple[TestClient, str, str, bytes]:
    db = Database(f"sqlite:///{tmp_path / 'fuzz.db'}")
    upgrade(db)
    # An admin reaches every page: here without the two-step set-up its role needs by
    # default (that rule has its own tests in test_web_portal.py).
    state = ServerState(
        db=db,
        signing_key=SigningKey.generate(),
        pepper=secrets.token_bytes(32),
        clock=ManualClock(START),
        two_step_roles=frozenset(),
    )
    with db.write() as session:
        row, _ = create_token(session, name="admin", role=Role.ADMIN, now=START)
    admin = Principal(row.id, "admin", Role.ADMIN)
    serial, key = setup_license(state, admin, START, order="PO-1", machines=1000)
    with db.write() as session:
        users.create_user(session, admin, username="ops", password=PASSWORD, role=Role.ADMIN, now=START)
    client = TestClient(create_app(state, Interfaces(web_portal=True)), base_url="https://portal.test")
    client.post("/portal/login", data={"username": "ops", "password": PASSWORD})
    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', client.get("/portal/account").text)
    assert found
    return client, found.group(1), serial, agent(1).activation(key).to_json()


def test_no_form_post_breaks_the_portal(tmp_path: Path) -> None:
    client, csrf, serial, request_file = _portal(tmp_path)
    paths = [
        "/portal/login",
        "/portal/activate",
        "/portal/account",
        "/portal/account/two-factor/start",
        "/portal/account/two-factor/enable",
        "/portal/account/two-factor/disable",
        f"/portal/licenses/{serial}/status",
        "/portal/licenses/2099-000001/status",
        "/portal/orders/PO-1/cancel",
        "/portal/orders/%00/cancel",
        "/portal/licenses/new",
        f"/portal/licenses/{serial}/edit",
        "/portal/licenses/2099-000001/edit",
    ]
    values = st.one_of(
        st.text(max_size=80),
        st.sampled_from(
            [csrf, "active", "revoked", PASSWORD, "/portal/x", "123456", "JBSWY3DPEHPK3PXP", "cortex", "1"]
        ),
    )
    uploads = st.one_of(st.none(), st.binary(max_size=300), st.just(request_file))

    @settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(
        path=st.sampled_from(paths),
        fields=st.dictionaries(st.sampled_from(FIELDS), values, max_size=6),
        upload=uploads,
        origin=st.sampled_from([None, "https://portal.test", "https://evil.test", "null"]),
    )
    def post(path: str, fields: dict[str, str], upload: bytes | None, origin: str | None) -> None:
        files = {"request": ("r.json", upload, "application/json")} if upload is not None else None
        headers = {"Origin": origin} if origin else {}
        answer = client.post(path, data=fields, files=files, headers=headers, follow_redirects=False)
        assert answer.status_code < 500, (path, answer.status_code, answer.text[:300])

    post()


def test_no_raw_body_breaks_the_portal(tmp_path: Path) -> None:
    client, _csrf, _serial, _request = _portal(tmp_path)

    @settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(
        path=st.sampled_from(
            ["/portal/login", "/portal/activate", "/portal/account", "/portal/logout", "/portal/licenses/new"]
        ),
        body=st.binary(max_size=500),
        content_type=st.sampled_from(
            [
                "multipart/form-data; boundary=xyz",
                "multipart/form-data",
                "application/x-www-form-urlencoded",
                "text/plain",
                "application/json",
            ]
        ),
    )
    def post(path: str, body: bytes, content_type: str) -> None:
        answer = client.post(
            path, content=body, headers={"Content-Type": content_type}, follow_redirects=False
        )
        assert answer.status_code < 500, (path, answer.status_code, answer.text[:300])

    post()
