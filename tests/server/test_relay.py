"""The relay in process: what it forwards, what it refuses, what it says when the server
fails, and its data directory. The network to the server is an ``httpx.MockTransport``;
``tests/cli/test_relay_journey.py`` runs the real processes over real TLS."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tessera.core.protocol import MAX_MESSAGE_SIZE
from tessera.server.config import ConfigError
from tessera.server.relay import (
    FORWARDED,
    Relay,
    RelayConfig,
    initialize_relay,
    load_relay_config,
    upstream_context,
)
from tessera.server.tls import check_hostname, issue_server_certificate, make_tls_material

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
UPSTREAM = "https://core.internal:7790"

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def server_ca(tmp_path: Path) -> tuple[Path, Path]:
    """The license server's CA certificate and key files."""
    tls = make_tls_material(NOW)
    ca, key = tmp_path / "server-ca.pem", tmp_path / "server-ca.key"
    ca.write_bytes(tls.ca_cert_pem)
    key.write_bytes(tls.ca_key_pem)
    return ca, key


@pytest.fixture
def config(tmp_path: Path, server_ca: tuple[Path, Path]) -> RelayConfig:
    return initialize_relay(tmp_path / "relay", UPSTREAM, server_ca[0], NOW)


def relay_client(config: RelayConfig, upstream: Handler) -> httpx.AsyncClient:
    relay = Relay(config, transport=httpx.MockTransport(upstream))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=relay), base_url="https://relay.example")


def run(config: RelayConfig, upstream: Handler, talk: Callable[[httpx.AsyncClient], Awaitable[None]]) -> None:
    """``talk`` to a relay whose server is ``upstream``, on an event loop of its own."""

    async def main() -> None:
        async with relay_client(config, upstream) as client:
            await talk(client)

    asyncio.run(main())


def request(
    config: RelayConfig, upstream: Handler, method: str, path: str, **kwargs: object
) -> httpx.Response:
    answers: list[httpx.Response] = []

    async def talk(client: httpx.AsyncClient) -> None:
        answers.append(await client.request(method, path, **kwargs))  # type: ignore[arg-type]

    run(config, upstream, talk)
    return answers[0]


def never(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"the relay forwarded {request.method} {request.url}")


# ---------------------------------------------------------------------- forwarding


@pytest.mark.parametrize(("path", "method"), sorted(FORWARDED.items()))
def test_each_agent_route_is_forwarded_as_is(config: RelayConfig, path: str, method: str) -> None:
    seen: list[httpx.Request] = []
    body = b'{"protocol":"tessera-connect/1","type":"x"}' if method == "POST" else b""

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(409, content=b'{"detail":"the server\'s own words"}')

    response = request(
        config,
        upstream,
        method,
        path,
        content=body or None,
        headers={"x-forwarded-for": "10.1.2.3", "cookie": "a=b", "user-agent": "agent/1.0"},
    )
    # The server's status and bytes reach the agent unchanged.
    assert response.status_code == 409
    assert response.content == b'{"detail":"the server\'s own words"}'
    assert response.headers["content-type"] == "application/json"
    (forwarded,) = seen
    assert str(forwarded.url) == UPSTREAM + path
    assert forwarded.method == method
    assert forwarded.content == body
    # Nothing of the agent's request but its body travels on: no address, no cookie.
    assert "x-forwarded-for" not in forwarded.headers
    assert "cookie" not in forwarded.headers
    assert forwarded.headers["user-agent"] == "tessera-relay"


@pytest.mark.parametrize(
    "path",
    ["/api/v1/products", "/api/v1/licenses", "/api/v1/activate-offline", "/api/v1/tokens", "/docs", "/"],
)
def test_the_admin_api_and_everything_else_is_not_reachable(config: RelayConfig, path: str) -> None:
    for method in ("GET", "POST"):
        response = request(config, never, method, path, content=b"{}" if method == "POST" else None)
        assert response.status_code == 404, (method, path)
        assert response.json() == {"detail": "no such endpoint"}


def test_a_route_with_the_wrong_method_is_refused(config: RelayConfig) -> None:
    response = request(config, never, "GET", "/api/v1/checkin")
    assert response.status_code == 405
    assert response.json() == {"detail": "/api/v1/checkin takes POST"}
    assert request(config, never, "POST", "/api/v1/health", content=b"{}").status_code == 405


