"""Every trust check a license file must pass before the agent enforces it.

Run on import (a file that fails leaves the old license in force) and again on every open
(a stored file that fails now is *broken* when only the machine changed, *invalid* when the
file or the state around it was altered).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from tessera.core.errors import BindingError, DecryptionError, FormatError, VerificationError, shown
from tessera.core.fileformat import SignedDocument
from tessera.core.model import Binding, Identity, License, Location
from tessera.core.sealing import unseal
from tessera.core.signing import Keyring
from tessera.core.verify import check_binding, check_pair, check_version, load_signed

__all__ = ["Installation", "VerifiedLicense", "verify_identity", "verify_license"]


@dataclass(frozen=True, slots=True)
class Installation:
    """What this installation is, against which every file is checked."""

    keyring: Keyring
    product: str | None
    product_version: str | None
    locking_id: str
    location: str | None = None


@dataclass(frozen=True, slots=True)
class VerifiedLicense:
    """A license that passed every check here, with the one location this installation uses."""

    license: License
    location: Location
    text: str


def _signed(text: str, keyring: Keyring) -> SignedDocument:
    return load_signed(text.encode("utf-8"), keyring)


def verify_identity(text: str, inst: Installation) -> Identity:
    signed = _signed(text, inst.keyring)
    doc = signed.document
    if not isinstance(doc, Identity):
        raise FormatError("expected an identity file (.par), got a license file")
    _check_product(doc, inst)
    if inst.product_version is not None:
        check_version(doc, inst.product_version)
    return doc


def _check_product(doc: License | Identity, inst: Installation) -> None:
    if inst.product is not None and doc.product != inst.product:
        raise VerificationError(
            f"license {doc.serial} is for product {shown(doc.product)}, this is {inst.product!r}"
        )


def verify_license(
    text: str,
    inst: Installation,
    *,
    identity: Identity | None,
    agent_key: str | None,
    license_key: str | None,
) -> VerifiedLicense:
    """Signature, product, version range, binding, agent key, location; raise if any fails."""
    signed = _signed(text, inst.keyring)
    lic = signed.document
    if not isinstance(lic, License):
        raise FormatError("expected a license file (.lic), got an identity file")
    _check_product(lic, inst)
    if inst.product_version is not None:
        check_version(lic, inst.product_version)
    if lic.binding is Binding.MACHINE:
        check_binding(lic, inst.locking_id)
    elif lic.binding is Binding.INSTANCE:
        if identity is None:
            raise BindingError(
                f"license {lic.serial} is instance-bound: import its identity file (.par) first"
            )
    else:
        raise BindingError(
            f"license {lic.serial} is user-bound: it is used through a credential, not installed"
        )
    if lic.binding is Binding.INSTANCE or (identity is not None and identity.serial == lic.serial):
        assert identity is not None  # checked above for instance binding
        check_pair(identity, lic)
    if lic.agent_key is not None and lic.agent_key != agent_key:
        raise BindingError(f"license {lic.serial} was activated by another installation (agent key differs)")
    if lic.sealed is not None:
        if license_key is None:
            raise DecryptionError(f"license {lic.serial} is sealed: activate with its license key first")
        lic = unseal(lic, license_key)
    wanted = inst.location or (identity.location if identity is not None else None)
    try:
        location = lic.location(wanted)
    except KeyError:
        raise VerificationError(
            f"license {lic.serial} has no location {shown(wanted)} for this installation"
        ) from None
    return VerifiedLicense(lic, location, text)


def all_expired(verified: VerifiedLicense, today: date) -> bool:
    ents = verified.location.entitlements
    return bool(ents) and not any(e.valid_on(today) for e in ents)
