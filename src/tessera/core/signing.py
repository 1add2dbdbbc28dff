"""Vendor signing keys (Ed25519) and the keyring of trusted public keys.

Signing and verifying run on libsodium (PyNaCl): its verify is about twice as fast as
OpenSSL's here, and it is the server's cost per check-in and the agent's per license load.
It is also strict: it refuses non-canonical ``S``, small-order ``R`` and small-order or
non-canonical public keys, where OpenSSL accepts e.g. ``R = identity, S = 0`` under the
identity point as a signature of anything. ``cryptography`` keeps the PKCS#8 key files.

Key ids are the first 16 hex digits of SHA-256 over the raw public key, so an id can be
recomputed from the key alone and a keyring entry cannot claim someone else's id. Private
keys live on disk only as passphrase-encrypted PKCS#8 PEM; the keyring (``vendor.pub``) is a
small text file of ``ed25519 <key-id> <base64>`` lines, several of them during a rotation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Iterator

import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.exceptions import BadSignatureError

from tessera.core.errors import KeyFileError, SignatureError, UnknownKeyError

__all__ = ["KEYRING_HEADER", "Keyring", "PublicKey", "SigningKey", "key_id_of"]

KEYRING_HEADER = "tessera-keyring/1"
_LINE_RE = re.compile(r"^ed25519 ([0-9a-f]{16}) ([A-Za-z0-9+/]{43}=)$")
MAX_KEYRING_SIZE = 64 * 1024
SIGNATURE_SIZE = 64

# The encodings of the points of small order (1, 2, 4, 8), compared with the sign bit
# cleared, including the non-canonical spellings of 0 and 1: libsodium's own list
# (ge25519_has_small_order). No signature verifies under such a key (libsodium refuses
# them), so a key file holding one is refused when it is read instead.
_SMALL_ORDER = frozenset(
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
)
_P = 2**255 - 19


def _check_point_encoding(raw: bytes) -> None:
    """Refuse the public keys libsodium's verify refuses before any arithmetic."""
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if y >= _P:
        raise KeyFileError("not a valid Ed25519 public key (non-canonical encoding)")
    if raw[:31] + bytes([raw[31] & 0x7F]) in _SMALL_ORDER:
        raise KeyFileError("not a valid Ed25519 public key (a point of small order)")


def key_id_of(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


class PublicKey:
    """A trusted Ed25519 public key and its id (immutable; equal when the bytes are)."""

    __slots__ = ("_key", "key_id", "raw")
    raw: bytes
    key_id: str
    _key: nacl.signing.VerifyKey

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes) or len(raw) != 32:
            raise KeyFileError("an Ed25519 public key has 32 bytes")
        _check_point_encoding(raw)
        key = nacl.signing.VerifyKey(raw)
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "key_id", key_id_of(raw))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("PublicKey is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True when ``signature`` is this key's Ed25519 signature of ``data`` (strict rules)."""
        if len(signature) != SIGNATURE_SIZE:
            return False
        try:
            self._key.verify(bytes(data), bytes(signature))
        except BadSignatureError:
            return False
        return True

    def to_base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    @classmethod
    def from_base64(cls, text: str) -> PublicKey:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError("public key is not base64") from None
        return cls(raw)

    def __repr__(self) -> str:
        return f"PublicKey(key_id={self.key_id!r})"


class SigningKey:
    """A private Ed25519 key. Never printed, never written in clear."""

    __slots__ = ("_key", "public")

    def __init__(self, key: nacl.signing.SigningKey) -> None:
        self._key = key
        self.public = PublicKey(bytes(key.verify_key))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(nacl.signing.SigningKey.generate())

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._key.sign(bytes(data)).signature

    def to_pem(self, passphrase: bytes) -> bytes:
        """PKCS#8 PEM, encrypted with ``passphrase`` (which must not be empty)."""
        if not passphrase:
            raise KeyFileError("refusing to write a private key without a passphrase")
        return Ed25519PrivateKey.from_private_bytes(self.to_raw()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )

    def to_raw(self) -> bytes:
        """The 32-byte seed, for callers that encrypt it themselves (agent state)."""
        return bytes(self._key)

    @classmethod
    def from_raw(cls, seed: bytes) -> SigningKey:
        if not isinstance(seed, bytes | bytearray | memoryview) or len(seed) != 32:
            raise KeyFileError("an Ed25519 private key has 32 bytes")
        return cls(nacl.signing.SigningKey(bytes(seed)))

    @classmethod
    def from_pem(cls, data: bytes, passphrase: bytes | None) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(data, password=passphrase or None)
        except TypeError:
            raise KeyFileError("the private key is encrypted: a passphrase is needed") from None
        except ValueError as exc:
            if "password" in str(exc).lower() or "decrypt" in str(exc).lower():
                raise KeyFileError("wrong passphrase for the private key") from None
            raise KeyFileError("not a PEM private key file") from None
        except Exception:  # cryptography raises a few unrelated types for garbage
            raise KeyFileError("not a PEM private key file") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError("not an Ed25519 private key")
        seed = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return cls.from_raw(seed)

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"


class Keyring:
    """The vendor public keys an agent (or verifier) trusts, by key id."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[PublicKey] = ()) -> None:
        self._keys: dict[str, PublicKey] = {}
        for key in keys:
            self._keys[key.key_id] = key

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __iter__(self) -> Iterator[PublicKey]:
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, key_id: str) -> PublicKey:
        try:
            return self._keys[key_id]
        except KeyError:
            raise UnknownKeyError(f"signed by unknown key {key_id} (not in the vendor keyring)") from None

    def add(self, key: PublicKey) -> Keyring:
        return Keyring([*self._keys.values(), key])

    def verify(self, key_id: str, signature: bytes, data: bytes) -> None:
        """Raise unless ``signature`` over ``data`` was made by the key ``key_id``."""
        if not self.get(key_id).verify(signature, data):
            raise SignatureError("signature does not match: the file was altered or forged")

    def dumps(self) -> str:
        lines = [KEYRING_HEADER]
        lines.extend(f"ed25519 {k.key_id} {k.to_base64()}" for k in self._keys.values())
        return "\n".join(lines) + "\n"

    @classmethod
    def loads(cls, data: bytes | str) -> Keyring:
        if isinstance(data, bytes):
            if len(data) > MAX_KEYRING_SIZE:
                raise KeyFileError("keyring file is too large")
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                raise KeyFileError("keyring is not a text file") from None
        lines = data.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not lines or lines[0] != KEYRING_HEADER:
            raise KeyFileError(f"not a vendor keyring (first line must be {KEYRING_HEADER!r})")
        keys: list[PublicKey] = []
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip() or line.startswith("#"):
                continue
            m = _LINE_RE.match(line)
            if not m:
                raise KeyFileError(f"keyring line {number}: expected 'ed25519 <key-id> <base64>'")
            key = PublicKey.from_base64(m.group(2))
            if key.key_id != m.group(1):
                raise KeyFileError(f"keyring line {number}: key id does not match the key")
            keys.append(key)
        if not keys:
            raise KeyFileError("keyring holds no keys")
        return cls(keys)

    def __repr__(self) -> str:
        return f"Keyring({sorted(self._keys)!r})"
