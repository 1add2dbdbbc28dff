"""A vendor key that stops signing while the server runs (an HSM token pulled, its
session lost): every answer that needs a signature is a 503 with a reason, nothing else
breaks, and the server recovers by itself once the key signs again.

SoftHSM itself (the key in a real token) is ``test_hsm.py``; here the failure is injected,
since a token cannot be made to fail on cue.
"""

from __future__ import annotations

import secrets

import nacl.signing
import pytest
from sqlalchemy import func, select

from tessera.core.clock import ManualClock
from tessera.core.signing import SigningKey
from tessera.server.app import Interfaces, ServerState
from tessera.server.hsm import HsmError
from tessera.server.models import Machine
from tessera.server.storage import Database
from tessera.server.tokens import Principal, Role, create_token

from .conftest import START, serve
from .helpers import agent, setup_license


class FlakyKey(SigningKey):
    """An in-process key that fails the way :class:`HsmSigningKey` does, when told to."""

    __slots__ = ("broken",)

    def __init__(self) -> None:
        super().__init__(nacl.signing.SigningKey.generate())
        self.broken = False

    def sign(self, data: bytes) -> bytes:
        if self.broken:
            raise HsmError("token 'vendor' refused to sign: DeviceRemoved")
        return super().sign(data)


def test_a_key_that_stops_signing_is_a_503_until_it_comes_back(
    database: Database, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    key = FlakyKey()
    state = ServerState(db=database, signing_key=key, pepper=secrets.token_bytes(32), clock=clock)
    with state.db.write() as session:
        row, token = create_token(session, name="admin", role=Role.ADMIN, now=START)
    _, license_key = setup_license(state, Principal(row.id, "admin", Role.ADMIN), START, machines=5)
    first = agent(1)
    with serve(state, Interfaces(web_portal=True)) as live, live.client(token) as client:
        assert (
            client.post("/api/v1/activate", content=first.activation(license_key).to_json()).status_code
            == 200
        )
        key.broken = True
        for path, body in [
            ("/api/v1/activate", agent(2).activation(license_key).to_json()),
            ("/api/v1/checkin", first.checkin(license_key).to_json()),
            ("/api/v1/activate-offline", agent(3).activation(license_key).to_json()),
        ]:
            answer = client.post(path, content=body)
            assert answer.status_code == 503, (path, answer.text)
            assert answer.json() == {"detail": "the server cannot sign right now (its HSM is unavailable)"}
            assert answer.headers["retry-after"] == "5"
        assert "DeviceRemoved" in caplog.text  # the operator learns why; the agent does not
        with state.db.read() as session:  # no activation was half done
            assert session.execute(select(func.count()).select_from(Machine)).scalar_one() == 1
        assert client.get("/api/v1/health").status_code == 200
        key.broken = False
        assert client.post("/api/v1/checkin", content=first.checkin(license_key).to_json()).status_code == 200
        again = client.post("/api/v1/activate", content=agent(2).activation(license_key).to_json())
        assert again.status_code == 200, again.text
