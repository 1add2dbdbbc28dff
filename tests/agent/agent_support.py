"""Test support: constants, signed licenses, and a fake license server.

The fake server speaks the real protocol (it parses and checks the agent's signed requests
and answers with vendor-signed ServerResponse objects) over httpx.MockTransport, so the
agent's whole Connect path runs except the socket.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx

from tessera.core import (
    Clock,
    Entitlement,
    License,
    Location,
    SigningKey,
    VersionRange,
    locking_id_for,
    sign_document,
)
from tessera.core.protocol import (
    ActivationRequest,
    CheckinRequest,
    ServerResponse,
    derive_checkin_key,
    new_nonce,
    seal_checkin_key,
    sign_batch,
)
from tessera.core.signing import PublicKey

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
    issued: datetime = START,
    **policy: Any,
) -> str:
    features = features if features is not None else {"uniplex": (5, None), "backup": (1, None)}
    lic = License(
        licensee="myCompany, City",
        serial=serial,
        product=policy.pop("product", PRODUCT),
        version=VersionRange.parse(policy.pop("version", "4.*")),
        issued=issued,
        locations=(Location(location, tuple(Entitlement(f, c, e) for f, (c, e) in features.items())),),
        locking_id=locking_id,
        **policy,
    )
    return sign_document(lic, vendor)


class FakeServer:
    """A license server in a function: modes simulate outages and attacks."""

    def __init__(self, vendor: SigningKey, clock: Clock, license_text: Callable[[str], str]):
        self.vendor = vendor
        self.clock = clock
        self.license_text = license_text  # agent_key -> signed license
        self.mode = "ok"
        self.directives: tuple[str, ...] = ()
        self.pending_license: str | None = None
        self.bodies: list[dict[str, Any]] = []
        self.agent_key: str | None = None
        self.last_response: bytes | None = None
        self.secret = b"fake server's check-in key secret"
        self.hand_out_checkin_keys = True

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.bodies.append(json.loads(body))
        if self.mode == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if self.mode == "slow":
            raise httpx.ReadTimeout("timed out", request=request)
        if self.mode == "garbage":
            return httpx.Response(200, content=b"<html>proxy error</html>")
        if self.mode == "refuse":
            return httpx.Response(403, json={"detail": "license revoked"})
        if self.mode == "replay" and self.last_response is not None:
            return httpx.Response(200, content=self.last_response)
        if self.mode == "old" and "accept" in self.bodies[-1]:  # before batch-signed answers
            return httpx.Response(422, json={"detail": "check-in request has unknown field 'accept'"})
        if self.mode == "old" and "revision" in self.bodies[-1]:  # before the revision in force
            return httpx.Response(422, json={"detail": "check-in request has unknown field 'revision'"})
        if request.url.path == "/api/v1/activate":
            act = ActivationRequest.from_json(body)
            self.agent_key = act.agent_key
            response = ServerResponse(
                "activation",
                act.nonce,
                self.clock.now().replace(microsecond=0),
                "2026-000001",
                license=self.license_text(act.agent_key),
                checkin_key=seal_checkin_key(
                    derive_checkin_key(self.secret, act.agent_key), PublicKey.from_base64(act.agent_key)
                )
                if self.hand_out_checkin_keys
                else None,
            )
        else:
            chk = CheckinRequest.from_json(body)
            assert self.agent_key is not None
            chk.authenticate(self.agent_key, derive_checkin_key(self.secret, self.agent_key))
            response = ServerResponse(
                "checkin",
                chk.nonce,
                self.clock.now().replace(microsecond=0),
                "2026-000001",
                license=self.pending_license,
                directives=self.directives,
            )
            self.pending_license = None
        signer = SigningKey.generate() if self.mode in ("badsig", "batch-badsig") else self.vendor
        if self.mode in ("batch", "batch-badsig") and response.kind == "checkin":
            # Signed together with other agents' answers, this one in the middle.
            others = [ServerResponse("checkin", new_nonce(), response.server_time, "2026-000009")] * 4
            content = sign_batch([*others[:3], response, others[3]], signer)[3]
        else:
            content = response.signed(signer).to_json()
        if self.mode == "unsigned":
            obj = json.loads(content)
            obj["signature"] = ""
            content = json.dumps(obj).encode()
        self.last_response = content
        return httpx.Response(200, content=content)


class LiveServer:
    """Serves a FakeServer on a real socket (plain HTTP, or TLS with a given cert)."""

    def __init__(self, fake: FakeServer, tls: tuple[Path, Path] | None = None) -> None:
        import http.server
        import ssl
        import threading

        outer = fake

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                request = httpx.Request("POST", f"http://agent{self.path}", content=body)
                try:
                    response = outer.handle(request)
                except httpx.ConnectError:
                    self.close_connection = True
                    return
                self.send_response(response.status_code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(response.content)))
                self.end_headers()
                self.wfile.write(response.content)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def make_tls(directory: Path) -> tuple[bytes, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca_pem, cert, key)."""
    import ipaddress
    from datetime import timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=400))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=400))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = directory / "server.crt", directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca.public_bytes(serialization.Encoding.PEM), cert_file, key_file
