"""The agent's LeaseClient against a real server on loopback: lease, heartbeat, release."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import make_tls
from tests.server.conftest import START, LiveServer, serve
from tests.server.helpers import setup_license

from tessera.agent import LeaseClient, Released, ServerRefused
from tessera.core.clock import SystemClock
from tessera.core.credential import parse_credential
from tessera.core.errors import FormatError, UnknownKeyError
from tessera.core.signing import Keyring, SigningKey
from tessera.server import leases
from tessera.server.app import ServerState
from tessera.server.migrate import upgrade
from tessera.server.storage import Database
from tessera.server.tokens import Principal, Role, create_token


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[LiveServer, str]]:
    db = Database(f"sqlite:///{tmp_path / 's.db'}")
    upgrade(db)
    state = ServerState(
        db=db,
        signing_key=SigningKey.generate(),
        pepper=secrets.token_bytes(32),
        clock=SystemClock(),
        lease_seconds=3,
    )
    with state.db.write() as session:
        row, _ = create_token(session, name="t", role=Role.ADMIN, now=START)
    admin = Principal(row.id, "t", Role.ADMIN)
    serial, _ = setup_license(
        state, admin, START, binding="user", entitlements=[{"feature": "uniplex", "count": 1}]
    )
    with state.db.write() as session:
        text, _, _ = leases.issue_credential(session, admin, serial, "ann", state.now(), state.signing_key)
    (tmp_path / "ann.cred").write_text(text)
    ca_pem, cert, key = make_tls(tmp_path)
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    with serve(state, tls=(cert, key)) as live:
        yield live, str(tmp_path / "ann.cred")
    db.dispose()


def _ca(path: str) -> bytes:
    return (Path(path).parent / "ca.pem").read_bytes()  # beside the credential


def test_hold_heartbeats_and_close_releases(server: tuple[LiveServer, str]) -> None:
    live, path = server
    keyring = Keyring([live.state.signing_key.public])
    with LeaseClient.from_file(path, live.url, _ca(path), keyring) as client:
        lease = client.hold("uniplex")
        assert (lease.in_use, lease.count) == (1, 1)
        time.sleep(4.5)  # longer than the 3 s lease: only heartbeats keep it
        assert lease.valid(SystemClock().now()), lease.lost
        with pytest.raises(ServerRefused, match="all 1 leases of uniplex"):
            client.lease("uniplex")
    # close() released it at once.
    with LeaseClient.from_file(path, live.url, _ca(path), keyring) as client:
        again = client.lease("uniplex")
        assert client.release(again) == 0
        # Releasing again is harmless, and says that it freed nothing.
        assert client.give_back(again.lease_id, "uniplex") == Released(False, 0)
        third = client.lease("uniplex")
        assert client.give_back(third.lease_id, "uniplex") == Released(True, 0)


def test_forged_or_foreign_credential_is_refused_before_sending(
    server: tuple[LiveServer, str],
) -> None:
    live, path = server
    with pytest.raises(UnknownKeyError):
        LeaseClient.from_file(path, live.url, _ca(path), Keyring([SigningKey.generate().public]))
    with pytest.raises(FormatError, match="credential"):
        LeaseClient(parse_credential(b"[CREDENTIAL]\n"), live.url, _ca(path), Keyring([]))
