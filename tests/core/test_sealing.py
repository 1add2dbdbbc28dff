from __future__ import annotations

import pytest

from tessera.core import SigningKey, generate_license_key, seal, sign_document, unseal
from tessera.core.errors import DecryptionError
from tessera.core.verify import load_signed

from .test_fileformat import sample

KEY = SigningKey.from_raw(bytes(range(32)))


def test_sealed_license_hides_features_and_opens_with_the_key() -> None:
    license_key = generate_license_key()
    sealed = seal(sample(), license_key)
    text = sign_document(sealed, KEY)
    assert "uniplex" not in text and "[SEALED]" in text
    from tessera.core import Keyring

    signed = load_signed(text, Keyring([KEY.public]))
    opened = unseal(signed.document, license_key)  # type: ignore[arg-type]
    assert opened.locations == sample().locations


def test_wrong_license_key_cannot_open() -> None:
    sealed = seal(sample(), generate_license_key())
    with pytest.raises(DecryptionError, match="wrong license key"):
        unseal(sealed, generate_license_key())


def test_sealed_blob_cannot_move_to_another_serial() -> None:
    key = generate_license_key()
    sealed = seal(sample(), key)
    moved = sealed.evolve(serial="2026-999999")
    with pytest.raises(DecryptionError):
        unseal(moved, key)


def test_license_key_is_normalized_when_typed_sloppily() -> None:
    key = generate_license_key()
    sealed = seal(sample(), key)
    assert unseal(sealed, key.lower().replace("-", " ")).locations == sample().locations
