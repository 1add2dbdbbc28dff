"""Tessera's pure core: the license model, file format, signing, Locking ID, clock, protocol.

Nothing here does network or database I/O, so the server and the agent share one
implementation of every rule. Reading the machine's facts for the Locking ID is the only
file access, and it never fails.
"""

from tessera.core.clock import Clock, ManualClock, SystemClock
from tessera.core.errors import (
    BindingError,
    DecryptionError,
    FormatError,
    KeyFileError,
    SignatureError,
    TesseraError,
    UnknownKeyError,
    VerificationError,
    VersionError,
)
from tessera.core.fileformat import SignedDocument, parse, render, serialize_body
from tessera.core.fingerprint import LockingId, collect_facts, locking_id_for, match_locking_ids
from tessera.core.licensekey import generate_license_key, license_key_digest, normalize_license_key
from tessera.core.model import Binding, Entitlement, Identity, License, Location, MatchLevel
from tessera.core.sealing import seal, unseal
from tessera.core.signing import Keyring, PublicKey, SigningKey
from tessera.core.verify import check_binding, check_pair, check_version, load_signed, verify_signature
from tessera.core.versions import VersionRange

__all__ = [
    "Binding",
    "BindingError",
    "Clock",
    "DecryptionError",
    "Entitlement",
    "FormatError",
    "Identity",
    "KeyFileError",
    "Keyring",
    "License",
    "Location",
    "LockingId",
    "ManualClock",
    "MatchLevel",
    "PublicKey",
    "SignatureError",
    "SignedDocument",
    "SigningKey",
    "SystemClock",
    "TesseraError",
    "UnknownKeyError",
    "VerificationError",
    "VersionError",
    "VersionRange",
    "check_binding",
    "check_pair",
    "check_version",
    "collect_facts",
    "generate_license_key",
    "license_key_digest",
    "load_signed",
    "locking_id_for",
    "match_locking_ids",
    "normalize_license_key",
    "parse",
    "render",
    "seal",
    "sign_document",
    "unseal",
    "verify_signature",
]


def sign_document(doc: License | Identity, key: SigningKey) -> str:
    """The complete signed file for ``doc``."""
    return render(doc, key.key_id, key.sign(serialize_body(doc).encode("utf-8")))
