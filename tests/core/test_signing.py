from __future__ import annotations

import base64
import contextlib

import nacl.signing
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from tessera.core import Keyring, PublicKey, SigningKey, sign_document
from tessera.core.errors import FormatError, KeyFileError, SignatureError, UnknownKeyError
from tessera.core.fileformat import parse
from tessera.core.signing import key_id_of
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


# The eight points of small order and the non-canonical spellings of 0 and 1 (RFC 8032
# section 5.1.3 decoding; libsodium refuses all of them as public keys).
SMALL_ORDER_KEYS = [
    bytes(32),
    b"\x01" + bytes(31),
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    bytes.fromhex("ec" + "ff" * 30 + "7f"),
    bytes.fromhex("ed" + "ff" * 30 + "7f"),
    bytes.fromhex("ee" + "ff" * 30 + "7f"),
]


@pytest.mark.parametrize("raw", SMALL_ORDER_KEYS + [k[:31] + bytes([k[31] | 0x80]) for k in SMALL_ORDER_KEYS])
def test_small_order_public_keys_are_refused(raw: bytes) -> None:
    with pytest.raises(KeyFileError, match="not a valid Ed25519 public key"):
        PublicKey(raw)
    with pytest.raises(KeyFileError):
        Keyring.loads(f"tessera-keyring/1\ned25519 {key_id_of(raw)} {base64.b64encode(raw).decode()}\n")


@pytest.mark.parametrize("raw", [bytes([0xEF + i]) + b"\xff" * 30 + b"\x7f" for i in range(0x11)])
def test_non_canonical_public_keys_are_refused(raw: bytes) -> None:
    with pytest.raises(KeyFileError, match="non-canonical"):
        PublicKey(raw)


def test_signatures_are_plain_ed25519_interoperable_with_openssl() -> None:
    """libsodium signs, OpenSSL verifies, and the other way round; the PEM is standard."""
    openssl = Ed25519PrivateKey.from_private_bytes(KEY.to_raw())
    data = b"any message"
    assert KEY.sign(data) == openssl.sign(data)  # Ed25519 is deterministic
    openssl.public_key().verify(KEY.sign(data), data)
    assert KEY.public.verify(openssl.sign(data), data)
    loaded = serialization.load_pem_private_key(KEY.to_pem(b"pw"), password=b"pw")
    assert isinstance(loaded, Ed25519PrivateKey)
    assert loaded.public_key().public_bytes_raw() == KEY.public.raw


def test_the_identity_key_forgery_is_refused() -> None:
    """R = identity, S = 0 "signs" anything under a small-order key in lenient verifiers."""
    identity = b"\x01" + bytes(31)
    key = object.__new__(PublicKey)  # bypass the constructor's refusal: test verify alone
    object.__setattr__(key, "raw", identity)
    object.__setattr__(key, "_key", nacl.signing.VerifyKey(identity))
    assert not key.verify(identity + bytes(32), b"anything")


@pytest.mark.parametrize("length", [0, 63, 65])
def test_a_signature_of_the_wrong_length_is_false_not_an_exception(length: int) -> None:
    assert not KEY.public.verify(KEY.sign(b"m")[:length].ljust(length, b"\0"), b"m")


def test_a_non_canonical_s_is_refused() -> None:
    """S + L is the same scalar as S; a strict verifier accepts only S < L."""
    data = b"message"
    sig = KEY.sign(data)
    order = 2**252 + 27742317777372353535851937790883648493
    s = int.from_bytes(sig[32:], "little") + order
    assert s < 2**256
    assert KEY.public.verify(sig, data)
    assert not KEY.public.verify(sig[:32] + s.to_bytes(32, "little"), data)
