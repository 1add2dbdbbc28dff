"""Instance-bound licenses: an identity part (.par) plus a license bound to the instance,
portable across hardware, one installation per instance slot; on every backend."""

from __future__ import annotations

import httpx

from tessera.core.model import Binding, Identity, License
from tessera.core.passwords import verify_secret
from tessera.core.protocol import ServerResponse
from tessera.core.signing import Keyring
from tessera.core.verify import check_pair, load_signed
from tessera.server.app import ServerState
from tessera.server.tokens import Principal

from .conftest import START, LiveServer
from .helpers import FakeAgent, agent, setup_license


def _activate(client: httpx.Client, a: FakeAgent, key: str, keyring: Keyring) -> ServerResponse:
    request = a.activation(key)
    response = client.post("/api/v1/activate", content=request.to_json())
    assert response.status_code == 200, response.text
    return ServerResponse.from_json(response.content, keyring, request.nonce)


def test_instance_activation_ships_a_matching_identity_and_license(
    live_server: LiveServer, state: ServerState, admin: Principal, keyring: Keyring
) -> None:
    serial, key = setup_license(state, admin, START, binding="instance")
    connect = live_server.client()
    first = agent(1)
    got = _activate(connect, first, key, keyring)
    assert got.identity is not None and got.license is not None
    identity = load_signed(got.identity, keyring).document
    lic = load_signed(got.license, keyring).document
    assert isinstance(identity, Identity) and isinstance(lic, License)
    check_pair(identity, lic)
    assert lic.binding is Binding.INSTANCE and lic.locking_id is None
    assert lic.instance_id == identity.instance_id and lic.serial == serial
    # The admin secret starts as the license key and is only stored hashed.
    assert verify_secret(key, identity.admin_secret) and key not in got.identity

    # Portable: the same installation checks in from new hardware.
    moved = FakeAgent("new-hardware", first.system_id, first.key)
    request = moved.checkin(key)
    answer = connect.post("/api/v1/checkin", content=request.to_json())
    assert answer.status_code == 200, answer.text

    # Unique: another installation, even on the same hardware, does not get the instance.
    twin = FakeAgent("1", "another-installation-01")
    refused = connect.post("/api/v1/activate", content=twin.activation(key).to_json())
    assert refused.status_code == 403 and "no free machine" in refused.json()["detail"]

    # Re-activating the installation keeps its instance id.
    again = _activate(connect, first, key, keyring)
    assert again.identity is not None
    assert load_signed(again.identity, keyring).document.instance_id == identity.instance_id  # type: ignore[union-attr]
