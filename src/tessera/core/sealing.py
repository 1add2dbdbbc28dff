"""Optional encryption of a license's entitlement sections ("sealing").

A sealed license tells nothing about its features on a machine that does not hold the
license key: the locations are AES-256-GCM encrypted under a key derived (HKDF-SHA256) from
the license key and the binding, with serial and product as associated data so a sealed
blob cannot be moved to another license. The signature still covers the ciphertext.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tessera.core.errors import DecryptionError, FormatError
from tessera.core.fileformat import parse_locations, serialize_locations
from tessera.core.licensekey import normalize_license_key
from tessera.core.model import License

__all__ = ["seal", "unseal"]

_INFO = b"tessera/1 entitlements"


def _key(lic: License, license_key: str) -> bytes:
    try:
        normalized = normalize_license_key(license_key)
    except ValueError as exc:
        raise DecryptionError(str(exc)) from None
    binding = lic.locking_id or lic.instance_id or lic.user_id or ""
    salt = hashlib.sha256(f"{lic.serial}|{lic.binding.value}|{binding}".encode()).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO).derive(
        normalized.encode("ascii")
    )


def _aad(lic: License) -> bytes:
    return f"{lic.serial}|{lic.product}".encode()


def seal(lic: License, license_key: str) -> License:
    """The same license with its locations encrypted; sign the result, not the input."""
    if lic.sealed is not None:
        return lic
    nonce = os.urandom(12)
    plaintext = serialize_locations(lic.locations).encode("utf-8")
    blob = nonce + AESGCM(_key(lic, license_key)).encrypt(nonce, plaintext, _aad(lic))
    return lic.evolve(locations=(), sealed=base64.b64encode(blob).decode("ascii"))


def unseal(lic: License, license_key: str) -> License:
    """The license with its locations in clear; ``DecryptionError`` for a wrong key."""
    if lic.sealed is None:
        return lic
    try:
        blob = base64.b64decode(lic.sealed, validate=True)
    except (binascii.Error, ValueError):
        raise DecryptionError("sealed entitlements are not base64") from None
    if len(blob) < 12 + 16:
        raise DecryptionError("sealed entitlements are truncated")
    try:
        plaintext = AESGCM(_key(lic, license_key)).decrypt(blob[:12], blob[12:], _aad(lic))
    except InvalidTag:
        raise DecryptionError("cannot open the sealed entitlements: wrong license key") from None
    try:
        locations = parse_locations(plaintext.decode("utf-8"))
    except (FormatError, UnicodeDecodeError) as exc:
        raise DecryptionError(f"sealed entitlements are malformed: {exc}") from None
    return lic.evolve(sealed=None, locations=locations)
