"""Why a TLS connection to a server failed, in words that point the right way.

OpenSSL says ``CERTIFICATE_VERIFY_FAILED`` for an unknown issuer, an expired certificate
and a host name the certificate does not hold alike; "not signed by the pinned CA" for all
of them sent people the wrong way, and was plainly wrong when no CA was pinned at all (the
system's CA store was used). The verification error's code tells them apart.
"""

from __future__ import annotations

import ssl

__all__ = ["describe_tls_failure"]

# OpenSSL's X509_V_ERR_* codes.
_CERT_NOT_YET_VALID = 9
_CERT_HAS_EXPIRED = 10
_HOSTNAME_MISMATCH = 62
_IP_ADDRESS_MISMATCH = 64
#: The chain does not lead to a trusted CA: unknown issuer, a self-signed certificate.
_UNTRUSTED = frozenset({2, 18, 19, 20, 21})


def _find(exc: BaseException, kind: type[ssl.SSLError]) -> ssl.SSLError | None:
    """``exc`` or what it wraps (httpx and httpcore chain the ssl error), if of ``kind``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        current = current.__cause__ or current.__context__
    return None


def describe_tls_failure(exc: BaseException, *, pinned: str | None, unpinned_hint: str) -> str | None:
    """Why ``exc`` is a failed TLS connection, or None when it is not one.

    ``pinned`` names the CA that alone was trusted (``"the pinned CA"``), or is None when
    the system's CA store was used; ``unpinned_hint`` then says how to pin the server's CA
    (``"pass the server's CA certificate with --ca"``)."""
    verify = _find(exc, ssl.SSLCertVerificationError)
    text = str(exc)
    code = getattr(verify, "verify_code", None)
    # A certificate outside its validity period is nearly always this machine's clock
    # (set back, or a dead RTC battery); blaming the CA would send the admin the wrong way.
    if code == _CERT_NOT_YET_VALID or "not yet valid" in text:
        return (
            "its TLS certificate is not valid yet by this machine's clock; check the system "
            "clock (date) on this machine"
        )
    if code == _CERT_HAS_EXPIRED or "certificate has expired" in text:
        return (
            "its TLS certificate has expired by this machine's clock; check the system clock "
            "(date) on this machine, else the server's certificate must be renewed"
        )
    if code in (_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH):
        return (
            "its TLS certificate is not made out to the host in the URL; use a host name or "
            "address the server's certificate names"
        )
    if code in _UNTRUSTED or (verify is None and "CERTIFICATE_VERIFY_FAILED" in text):
        if pinned is not None:
            return f"its TLS certificate is not signed by {pinned}"
        return (
            "its TLS certificate is not trusted by this machine's CA store "
            f"(no CA was pinned: {unpinned_hint})"
        )
    if verify is not None:
        return (
            f"its TLS certificate was refused ({getattr(verify, 'verify_message', None) or 'unverifiable'})"
        )
    handshake = _find(exc, ssl.SSLError)
    if handshake is not None:
        reason = getattr(handshake, "reason", None)
        why = str(reason).lower().replace("_", " ") if reason else str(handshake).splitlines()[0][:200]
        return f"the TLS handshake failed ({why})"
    return None
