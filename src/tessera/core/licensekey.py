"""License keys: the secret a customer types in, e.g. ``K7QXM-2VDRT-9HFNA-PC4WE-8BZJY``.

25 symbols of Crockford base32 (125 bits). Input is forgiving (case, dashes, spaces and the
look-alikes O/I/L are folded) because people type these; storage is not: the server keeps
only an HMAC of the normalized key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

__all__ = ["generate_license_key", "license_key_digest", "normalize_license_key"]

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_FOLD = str.maketrans({"O": "0", "I": "1", "L": "1"})
_LENGTH = 25
#: The normalized spelling itself: such input needs no folding (the fast, common case).
_CANONICAL_RE = re.compile(r"[0-9A-HJKMNP-TV-Z]{5}(?:-[0-9A-HJKMNP-TV-Z]{5}){4}")


def generate_license_key() -> str:
    """125 random bits from the OS, 5 per symbol (uniform: the alphabet has 32 symbols).

    One ``token_bytes`` call instead of 25 ``secrets.choice`` calls: a bulk issue of 100,000
    licenses makes 100,000 keys, and this is several times cheaper.
    """
    bits = int.from_bytes(secrets.token_bytes(16), "big") >> 3  # 128 -> 125 bits
    raw = "".join(_ALPHABET[(bits >> (5 * i)) & 31] for i in range(_LENGTH))
    return "-".join(raw[i : i + 5] for i in range(0, _LENGTH, 5))


def normalize_license_key(text: str) -> str:
    """Canonical spelling (grouped, upper case); ``ValueError`` if it cannot be a key."""
    if not isinstance(text, str) or len(text) > 100:
        raise ValueError("not a license key")
    if _CANONICAL_RE.fullmatch(text):
        return text
    raw = "".join(text.split()).replace("-", "").upper().translate(_FOLD)
    if len(raw) != _LENGTH or any(ch not in _ALPHABET for ch in raw):
        raise ValueError("not a license key (expected 25 letters and digits, e.g. XXXXX-XXXXX-...)")
    return "-".join(raw[i : i + 5] for i in range(0, _LENGTH, 5))


def license_key_digest(key: str, pepper: bytes = b"") -> str:
    """What the server stores and looks keys up by: HMAC-SHA256(pepper, normalized key)."""
    return hmac.digest(pepper, normalize_license_key(key).encode("ascii"), hashlib.sha256).hex()
