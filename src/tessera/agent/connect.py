"""The Connect client: outbound HTTPS to the license server, nothing else.

The agent opens no port. TLS is 1.2 or newer and, when the installation was given the
server's CA (``--ca``, made at ``server init``), *only* that CA is trusted: a certificate from
any other authority, even a public one, is refused like an unreachable server. Without it
the system's CA store is used, and a refusal says so (not "the pinned CA"). The
transport is pluggable so tests (and embedders) can pass ``httpx.MockTransport``.
"""

from __future__ import annotations

import json
import ssl

import httpx

from tessera.agent.errors import BadResponse, ServerRefused, ServerUnreachable
from tessera.core.errors import FormatError, VerificationError, clipped, shown
from tessera.core.protocol import MAX_MESSAGE_SIZE, ServerResponse
from tessera.core.signing import Keyring
from tessera.core.tlsfailure import describe_tls_failure

__all__ = [
    "ACTIVATE_PATH",
    "CHECKIN_PATH",
    "RECOVER_PATH",
    "ConnectClient",
    "check_server_url",
    "pinned_ssl_context",
]

ACTIVATE_PATH = "/api/v1/activate"
CHECKIN_PATH = "/api/v1/checkin"
#: An activation that may move the license here from a machine already bound (recovery).
RECOVER_PATH = "/api/v1/recover"
DEFAULT_TIMEOUT = 15.0


def pinned_ssl_context(ca_pem: bytes | None) -> ssl.SSLContext:
    """TLS 1.2+; with ``ca_pem`` that CA alone is trusted (the system store is not loaded)."""
    if ca_pem is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError):
            raise FormatError("the server CA file is not a PEM certificate") from None
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def check_server_url(server_url: str) -> None:
    """Refuse a URL the agent must not talk to: the license key and Locking ID go out in
    every request, so only TLS to a real host and port (the CA is pinned on top)."""
    if not server_url.startswith("https://"):
        raise FormatError(f"server URL must start with https:// (got {shown(server_url)})")
    try:
        url = httpx.URL(server_url)
        port = url.port  # httpx checks the range; a port that is no number raises
    except (httpx.InvalidURL, ValueError) as exc:
        raise FormatError(f"server URL {shown(server_url)} is not a valid URL: {clipped(str(exc))}") from None
    if not url.host or (port is not None and not 0 < port < 65536):
        raise FormatError(f"server URL {shown(server_url)} needs a host (and a port from 1 to 65535)")


class ConnectClient:
    """Posts one signed request and returns the verified response, or raises ConnectError."""

    def __init__(
        self,
        server_url: str,
        ca_pem: bytes | None,
        keyring: Keyring,
        transport: httpx.BaseTransport | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        check_server_url(server_url)
        self.server_url = server_url.rstrip("/")
        self._keyring = keyring
        verify: ssl.SSLContext | bool = pinned_ssl_context(ca_pem)
        #: Whether the server's CA alone is trusted (else the system's store): the error says so.
        self._pinned = ca_pem is not None
        self._client = httpx.Client(
            verify=verify,
            transport=transport,
            timeout=timeout,
            trust_env=False,
            follow_redirects=False,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ConnectClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def post(self, path: str, body: bytes, expected_nonce: str) -> ServerResponse:
        content = self.post_raw(path, body)
        try:
            return ServerResponse.from_json(content, self._keyring, expected_nonce)
        except FormatError as exc:
            raise BadResponse(f"the license server's answer is not a valid response: {exc}") from None
        except VerificationError as exc:
            raise BadResponse(f"the license server's answer cannot be trusted: {exc}") from None

    def post_raw(self, path: str, body: bytes) -> bytes:
        """POST ``body``; the answer's bytes when HTTP 200, else the matching ConnectError."""
        url = self.server_url + path
        try:
            with self._client.stream(
                "POST", url, content=body, headers={"content-type": "application/json"}
            ) as response:
                content = _read_capped(response)
        except httpx.HTTPError as exc:
            raise ServerUnreachable(
                f"cannot reach the license server at {self.server_url}: {_why(exc, pinned=self._pinned)}"
            ) from None
        if response.status_code != 200:
            # 502-504 are a server (or the relay in front of it) that cannot answer now,
            # not a refusal: "refused" read oddly before "the relay cannot reach ...".
            unavailable = response.status_code in (502, 503, 504)
            raise ServerRefused(
                f"the license server {'is unavailable' if unavailable else 'refused'} "
                f"(HTTP {response.status_code}): "
                f"{_detail(content, response.reason_phrase)}",
                response.status_code,
            )
        if content is None:
            raise BadResponse("the license server's answer is too large")
        return content


#: What to do when the server's certificate is not trusted and no CA was pinned.
_UNPINNED_HINT = "pass the server's CA certificate (tls/ca.pem in its data directory) with --ca"


def _why(exc: httpx.HTTPError, *, pinned: bool) -> str:
    tls = describe_tls_failure(exc, pinned="the pinned CA" if pinned else None, unpinned_hint=_UNPINNED_HINT)
    if tls is not None:
        return tls
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _read_capped(response: httpx.Response) -> bytes | None:
    """The body, or None past MAX_MESSAGE_SIZE: a hostile server cannot fill the memory."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > MAX_MESSAGE_SIZE:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _detail(content: bytes | None, reason: str) -> str:
    try:
        obj = json.loads(content or b"")
    except (ValueError, RecursionError):
        return reason or "no reason given"
    if isinstance(obj, dict) and isinstance(obj.get("detail"), str):
        return str(obj["detail"])[:300]
    if isinstance(obj, dict) and obj.get("detail") is not None:
        return json.dumps(obj["detail"])[:300]
    return reason or "no reason given"
