"""Test support: constants, signed licenses, and a fake license server.

The fake server speaks the real protocol (it parses and checks the agent's signed requests
and answers with vendor-signed ServerResponse objects) over httpx.MockTransport, so the
agent's whole Connect path runs except the socket.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

import httpx

from tessera.core import (
    Entitlement,
    License,
    Location,
    ManualClock,
    SigningKey,
    VersionRange,
    locking_id_for,
    sign_document,
)
from tessera.core.protocol import ActivationRequest, CheckinRequest, ServerResponse

PRODUCT = "cortex"
VERSION = "4.2"
LICENSE_KEY = "K7QXM-2VDRT-9HFNA-PC4WE-8BZJY"
START = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
MACHINE_FACTS = [
    ("m", "machine-id-1"),
    ("u", "uuid-1"),
    ("n", "00:11:22:33:44:55"),
    ("d", "disk-serial-1"),
    ("c", "cpu|8"),
    ("h", "host-1"),
]
LOCKING_ID = str(locking_id_for(MACHINE_FACTS, PRODUCT))
#: the same machine after a mainboard swap: only CPU and hostname still agree
OTHER_LOCKING_ID = str(
    locking_id_for([("m", "other"), ("u", "uuid-2"), ("c", "cpu|8"), ("h", "host-1")], PRODUCT)
)

Features = dict[str, tuple[int, date | None]]


def make_license(
    vendor: SigningKey,
    features: Features | None = None,
    *,
    serial: str = "2026-000001",
    locking_id: str = LOCKING_ID,
    location: str = "main",
    **policy: Any,
) -> str:
    features = features if features is not None else {"uniplex": (5, None), "backup": (1, None)}
    lic = License(
        licensee="myCompany, City",
        serial=serial,
        product=policy.pop("product", PRODUCT),
        version=VersionRange.parse(policy.pop("version", "4.*")),
        issued=START,
        locations=(
            Location(location, tuple(Entitlement(f, c, e) for f, (c, e) in features.items())),
        ),
        locking_id=locking_id,
        **policy,
    )
    return sign_document(lic, vendor)


class FakeServer:
    """A license server in a function: modes simulate outages and attacks."""

    def __init__(self, vendor: SigningKey, clock: ManualClock, license_text: Callable[[str], str]):
        self.vendor = vendor
        self.clock = clock
        self.license_text = license_text  # agent_key -> signed license
        self.mode = "ok"
        self.directives: tuple[str, ...] = ()
        self.pending_license: str | None = None
        self.bodies: list[dict[str, Any]] = []
        self.agent_key: str | None = None
        self.last_response: bytes | None = None

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.bodies.append(json.loads(body))
        if self.mode == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if self.mode == "garbage":
            return httpx.Response(200, content=b"<html>proxy error</html>")
        if self.mode == "refuse":
            return httpx.Response(403, json={"detail": "license revoked"})
        if self.mode == "replay" and self.last_response is not None:
            return httpx.Response(200, content=self.last_response)
        if request.url.path == "/api/v1/activate":
            act = ActivationRequest.from_json(body)
            self.agent_key = act.agent_key
            response = ServerResponse(
                "activation",
                act.nonce,
                self.clock.now().replace(microsecond=0),
                "2026-000001",
                license=self.license_text(act.agent_key),
            )
        else:
            chk = CheckinRequest.from_json(body)
            assert self.agent_key is not None
            chk.verify_with(self.agent_key)
            response = ServerResponse(
                "checkin",
                chk.nonce,
                self.clock.now().replace(microsecond=0),
                "2026-000001",
                license=self.pending_license,
                directives=self.directives,
            )
            self.pending_license = None
        signer = SigningKey.generate() if self.mode == "badsig" else self.vendor
        signed = response.signed(signer)
        content = signed.to_json()
        if self.mode == "unsigned":
            obj = json.loads(content)
            obj["signature"] = ""
            content = json.dumps(obj).encode()
        self.last_response = content
        return httpx.Response(200, content=content)
