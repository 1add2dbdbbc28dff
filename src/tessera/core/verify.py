"""Trust checks on parsed documents: signature, binding, version, expiry, part matching.

Parsing (:mod:`tessera.core.fileformat`) answers "is this a well-formed file?"; this module
answers "may it be trusted here, now?". Each check raises a :class:`VerificationError`
subclass whose message a customer's administrator can act on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from tessera.core.errors import BindingError, FormatError, VerificationError, VersionError
from tessera.core.fileformat import SignedDocument, parse
from tessera.core.fingerprint import MatchResult, match_locking_ids
from tessera.core.model import Binding, Identity, License
from tessera.core.signing import Keyring

__all__ = [
    "check_binding",
    "check_pair",
    "check_version",
    "expired_features",
    "load_signed",
    "verify_signature",
]


def verify_signature(signed: SignedDocument, keyring: Keyring) -> None:
    """Raise :class:`UnknownKeyError` or :class:`SignatureError` unless the vendor signed it."""
    keyring.verify(signed.key_id, signed.signature, signed.body)


def load_signed(data: bytes | str, keyring: Keyring) -> SignedDocument:
    """Parse and verify the signature in one step (the usual entry point)."""
    signed = parse(data)
    verify_signature(signed, keyring)
    return signed


def check_binding(lic: License, locking_id: str) -> MatchResult:
    """Raise :class:`BindingError` unless ``locking_id`` matches a machine-bound license."""
    if lic.binding is not Binding.MACHINE or lic.locking_id is None:
        raise BindingError(f"license {lic.serial} is {lic.binding.value}-bound, not machine-bound")
    try:
        result = match_locking_ids(lic.locking_id, locking_id, lic.match)
    except ValueError as exc:
        raise FormatError(f"--locking-id: {exc}") from None
    if not result.ok:
        raise BindingError(f"license {lic.serial} belongs to another machine ({result})")
    return result


def check_version(doc: License | Identity, product_version: str) -> None:
    try:
        ok = doc.version.contains(product_version)
    except ValueError as exc:
        raise VersionError(str(exc)) from None
    if not ok:
        raise VersionError(
            f"license {doc.serial} is for {doc.product} {doc.version}, not version {product_version}"
        )


def check_pair(identity: Identity, lic: License) -> None:
    """The identity part and the feature part must describe the same license."""
    for what, a, b in (
        ("licensee", identity.licensee, lic.licensee),
        ("serial", identity.serial, lic.serial),
        ("product", identity.product, lic.product),
    ):
        if a != b:
            raise VerificationError(f"identity and license disagree on {what}: {a!r} vs {b!r}")
    if lic.binding is Binding.INSTANCE and lic.instance_id != identity.instance_id:
        raise BindingError("license is bound to another instance than this identity file")
    if lic.locations and identity.location not in {loc.name for loc in lic.locations}:
        raise VerificationError(f"license has no location {identity.location!r} of this identity")


@dataclass(frozen=True, slots=True)
class ExpiryReport:
    valid: tuple[str, ...]
    expired: tuple[str, ...]


def expired_features(lic: License, today: date) -> ExpiryReport:
    valid: list[str] = []
    expired: list[str] = []
    for loc in lic.locations:
        for e in loc.entitlements:
            (valid if e.valid_on(today) else expired).append(f"{loc.name}/{e.feature}")
    return ExpiryReport(tuple(valid), tuple(expired))
