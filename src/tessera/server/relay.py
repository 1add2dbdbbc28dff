"""The relay: the internet-facing part of a split deployment (SPEC section 5, seed 004).

In a split deployment the license server (signing key, database, admin API) stays in the
internal network, and only the relay runs in the DMZ: it takes the agents' Connect
requests and forwards them over HTTPS, the server's CA pinned, to the server, which
answers them as if the agents had come directly. The relay holds nothing secret but its
own TLS key: no vendor key, no pepper, no database, no token; a relay taken over can
forward, refuse or drop requests, never sign, read a license or change one (every answer
is signed by the vendor key, which the agents verify). The firewall needs only one rule:
from the relay to the server's port. Nothing connects from the outside inwards.

Only the agents' routes are forwarded (:data:`FORWARDED`: activation, recovery, check-in,
lease and the health probe); the admin API, offline activation and anything else is not
reachable through the relay at all (404). The relay adds nothing to a request: no client
address, no header of the agent's (agents send no personal data, and the relay does not
add any).

When the server cannot be reached the agent gets one clear reason (``503`` unreachable,
``504`` no answer in time, ``502`` a broken answer) and goes into failover as it would
with the server down; the relay recovers by itself once the server is back.
"""

from __future__ import annotations

import json
import logging
import ssl
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from starlette.types import Message, Receive, Scope, Send

from tessera.core.protocol import MAX_MESSAGE_SIZE
from tessera.core.tlsfailure import describe_tls_failure
from tessera.server.config import ConfigError, toml_string
from tessera.server.files import write_file
from tessera.server.tls import make_tls_material

__all__ = [
    "FORWARDED",
    "RELAY_CONFIG_NAME",
    "Relay",
    "RelayConfig",
    "initialize_relay",
    "load_relay_config",
]

log = logging.getLogger("tessera.relay")

RELAY_CONFIG_NAME: Final = "relay.toml"
#: The routes the relay forwards, by method: what an agent sends (``docs/protocol.md``).
FORWARDED: Final = {
    "/api/v1/activate": "POST",
    "/api/v1/recover": "POST",
    "/api/v1/checkin": "POST",
    "/api/v1/lease": "POST",
    "/api/v1/health": "GET",
}
#: Largest answer taken from the server: a Connect answer is a message of at most this
#: size too (the agent refuses larger ones), so more is a broken or hostile server.
MAX_ANSWER: Final = MAX_MESSAGE_SIZE
#: Connections kept open to the server (HTTP/1.1 keep-alive): one per request in flight.
UPSTREAM_CONNECTIONS: Final = 64
#: An idle connection to the server is given up after this long: well before the server's
#: web stack closes it (uvicorn: 5 s), so a request is never sent on a connection the
#: server is closing that instant (a 502 for an agent that did nothing wrong).
KEEPALIVE_SECONDS: Final = 2.0


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """A relay's data directory (``relay.toml`` and its TLS files)."""

    data_dir: Path
    upstream: str
    timeout_seconds: float = 10.0

    @property
    def config_file(self) -> Path:
        return self.data_dir / RELAY_CONFIG_NAME

    @property
    def upstream_ca(self) -> Path:
        """The server's CA certificate: the only one the relay trusts for the server."""
        return self.data_dir / "upstream-ca.pem"

    @property
    def ca_cert(self) -> Path:
        """The CA agents pin for the relay: a copy of the server's when the relay's
        certificate came from ``tessera server relay-cert``, else one made at init."""
        return self.data_dir / "tls" / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.data_dir / "tls" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.data_dir / "tls" / "server.key"


