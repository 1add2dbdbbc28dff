from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.core import Keyring, PublicKey, SigningKey, sign_document
from tessera.core.errors import FormatError, KeyFileError, SignatureError, UnknownKeyError
from tessera.core.fileformat import parse
from tessera.core.verify import load_signed

from .test_fileformat import sample

KEY = SigningKey.from_raw(bytes(range(32)))
OTHER = SigningKey.from_raw(bytes(range(1, 33)))
KEYRING = Keyring([KEY.public])
SIGNED = sign_document(sample(), KEY).encode()
SIGNED_PART = SIGNED.index(b"[SIGNATURE]")


def test_valid_signature_verifies() -> None:
    assert load_signed(SIGNED, KEYRING).document == sample()


@given(st.integers(0, SIGNED_PART - 1), st.integers(1, 255))
def test_any_change_to_any_signed_byte_fails(position: int, xor: int) -> None:
    tampered = bytearray(SIGNED)
    tampered[position] ^= xor
    with pytest.raises((FormatError, SignatureError)):
        load_signed(bytes(tampered), KEYRING)


@given(st.integers(0, SIGNED_PART - 1))
def test_deleting_or_inserting_a_signed_byte_fails(position: int) -> None:
    for tampered in (
        SIGNED[:position] + SIGNED[position + 1 :],
        SIGNED[:position] + b"x" + SIGNED[position:],
    ):
        with pytest.raises((FormatError, SignatureError)):
            load_signed(tampered, KEYRING)


def test_wrong_key_is_unknown() -> None:
    forged = sign_document(sample(), OTHER)
    with pytest.raises(UnknownKeyError, match="unknown key"):
        load_signed(forged, KEYRING)


def test_forged_key_id_fails_signature() -> None:
    forged = sign_document(sample(), OTHER).replace(OTHER.key_id, KEY.key_id)
    with pytest.raises(SignatureError):
        load_signed(forged, KEYRING)


def test_rotation_keyring_trusts_old_and_new_keys() -> None:
    ring = Keyring.loads(Keyring([KEY.public, OTHER.public]).dumps())
    assert len(ring) == 2
    load_signed(sign_document(sample(), KEY), ring)
    load_signed(sign_document(sample(), OTHER), ring)


def test_private_key_pem_is_encrypted_and_round_trips() -> None:
    pem = KEY.to_pem(b"correct horse")
    assert b"ENCRYPTED" in pem
    assert SigningKey.from_pem(pem, b"correct horse").key_id == KEY.key_id
    with pytest.raises(KeyFileError, match="passphrase"):
        SigningKey.from_pem(pem, b"wrong")
    with pytest.raises(KeyFileError, match="passphrase"):
        SigningKey.from_pem(pem, None)
    with pytest.raises(KeyFileError):
        KEY.to_pem(b"")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ed25519 abc def\n",
        "tessera-keyring/1\n",
        "tessera-keyring/1\ned25519 0000000000000000 " + "A" * 43 + "=\n",
        "tessera-keyring/1\nrsa 1234\n",
    ],
)
def test_malformed_keyrings_are_rejected(text: str) -> None:
    with pytest.raises(KeyFileError):
        Keyring.loads(text)


@given(st.binary(max_size=512))
def test_random_keyring_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(KeyFileError):
        Keyring.loads(data)


def test_key_id_is_derived_from_the_key() -> None:
    assert KEY.public.key_id == PublicKey(KEY.public.raw).key_id
    assert KEY.key_id != OTHER.key_id
    assert "key_id" in repr(KEY) and "raw" not in repr(KEY)


def test_garbage_is_a_format_error_not_a_signature_error() -> None:
    with pytest.raises(FormatError):
        load_signed(b"garbage\n", KEYRING)
    with pytest.raises(FormatError):
        parse(SIGNED.replace(b"[SIGNATURE]", b"[SIGNATUR]"))
