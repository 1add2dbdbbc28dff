"""The Connect endpoints over real HTTP: refusals are JSON with one line, and change nothing."""

from __future__ import annotations

import base64
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from sqlalchemy import select

from tessera.core.clock import ManualClock
from tessera.core.protocol import CheckinRequest, ServerResponse, open_checkin_key
from tessera.core.signing import Keyring, SigningKey
from tessera.server import activation, licenses
from tessera.server.app import ServerState, create_app
from tessera.server.models import Checkin
from tessera.server.storage import Database
from tessera.server.tokens import Principal

from .conftest import START, LiveServer
from .helpers import agent, setup_license


def test_forged_and_malformed_requests_are_refused_and_change_nothing(
    live_server: LiveServer, state: ServerState, admin: Principal, keyring: Keyring
) -> None:
    serial, key = setup_license(state, admin, START)
    client = live_server.client()
    request = json.loads(agent(1).activation(key).to_json())
    forged = {**request, "locking_id": agent(2).locking_id}  # signature no longer covers it
    response = client.post("/api/v1/activate", json=forged)
    assert response.status_code == 403 and "signature" in response.json()["detail"]
    bad_key = {**request, "license_key": "not a key"}
    response = client.post("/api/v1/activate", json=bad_key)
    assert response.status_code == 422 and response.json() == {"detail": "field 'license_key' is malformed"}
    unknown = agent(3).activation("AAAAA-BBBBB-CCCCC-DDDDD-EEEEE")
    response = client.post("/api/v1/activate", content=unknown.to_json())
    assert response.status_code == 404 and response.json() == {"detail": "unknown license key"}
    huge = client.post("/api/v1/activate", content=b"{" + b" " * (2 * 1024 * 1024) + b"}")
    assert huge.status_code == 422 and huge.json() == {"detail": "request is too large"}
    extra = {**request, "user_name": "alice"}
    response = client.post("/api/v1/activate", json=extra)
    assert response.status_code == 422 and "user_name" in response.json()["detail"]
    with state.db.read() as session:
        assert licenses.license_view(licenses.get_license(session, serial))["machines"] == []
    good = agent(1).activation(key)
    response = client.post("/api/v1/activate", content=good.to_json())
    assert response.status_code == 200
    ServerResponse.from_json(response.content, keyring, good.nonce)


def test_checkin_with_a_forged_signature_is_refused(
    live_server: LiveServer, state: ServerState, admin: Principal
) -> None:
    _, key = setup_license(state, admin, START)
    a = agent(1)
    assert (
        live_server.client().post("/api/v1/activate", content=a.activation(key).to_json()).status_code == 200
    )
    checkin = json.loads(a.checkin(key).to_json())
    checkin["signature"] = base64.b64encode(SigningKey.generate().sign(b"x")).decode()
    response = live_server.client().post("/api/v1/checkin", json=checkin)
    assert response.status_code == 403 and "signature" in response.json()["detail"]


def test_checkin_key_from_activation_macs_check_ins(
    live_server: LiveServer, state: ServerState, admin: Principal, keyring: Keyring
) -> None:
    """The activation response seals the installation's check-in key to its agent key; a
    check-in MACed with it is recorded, a wrong MAC is refused and records nothing."""
    serial, key = setup_license(state, admin, START)
    a = agent(1)
    request = a.activation(key)
    reply = live_server.client().post("/api/v1/activate", content=request.to_json())
    assert reply.status_code == 200
    sealed = ServerResponse.from_json(reply.content, keyring, request.nonce).checkin_key
    assert sealed is not None
    checkin_key = open_checkin_key(sealed, a.key)
    assert checkin_key == activation.checkin_key_for(state.pepper, a.key.public.to_base64())

    def checkins() -> int:
        with state.db.read() as session:
            return len(session.execute(select(Checkin)).all())

    maced = CheckinRequest.create(key, a.locking_id, a.system_id, a.key, checkin_key)
    reply = live_server.client().post("/api/v1/checkin", content=maced.to_json())
    assert reply.status_code == 200, reply.text
    assert ServerResponse.from_json(reply.content, keyring, maced.nonce).serial == serial
    assert checkins() == 1
    wrong = CheckinRequest.create(key, a.locking_id, a.system_id, a.key, bytes(32))
    reply = live_server.client().post("/api/v1/checkin", content=wrong.to_json())
    assert reply.status_code == 403 and "signature" in reply.json()["detail"]
    # Another installation's key does not fit either, though the server made it too.
    other = activation.checkin_key_for(state.pepper, agent(2).key.public.to_base64())
    stolen = CheckinRequest.create(key, a.locking_id, a.system_id, a.key, other)
    assert live_server.client().post("/api/v1/checkin", content=stolen.to_json()).status_code == 403
    assert checkins() == 1
    # An agent that has no check-in key (activated offline) still signs, and is recorded.
    signed = a.checkin(key)
    assert live_server.client().post("/api/v1/checkin", content=signed.to_json()).status_code == 200
    assert checkins() == 2


@pytest.fixture
def server_without_database() -> Iterator[str]:
    """The app with a PostgreSQL URL nobody listens on: the database is unreachable."""
    db = Database("postgresql+psycopg://tessera@127.0.0.1:1/none?connect_timeout=2")
    state = ServerState(db, SigningKey.generate(), secrets.token_bytes(32), ManualClock(START))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="critical", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_an_unreachable_database_is_503_not_500(server_without_database: str) -> None:
    request = agent(1).activation("AAAAA-BBBBB-CCCCC-DDDDD-EEEEE")
    response = httpx.post(f"{server_without_database}/api/v1/activate", content=request.to_json(), timeout=30)
    assert response.status_code == 503
    assert response.json() == {"detail": "the server cannot reach its database"}
    response = httpx.get(
        f"{server_without_database}/api/v1/products",
        headers={"Authorization": "Bearer x"},
        timeout=30,
    )
    assert response.status_code == 503
