"""Builders shared by the server tests: catalog data and agent-side requests."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from tessera.core.fingerprint import locking_id_for
from tessera.core.protocol import ActivationRequest, CheckinRequest, ServerResponse
from tessera.core.signing import Keyring, SigningKey
from tessera.server import activation, catalog, licenses
from tessera.server.app import ServerState
from tessera.server.models import Product
from tessera.server.schemas import CustomerIn, LicenseIn, ProductIn
from tessera.server.tokens import Principal


def setup_license(
    state: ServerState, principal: Principal, now: datetime, **license_fields: Any
) -> tuple[str, str]:
    """Product ``cortex`` (uniplex, backup, reporting), a customer, one license: (serial, key)."""
    with state.db.write() as session:
        if not session.execute(select(Product).where(Product.code == "cortex")).first():
            catalog.create_product(
                session,
                principal,
                ProductIn.model_validate(
                    {
                        "code": "cortex",
                        "name": "Cortex DB",
                        "features": [
                            {"code": "uniplex"},
                            {"code": "backup"},
                            {"code": "reporting"},
                        ],
                    }
                ),
                now,
            )
        customer = catalog.create_customer(
            session, principal, CustomerIn(name="myCompany", city="Berlin"), now
        )
        body: dict[str, Any] = {
            "customer_id": customer.id,
            "product": "cortex",
            "entitlements": [
                {"feature": "uniplex", "count": 5, "expiry": "2027-01-15"},
                {"feature": "backup", "count": 1},
            ],
        }
        body.update(license_fields)
        row, key = licenses.issue_license(
            session, principal, LicenseIn.model_validate(body), now, state.pepper
        )
        return row.serial, key


@dataclass
class FakeAgent:
    """An installation as the server sees it: a machine, an installation id, an agent key."""

    machine: str
    system_id: str
    key: SigningKey = field(default_factory=SigningKey.generate)
    facts: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.facts:
            self.facts = [
                ("m", f"machine-id-{self.machine}"),
                ("u", f"uuid-{self.machine}"),
                ("n", f"mac-{self.machine}"),
                ("c", "cpu"),
            ]

    @property
    def locking_id(self) -> str:
        return str(locking_id_for(self.facts, "cortex"))

    def activation(self, license_key: str) -> ActivationRequest:
        return ActivationRequest.create(license_key, self.locking_id, self.system_id, self.key)

    def checkin(self, license_key: str, revision: int = 0) -> CheckinRequest:
        return CheckinRequest.create(
            license_key, self.locking_id, self.system_id, self.key, revision=revision
        )


def agent(n: int) -> FakeAgent:
    return FakeAgent(machine=f"m{n}", system_id=f"system-{n:04d}-abcdef")


def activate(state: ServerState, a: FakeAgent, key: str, keyring: Keyring) -> ServerResponse:
    """Online activation through the service, its response verified as the agent would."""
    request = a.activation(key)
    with state.db.write() as session:
        raw = activation.activate(session, request, state.now(), state.signing_key, state.pepper).to_json()
    return ServerResponse.from_json(raw, keyring, request.nonce)


def check_in(
    state: ServerState, a: FakeAgent, key: str, keyring: Keyring, revision: int = 0
) -> ServerResponse:
    """A (signed) check-in through the service's full path, its response verified;
    ``revision``: of the license the agent says it holds (0: left out, as older agents do)."""
    request = a.checkin(key, revision)
    with state.db.write() as session:
        raw = activation.checkin(session, request, state.now(), state.signing_key, state.pepper).to_json()
    return ServerResponse.from_json(raw, keyring, request.nonce)
