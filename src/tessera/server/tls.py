"""TLS material made at ``server init``: a private CA and a server certificate it signs.

Agents pin the CA (not a public one), so the CA is self-signed and lives with the server;
the server certificate names localhost, 127.0.0.1, ::1 and the host's name so the pinned
connection also verifies the host name. A relay's certificate from that CA (``tessera
server relay-cert``) names only what it is asked for: every agent pinning the CA trusts
it for each of its names, loopback included.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["LOOPBACK", "TlsMaterial", "check_hostname", "issue_server_certificate", "make_tls_material"]


#: The loopback addresses the server's own certificate names (``make run``, local agents).
LOOPBACK: Final = ("127.0.0.1", "::1")
_LABEL: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def check_hostname(name: str) -> str:
    """``name`` as a certificate name: an IP address (in its normal form) or a host name of
    RFC 1123 labels (letters, digits, inner hyphens; 63 characters each, 253 in all; not
    all digits at the end, which reads as an address). No wildcard: a certificate the
    agents' pinned CA signed for ``*.example.com`` would be trusted for every host there.

    ``ValueError`` saying what is wrong."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not name or len(name) > 253:
        raise ValueError(f"{name!r} is not a host name (1 to 253 characters)")
    labels = name.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise ValueError(
                f"{name!r} is not a host name (each dot-separated label is 1 to 63 letters, digits "
                "or inner hyphens; no wildcard)"
            )
    if labels[-1].isdigit():
        raise ValueError(f"{name!r} is neither an IP address nor a host name")
    return name


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
    """A CA valid 10 years and a server certificate valid 2 years, both ECDSA P-256. The
    certificate names localhost, ``hostnames``, this host's name and the loopback addresses:
    the CA is this server's (or this relay's) alone."""
    names: list[str] = []
    for name in ["localhost", *(hostnames or []), socket.gethostname(), *LOOPBACK]:
        if name and name not in names:
            names.append(name)
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
    """A server certificate (PEM) and its new key (PEM, unencrypted) for ``names`` (host
    names and IP addresses, exactly these; the last host name its common name), signed by
    the CA, valid 2 years: the server's own at ``server init``, and a relay's (``tessera
    server relay-cert``), so agents that pin the server's CA trust the relay too.

    ``ValueError`` for a CA certificate or key that cannot be read or do not belong together.
    """
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"the CA certificate or key cannot be read: {exc}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or ca_key.public_key() != ca_cert.public_key():
        raise ValueError("the CA key does not belong to the CA certificate")
    if not names:
        raise ValueError("a certificate needs at least one name")
    server_key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = []
    dns_names: list[str] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
            dns_names.append(name)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[-1] if dns_names else names[-1] if names else "localhost"))
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