def _check_upstream(url: str) -> str:
    """``url`` as the server's base URL; ``ConfigError`` unless it is ``https://host[:port]``."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port out of range)
    except ValueError as exc:
        raise ConfigError(f"upstream {url!r} is not a URL: {exc}") from None
    if parts.scheme != "https":
        raise ConfigError(f"upstream {url!r} must be an https:// URL (the relay talks TLS to the server)")
    if not parts.hostname:
        raise ConfigError(f"upstream {url!r} names no host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"upstream {url!r} must be only https://HOST[:PORT][/PATH]")
    return url.rstrip("/")


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{what} {path} is not a PEM file")
    return data


def _check_certificate(cert_pem: bytes, key_pem: bytes | None, what: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
        if key_pem is not None:
            key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what} cannot be read: {str(exc).splitlines()[0]}") from None
    if key_pem is not None and key.public_key() != certificate.public_key():
        raise ConfigError(f"{what}: the key does not belong to the certificate")


def _check_issued_by(cert_pem: bytes, ca_pem: bytes, cert_what: str, ca_what: str, now: datetime) -> None:
    """``ConfigError`` unless the CA signed the certificate and can sign certificates at
    all, and both are valid at ``now``. The relay hands out ``ca_pem`` as the CA
    agents pin: one that did not sign its certificate fails every agent's TLS handshake,
    long after ``relay init`` said all was well."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    certificate = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(ca_pem)
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        usage: x509.KeyUsage | None = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if not is_ca or (usage is not None and not usage.key_cert_sign):
        raise ConfigError(f"{ca_what} is not a CA certificate (agents could not verify the relay with it)")
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(
            f"{cert_what} is not signed by {ca_what} (agents pinning that CA would refuse the relay)"
        ) from None
    for what, cert in ((cert_what, certificate), (ca_what, ca)):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise ConfigError(
                f"{what} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
                f"to {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            )


def initialize_relay(
    data_dir: Path,
    upstream: str,
    upstream_ca: Path,
    now: datetime,
    *,
    certificate: tuple[Path, Path, Path] | None = None,
    hostnames: list[str] | None = None,
) -> RelayConfig:
    """Make a relay's data directory, never asking anything.

    ``certificate`` is (certificate, key, CA) from ``tessera server relay-cert``: agents
    that pin the server's CA then trust the relay unchanged. Without it the relay makes a
    CA of its own, signs its certificate with it and throws the CA's key away (the relay
    keeps nothing it does not need; a new certificate is a new ``relay init``).
    """
    data_dir = data_dir.resolve()
    config = RelayConfig(data_dir=data_dir, upstream=_check_upstream(upstream))
    if config.config_file.exists():
        raise ConfigError(f"{data_dir} is initialized already (refusing to replace its files)")
    upstream_ca_pem = _read_pem(upstream_ca, "--upstream-ca")
    _check_certificate(upstream_ca_pem, None, f"--upstream-ca {upstream_ca}")
    if certificate is not None:
        cert_path, key_path, ca_path = certificate
        cert_pem = _read_pem(cert_path, "--cert")
        key_pem = _read_pem(key_path, "--key")
        ca_pem = _read_pem(ca_path, "--ca")
        _check_certificate(cert_pem, key_pem, f"--cert {cert_path} with --key {key_path}")
        _check_certificate(ca_pem, None, f"--ca {ca_path}")
        _check_issued_by(cert_pem, ca_pem, f"--cert {cert_path}", f"--ca {ca_path}", now)
    else:
        own = make_tls_material(now, hostnames)  # its CA key is not kept
        ca_pem, cert_pem, key_pem = own.ca_cert_pem, own.server_cert_pem, own.server_key_pem
    data_dir.mkdir(parents=True, exist_ok=True)
    write_file(config.upstream_ca, upstream_ca_pem)
    write_file(config.ca_cert, ca_pem)
    write_file(config.server_cert, cert_pem)
    write_file(config.server_key, key_pem, 0o600)
    # Written last: its presence means "initialized".
    write_file(config.config_file, render_relay_config(config).encode("utf-8"))
    return config


def render_relay_config(config: RelayConfig) -> str:
    return (
        "# Tessera relay: forwards the agents' Connect requests to the license server.\n"
        "# It holds no vendor key and no database; see docs/server.md, Split deployment.\n"
        "[relay]\n"
        f"upstream = {toml_string(config.upstream)}\n"
        "# The server's CA certificate, pinned: upstream-ca.pem in this directory.\n"
        f"timeout_seconds = {config.timeout_seconds}\n"
    )


def load_relay_config(data_dir: Path) -> RelayConfig:
    data_dir = data_dir.resolve()
    path = data_dir / RELAY_CONFIG_NAME
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{data_dir} is not a relay data directory (run 'tessera relay init')") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    section = raw.get("relay")
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [relay] is missing")
    unknown = set(section) - {"upstream", "timeout_seconds"}
    if unknown:
        raise ConfigError(f"{path}: [relay] has unknown key {sorted(unknown)[0]!r}")
    upstream = section.get("upstream")
    if not isinstance(upstream, str):
        raise ConfigError(f"{path}: [relay] upstream must be a URL")
    timeout = section.get("timeout_seconds", 10.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0.1 <= timeout <= 300:
        raise ConfigError(f"{path}: [relay] timeout_seconds must be a number from 0.1 to 300")
    try:
        config = RelayConfig(data_dir, _check_upstream(upstream), float(timeout))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not config.upstream_ca.is_file():
        raise ConfigError(f"{config.upstream_ca} is missing (the server's CA certificate)")
    return config


def upstream_context(config: RelayConfig) -> ssl.SSLContext:
    """TLS 1.2+ to the server, trusting its CA alone (not the system's)."""
    try:
        context = ssl.create_default_context(cafile=str(config.upstream_ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{config.upstream_ca}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class Relay:
    """The relay's ASGI app. ``transport`` replaces the network to the server (tests).

    ``ConfigError`` at once if the server's CA file cannot be loaded."""

    def __init__(self, config: RelayConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self._transport = transport
        self._verify = upstream_context(config)
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.config.upstream,
                verify=self._verify,
                transport=self._transport,
                timeout=self.config.timeout_seconds,
                limits=httpx.Limits(
                    max_connections=UPSTREAM_CONNECTIONS,
                    max_keepalive_connections=UPSTREAM_CONNECTIONS,
                    keepalive_expiry=KEEPALIVE_SECONDS,
                ),
                trust_env=False,
                follow_redirects=False,
                headers={"user-agent": "tessera-relay"},
            )
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # no websockets: the connection is refused by the server
        method = FORWARDED.get(scope["path"])
        if method is None:
            await _answer(send, 404, "no such endpoint")
            return
        if scope["method"] != method:
            await _answer(send, 405, f"{scope['path']} takes {method}")
            return
        try:
            body = await _read_body(scope, receive)
        except _ClientGone:
            return  # nothing is forwarded for an agent that went away mid-request
        if body is None:
            await _answer(send, 413, f"request body too large (over {MAX_MESSAGE_SIZE} bytes)")
            return
        status, content = await self._forward(method, scope["path"], body)
        await _send(send, status, content)

    async def _forward(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        """The server's status and answer, or the relay's own 502/503/504 with the reason.

        The reason names the relay: the agent shows it after its own words about the
        license server ("... (HTTP 503): the relay cannot reach the license server"), and
        the operator must know which of the two hops failed."""
        headers = {"content-type": "application/json"} if method == "POST" else {}
        try:
            request = self._http().build_request(method, path, content=body or None, headers=headers)
            response = await self._http().send(request, stream=True)
            try:
                content = await _read_capped(response)
            finally:
                await response.aclose()
        except httpx.TimeoutException:
            return _error(
                504,
                f"the relay got no answer from the license server within {self.config.timeout_seconds:g} s",
            )
        except httpx.ConnectError as exc:
            log.warning("license server unreachable: %s", exc)
            return _error(503, f"the relay cannot reach the license server: {_reason(exc)}")
        except httpx.HTTPError as exc:
            log.warning("license server connection failed: %s", exc)
            return _error(502, f"the license server's answer to the relay broke off: {_reason(exc)}")
        if content is None:
            return _error(502, "the license server's answer is too large for the relay")
        return response.status_code, content

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


class _ClientGone(Exception):
    """The agent disconnected before its request's body was complete."""


async def _read_body(scope: Scope, receive: Receive) -> bytes | None:
    """The request's body; None past :data:`MAX_MESSAGE_SIZE` (declared or sent)."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > MAX_MESSAGE_SIZE:
            return None
    body = bytearray()
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            raise _ClientGone
        body += message.get("body", b"")
        if len(body) > MAX_MESSAGE_SIZE:
            return None
        if not message.get("more_body", False):
            return bytes(body)


async def _read_capped(response: httpx.Response) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_ANSWER:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _reason(exc: httpx.HTTPError) -> str:
    # The relay always pins the server's CA (upstream_context): an expired certificate or
    # a host name it lacks is still said as what it is.
    tls = describe_tls_failure(exc, pinned="the pinned CA (upstream-ca.pem)", unpinned_hint="")
    if tls is not None:
        return tls
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _error(status: int, detail: str) -> tuple[int, bytes]:
    return status, json.dumps({"detail": detail}, separators=(",", ":")).encode()


async def _answer(send: Send, status: int, detail: str) -> None:
    await _send(send, *_error(status, detail))


async def _send(send: Send, status: int, content: bytes) -> None:
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(content)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