def test_a_body_over_the_message_limit_is_refused_before_the_server_sees_it(config: RelayConfig) -> None:
    response = request(config, never, "POST", "/api/v1/checkin", content=b"x" * (MAX_MESSAGE_SIZE + 1))
    assert response.status_code == 413
    assert "too large" in response.json()["detail"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(MAX_MESSAGE_SIZE // 65536 + 2):
            yield b"x" * 65536

    response = request(config, never, "POST", "/api/v1/activate", content=chunks())
    assert response.status_code == 413


def test_a_request_whose_agent_went_away_is_not_forwarded(config: RelayConfig) -> None:
    relay = Relay(config, transport=httpx.MockTransport(never))
    sent: list[dict[str, object]] = []
    half: dict[str, object] = {"type": "http.request", "body": b'{"half', "more_body": True}
    gone: dict[str, object] = {"type": "http.disconnect"}
    messages = iter([half, gone])

    async def receive() -> dict[str, object]:
        return next(messages)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/v1/checkin", "headers": []}
    asyncio.run(relay(scope, receive, send))  # type: ignore[arg-type]
    assert sent == []  # nothing forwarded (never() would fail), nothing answered


# ---------------------------------------------------------------------- a failing server


def raising(exc: Exception) -> Handler:
    def upstream(request: httpx.Request) -> httpx.Response:
        raise exc

    return upstream


@pytest.mark.parametrize(
    ("upstream", "status", "words"),
    [
        (
            raising(httpx.ConnectError("All connection attempts failed")),
            503,
            "the relay cannot reach the license server",
        ),
        (
            raising(httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")),
            503,
            "the relay cannot reach the license server: its TLS certificate is not signed by the pinned CA",
        ),
        (
            raising(httpx.ConnectTimeout("timed out")),
            504,
            "the relay got no answer from the license server within 10 s",
        ),
        (
            raising(httpx.ReadTimeout("timed out")),
            504,
            "the relay got no answer from the license server within 10 s",
        ),
        (raising(httpx.RemoteProtocolError("illegal status line")), 502, "broke off"),
        (raising(httpx.ReadError("connection reset")), 502, "broke off"),
        (lambda r: httpx.Response(200, content=b"x" * (MAX_MESSAGE_SIZE + 1)), 502, "too large"),
    ],
)
def test_a_failing_server_is_one_clear_answer(
    config: RelayConfig, upstream: Handler, status: int, words: str
) -> None:
    response = request(config, upstream, "POST", "/api/v1/checkin", content=b"{}")
    assert response.status_code == status
    detail = response.json()["detail"]
    assert "relay" in detail  # which hop failed: agent to relay, or relay to server
    assert words in detail
    assert "\n" not in detail


def test_the_relay_recovers_when_the_server_is_back(config: RelayConfig) -> None:
    up = False

    def upstream(request: httpx.Request) -> httpx.Response:
        if not up:
            raise httpx.ConnectError("All connection attempts failed")
        return httpx.Response(200, content=b'{"status":"ok"}')

    async def talk(client: httpx.AsyncClient) -> None:
        nonlocal up
        assert (await client.get("/api/v1/health")).status_code == 503
        up = True
        response = await client.get("/api/v1/health")  # the same relay, the same client
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}

    run(config, upstream, talk)


# ---------------------------------------------------------------------- the data directory


def test_init_makes_a_directory_with_nothing_secret_of_the_servers(
    tmp_path: Path, server_ca: tuple[Path, Path]
) -> None:
    config = initialize_relay(
        tmp_path / "relay", UPSTREAM + "/", server_ca[0], NOW, hostnames=["relay.example"]
    )
    assert config.upstream == UPSTREAM
    files = sorted(str(p.relative_to(config.data_dir)) for p in config.data_dir.rglob("*") if p.is_file())
    assert files == ["relay.toml", "tls/ca.pem", "tls/server.key", "tls/server.pem", "upstream-ca.pem"]
    assert config.server_key.stat().st_mode & 0o777 == 0o600
    assert config.upstream_ca.read_bytes() == server_ca[0].read_bytes()
    # Its own CA signed its certificate, and the CA's key was not kept.
    ca = x509.load_pem_x509_certificate(config.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(config.server_cert.read_bytes())
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "relay.example" in names.get_values_for_type(x509.DNSName)
    assert b"PRIVATE KEY" not in config.ca_cert.read_bytes()
    assert load_relay_config(config.data_dir) == config
    upstream_context(config)  # the pinned CA loads
    with pytest.raises(ConfigError, match="initialized already"):
        initialize_relay(config.data_dir, UPSTREAM, server_ca[0], NOW)


def test_init_takes_a_certificate_the_servers_ca_signed(tmp_path: Path, server_ca: tuple[Path, Path]) -> None:
    ca, ca_key = server_ca
    cert_pem, key_pem = issue_server_certificate(ca.read_bytes(), ca_key.read_bytes(), ["relay.example"], NOW)
    (tmp_path / "relay.pem").write_bytes(cert_pem)
    (tmp_path / "relay.key").write_bytes(key_pem)
    config = initialize_relay(
        tmp_path / "relay",
        UPSTREAM,
        ca,
        NOW,
        certificate=(tmp_path / "relay.pem", tmp_path / "relay.key", ca),
    )
    assert config.ca_cert.read_bytes() == ca.read_bytes()  # agents pin the server's CA, unchanged
    assert config.server_cert.read_bytes() == cert_pem
    context = ssl.create_default_context(cafile=str(config.ca_cert))
    assert context.cert_store_stats()["x509_ca"] == 1

    other = make_tls_material(NOW)
    (tmp_path / "other.key").write_bytes(other.server_key_pem)
    with pytest.raises(ConfigError, match="does not belong"):
        initialize_relay(
            tmp_path / "relay2",
            UPSTREAM,
            ca,
            NOW,
            certificate=(tmp_path / "relay.pem", tmp_path / "other.key", ca),
        )
    assert not (tmp_path / "relay2" / "relay.toml").exists()


@pytest.mark.parametrize(
    "name",
    ["a..b", "-x.com", "x-.com", "*.example.com", "a b", "", ".", "relay.example.", "bücher.example",
     "a_b.example", "1.2.3", "999.1.1.1", "x" * 64 + ".example", ("a" * 60 + ".") * 5 + "example"],
)  # fmt: skip
def test_a_certificate_name_is_a_host_name_or_an_address(name: str) -> None:
    with pytest.raises(ValueError, match=r"not a host name|neither an IP address"):
        check_hostname(name)


@pytest.mark.parametrize(
    ("name", "normal"),
    [("relay.example", "relay.example"), ("localhost", "localhost"), ("r-1.Example.COM", "r-1.Example.COM"),
     ("10.0.0.5", "10.0.0.5"), ("::1", "::1"), ("2001:DB8::0:1", "2001:db8::1"), ("x" * 63, "x" * 63)],
)  # fmt: skip
def test_host_names_and_addresses_are_taken(name: str, normal: str) -> None:
    assert check_hostname(name) == normal


def test_a_certificate_names_exactly_what_it_is_given(server_ca: tuple[Path, Path]) -> None:
    """A relay's certificate from the server's CA is trusted by every agent pinning that CA,
    for each name in it: no loopback address it was not asked for; an address is an
    address (an agent connecting to https://10.0.0.5 matches an IP name, not a DNS one)."""
    ca, ca_key = server_ca

    def names(*given: str) -> tuple[list[str], list[str]]:
        pem, _ = issue_server_certificate(ca.read_bytes(), ca_key.read_bytes(), list(given), NOW)
        cert = x509.load_pem_x509_certificate(pem)
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        addresses = [str(a) for a in alt.get_values_for_type(x509.IPAddress)]
        return alt.get_values_for_type(x509.DNSName), addresses

    assert names("relay.example") == (["relay.example"], [])
    assert names("relay.example", "10.0.0.5", "::1") == (["relay.example"], ["10.0.0.5", "::1"])
    # The server's own certificate (server init, make run) keeps its loopback names.
    own = x509.load_pem_x509_certificate(make_tls_material(NOW).server_cert_pem)
    alt = own.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in alt.get_values_for_type(x509.DNSName)
    assert {str(a) for a in alt.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}


def _self_signed(now: datetime, *, ca: bool) -> tuple[bytes, bytes]:
    """A self-signed certificate and its key: a CA, or a leaf that is not one."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a CA" if not ca else "a CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_init_refuses_a_ca_that_did_not_sign_the_certificate(
    tmp_path: Path, server_ca: tuple[Path, Path]
) -> None:
    """The relay hands its --ca to the agents to pin: a CA that did not sign the relay's
    certificate (or is no CA, or a certificate out of its validity) fails every agent's
    TLS handshake later, so init refuses it and writes nothing."""
    ca, ca_key = server_ca
    cert_pem, key_pem = issue_server_certificate(ca.read_bytes(), ca_key.read_bytes(), ["relay.example"], NOW)
    (tmp_path / "relay.pem").write_bytes(cert_pem)
    (tmp_path / "relay.key").write_bytes(key_pem)
    other = make_tls_material(NOW)  # another CA, the same subject name as the server's
    (tmp_path / "other-ca.pem").write_bytes(other.ca_cert_pem)
    leaf_pem, _ = _self_signed(NOW, ca=False)
    (tmp_path / "leaf.pem").write_bytes(leaf_pem)

    def init(ca_file: Path, now: datetime = NOW) -> None:
        initialize_relay(
            tmp_path / "relay",
            UPSTREAM,
            ca,
            now,
            certificate=(tmp_path / "relay.pem", tmp_path / "relay.key", ca_file),
        )

    with pytest.raises(ConfigError, match=r"--cert .*relay\.pem is not signed by --ca .*other-ca\.pem"):
        init(tmp_path / "other-ca.pem")
    with pytest.raises(ConfigError, match=r"--ca .*leaf\.pem is not a CA certificate"):
        init(tmp_path / "leaf.pem")
    with pytest.raises(ConfigError, match=r"relay\.pem is valid only from"):
        init(ca, NOW + timedelta(days=731))
    # The relay's certificate given as its own CA: no CA either.
    with pytest.raises(ConfigError, match="is not a CA certificate"):
        init(tmp_path / "relay.pem")
    assert not (tmp_path / "relay").exists()
    init(ca)
    assert (tmp_path / "relay" / "relay.toml").exists()


@pytest.mark.parametrize(
    ("upstream", "words"),
    [
        ("http://core.internal:7790", "must be an https:// URL"),
        ("core.internal:7790", "must be an https:// URL"),
        ("https://", "names no host"),
        ("https://core.internal:99999", "is not a URL"),
        ("https://user:pw@core.internal", "only https://HOST"),
        ("https://core.internal/?a=b", "only https://HOST"),
    ],
)
def test_init_refuses_an_upstream_that_is_not_https(
    tmp_path: Path, server_ca: tuple[Path, Path], upstream: str, words: str
) -> None:
    with pytest.raises(ConfigError, match=words.replace("?", r"\?")):
        initialize_relay(tmp_path / "relay", upstream, server_ca[0], NOW)
    assert not (tmp_path / "relay").exists()


def test_init_refuses_a_ca_file_that_is_not_a_certificate(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM file"):
        initialize_relay(tmp_path / "relay", UPSTREAM, tmp_path / "ca.pem", NOW)
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="cannot be read"):
        initialize_relay(tmp_path / "relay", UPSTREAM, tmp_path / "ca.pem", NOW)
    with pytest.raises(ConfigError, match="No such file"):
        initialize_relay(tmp_path / "relay", UPSTREAM, tmp_path / "missing.pem", NOW)
    assert not (tmp_path / "relay").exists()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[relay", "relay.toml"),
        ("[other]\n", r"\[relay\] is missing"),
        ('[relay]\nupstream = "https://a"\nport = 1\n', "unknown key 'port'"),
        ("[relay]\n", "upstream must be a URL"),
        ('[relay]\nupstream = "http://a"\n', "must be an https:// URL"),
        ('[relay]\nupstream = "https://a"\ntimeout_seconds = 0\n', "timeout_seconds must be"),
        ('[relay]\nupstream = "https://a"\ntimeout_seconds = true\n', "timeout_seconds must be"),
    ],
)
def test_a_damaged_relay_toml_is_one_clear_error(config: RelayConfig, text: str, words: str) -> None:
    config.config_file.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_relay_config(config.data_dir)


def test_a_directory_that_is_no_relays_is_named(tmp_path: Path, config: RelayConfig) -> None:
    with pytest.raises(ConfigError, match="not a relay data directory"):
        load_relay_config(tmp_path)
    config.upstream_ca.unlink()
    with pytest.raises(ConfigError, match=r"upstream-ca\.pem is missing"):
        load_relay_config(config.data_dir)


def test_the_relay_config_round_trips(config: RelayConfig) -> None:
    text = config.config_file.read_text()
    assert json.dumps(UPSTREAM) in text
    assert load_relay_config(config.data_dir).timeout_seconds == 10.0
