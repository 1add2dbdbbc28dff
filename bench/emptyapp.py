"""The baseline servers: an empty FastAPI POST endpoint, and a trivial raw HTTP responder.

``app`` is what SPEC section 7 compares the license server with: the same web stack
(FastAPI on one uvicorn worker) doing no work at all (``/empty``), so the ratio says what
Tessera's own per-request work costs; ``/floor`` adds only the signature work a check-in
cannot avoid, ``/activation-floor`` the work an online activation cannot avoid.
``python -m bench.emptyapp --null PORT`` serves a fixed response from a bare asyncio
protocol: it costs almost nothing, so the rate the load generator reaches against it is
the generator's own ceiling.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from dataclasses import replace
from datetime import UTC, datetime

from fastapi import FastAPI, Request, Response

from bench.samples import sample_license
from tessera.core import sign_document
from tessera.core.protocol import (
    ActivationRequest,
    CheckinRequest,
    ServerResponse,
    derive_checkin_key,
    seal_checkin_key,
)
from tessera.core.signing import PublicKey, SigningKey

app = FastAPI()

#: Fixed keys, so the load generator's pre-signed bodies verify in this separate process.
AGENT_KEY = SigningKey.from_raw(bytes(range(32)))
VENDOR_KEY = SigningKey.from_raw(bytes(range(32, 64)))
AGENT_PUBLIC = AGENT_KEY.public.to_base64()
#: The check-in key an activation would have handed that agent.
CHECKIN_KEY = derive_checkin_key(b"bench server secret", AGENT_PUBLIC)
#: What an activation's license file holds besides the machine it binds (sample.py's).
LICENSE = sample_license()


@app.post("/empty")
async def empty() -> dict[str, str]:
    return {}


@app.post("/floor")
async def floor(request: Request) -> Response:
    """The work no correct check-in can skip, and nothing else: no database.

    Parse and check the request, check its MAC with the installation's check-in key, sign
    the answer with the vendor key. The license server's check-ins are compared with this
    too: the gap is the database and the rules.
    """
    parsed = CheckinRequest.from_json(await request.body())
    parsed.authenticate(AGENT_PUBLIC, CHECKIN_KEY)
    answer = ServerResponse("checkin", parsed.nonce, datetime.now(UTC).replace(microsecond=0), "2026-000001")
    return Response(answer.signed_json(VENDOR_KEY), media_type="application/json")


@app.post("/activation-floor")
async def activation_floor(request: Request) -> Response:
    """The work no correct online activation can skip, and nothing else: no database, no rule.

    Parse the request and check its signature (the agent's new key signs it), make the
    license file for the requesting machine and sign it, seal the installation's check-in
    key to the agent's key, sign the answer: what :class:`tessera.server.activations.ActivationWriter`
    does besides the database and the rules (the slot scan, the audit entry). The license
    server's activations are compared with this too.
    """
    parsed = ActivationRequest.from_json(await request.body())
    now = datetime.now(UTC).replace(microsecond=0)
    document = replace(LICENSE, locking_id=parsed.locking_id, agent_key=parsed.agent_key, issued=now)
    checkin_key = derive_checkin_key(b"bench server secret", parsed.agent_key)
    answer = ServerResponse(
        "activation",
        parsed.nonce,
        now,
        LICENSE.serial,
        license=sign_document(document, VENDOR_KEY),
        checkin_key=seal_checkin_key(checkin_key, PublicKey.from_base64(parsed.agent_key)),
    )
    return Response(answer.signed_json(VENDOR_KEY), media_type="application/json")


_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class _Null(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in bytes(self.buffer[:end]).lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[: end + 4 + length]
            assert self.transport is not None
            self.transport.write(_RESPONSE)


async def _serve_null(port: int, tls: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Null, "127.0.0.1", port, ssl=tls)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) not in (3, 5) or sys.argv[1] != "--null":
        sys.exit("usage: python -m bench.emptyapp --null PORT [CERTFILE KEYFILE]")
    context = None
    if len(sys.argv) == 5:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(sys.argv[3], sys.argv[4])
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve_null(int(sys.argv[2]), context))
