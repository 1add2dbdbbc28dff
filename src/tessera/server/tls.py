"""TLS material made at ``server init``: a private CA and a server certificate it signs.

Agents pin the CA (not a public one), so the CA is self-signed and lives with the server;
the server certificate names localhost, 127.0.0.1, ::1 and the host's name so the pinned
connection also verifies the host name.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["TlsMaterial", "issue_server_certificate", "make_tls_material"]


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    ca_cert_pem: bytes
    ca_key_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tessera license server"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_tls_material(now: datetime, hostnames: list[str] | None = None) -> TlsMaterial:
    """A CA valid 10 years and a server certificate valid 2 years, both ECDSA P-256."""
    names = ["localhost", *(hostnames or [])]
    host = socket.gethostname()
    if host and host not in names:
        names.append(host)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Tessera license server CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_cert_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    ca_key_pem = _key_pem(ca_key)
    server_cert_pem, server_key_pem = issue_server_certificate(ca_cert_pem, ca_key_pem, names, now)
    return TlsMaterial(ca_cert_pem, ca_key_pem, server_cert_pem, server_key_pem)


def issue_server_certificate(
    ca_cert_pem: bytes, ca_key_pem: bytes, names: list[str], now: datetime
) -> tuple[bytes, bytes]:
    """A server certificate (PEM) and its new key (PEM, unencrypted) for the DNS ``names``
    (the last one its common name) and the loopback addresses, signed by the CA, valid 2
    years: the server's own at ``server init``, and a relay's (``tessera server
    relay-cert``), so agents that pin the server's CA trust the relay too.

    ``ValueError`` for a CA certificate or key that cannot be read or do not belong together.
    """
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"the CA certificate or key cannot be read: {exc}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or ca_key.public_key() != ca_cert.public_key():
        raise ValueError("the CA key does not belong to the CA certificate")
    server_key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt_names += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[-1] if names else "localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=730))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return server_cert.public_bytes(serialization.Encoding.PEM), _key_pem(server_key)
