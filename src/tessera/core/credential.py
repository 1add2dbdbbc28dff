"""User-bound licenses (the "cloud container"): the credential file and the lease messages.

A user-bound license lives on the server. The person it is issued to gets a **credential
file**: the vendor signs who it is for (serial, product, user id, generation) and the
credential's own Ed25519 public key; the matching private key is in the same file, so the
holder can sign lease requests and nobody else can. The server keeps only the public key
and the generation, never a secret that would let a copy of its database lease anything::

    [CREDENTIAL]
    format = tessera/1
    serial = 2026-000001
    product = cortex
    user-id = ann
    generation = 2
    credential-key = <base64 Ed25519 public key>
    issued = 2026-11-22T10:00:00Z
    [PRIVATE]
    ed25519-seed = <base64, 32 bytes>
    [SIGNATURE]
    key-id = <vendor key id>
    ed25519 = <base64>

The lexical rules (one ``key = value`` per line, LF, no blank lines, canonical form, errors
naming the line) are those of the license format. Re-issuing a credential bumps
``generation`` and registers a new key: the old file stops working at its next request.

Lease messages follow the Connect protocol's style (canonical JSON, nonce): requests are
signed by the credential key, responses by the vendor key and echo the request's nonce.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any, ClassVar

from tessera.core.errors import FormatError, KeyFileError, SignatureError, VerificationError
from tessera.core.fileformat import (
    FORMAT,
    _decode,
    _parse_signature,
    _split_sections,
    format_timestamp,
    parse_timestamp,
)
from tessera.core.model import FEATURE_RE, PRODUCT_RE, SERIAL_RE, _check_timestamp
from tessera.core.protocol import (
    PROTOCOL,
    _fields,
    _load_object,
    _string,
    canonical_json,
    new_nonce,
)
from tessera.core.signing import Keyring, PublicKey, SigningKey

__all__ = [
    "LEASE_ACTIONS",
    "USER_ID_RE",
    "Credential",
    "LeaseRequest",
    "LeaseResponse",
    "SignedCredential",
    "parse_credential",
    "render_credential",
]

#: A user id names a person to the vendor without saying more (``ann``, ``u-1234``).
USER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
LEASE_ACTIONS = ("lease", "renew", "release")
MAX_GENERATION = 10**9

_B64_RE = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")
_LEASE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_GEN_RE = re.compile(r"^[1-9][0-9]{0,8}$")
_KEYS = ("format", "serial", "product", "user-id", "generation", "credential-key", "issued")


def check_user_id(value: str) -> str:
    if not isinstance(value, str) or not USER_ID_RE.match(value):
        raise ValueError(f"invalid user id: {value!r} (1-64 of A-Z a-z 0-9 . _ @ -)")
    return value


@dataclass(frozen=True, slots=True)
class Credential:
    """What the vendor vouches for: this key may lease features of this license for this user."""

    serial: str
    product: str
    user_id: str
    generation: int
    public_key: str
    issued: datetime

    def __post_init__(self) -> None:
        if not isinstance(self.serial, str) or not SERIAL_RE.match(self.serial):
            raise ValueError(f"invalid serial number: {self.serial!r}")
        if not isinstance(self.product, str) or not PRODUCT_RE.match(self.product):
            raise ValueError(f"invalid product code: {self.product!r}")
        check_user_id(self.user_id)
        if isinstance(self.generation, bool) or not 1 <= self.generation <= MAX_GENERATION:
            raise ValueError(f"invalid generation: {self.generation!r}")
        try:
            PublicKey.from_base64(self.public_key)
        except KeyFileError:
            raise ValueError("invalid credential-key: not an Ed25519 public key") from None
        _check_timestamp(self.issued, "issued time")

    def serialize_body(self, seed: bytes) -> str:
        return (
            "[CREDENTIAL]\n"
            f"format = {FORMAT}\n"
            f"serial = {self.serial}\n"
            f"product = {self.product}\n"
            f"user-id = {self.user_id}\n"
            f"generation = {self.generation}\n"
            f"credential-key = {self.public_key}\n"
            f"issued = {format_timestamp(self.issued)}\n"
            "[PRIVATE]\n"
            f"ed25519-seed = {base64.b64encode(seed).decode('ascii')}\n"
        )


@dataclass(frozen=True, slots=True)
class SignedCredential:
    """A parsed credential file: the vouched-for facts, the holder's key, the vendor signature."""

    credential: Credential
    key: SigningKey = field(repr=False)
    body: bytes = field(repr=False)
    key_id: str
    signature: bytes = field(repr=False)

    def verify(self, keyring: Keyring) -> Credential:
        """Raise unless the vendor signed this file (a forged one fails here, before any use)."""
        keyring.verify(self.key_id, self.signature, self.body)
        return self.credential


def render_credential(credential: Credential, seed: bytes, vendor: SigningKey) -> str:
    """The complete credential file (``seed`` is the credential's private key)."""
    if SigningKey.from_raw(seed).public.to_base64() != credential.public_key:
        raise ValueError("the private key does not match the credential-key")
    body = credential.serialize_body(seed)
    sig = base64.b64encode(vendor.sign(body.encode("utf-8"))).decode("ascii")
    return f"{body}[SIGNATURE]\nkey-id = {vendor.key_id}\ned25519 = {sig}\n"


def parse_credential(data: bytes | str) -> SignedCredential:
    """Parse a credential file strictly; errors name the line. The signature is checked by
    :meth:`SignedCredential.verify`."""
    text = _decode(data)
    sections = _split_sections(text)
    want = ["CREDENTIAL", "PRIVATE", "SIGNATURE"]
    for section, name in zip(sections, want, strict=False):
        if section.name != name:
            raise FormatError(f"expected [{name}], found [{section.name}]", section.line)
        if section.arg is not None:
            raise FormatError(f"[{section.name}] takes no name", section.line)
    if len(sections) != len(want):
        if len(sections) > len(want):
            raise FormatError(f"[{sections[3].name}] after [SIGNATURE]", sections[3].line)
        raise FormatError(f"a credential file needs [{want[len(sections)]}] (file truncated?)")
    head, private, signature = sections
    values: dict[str, tuple[str, int]] = {}
    for key, raw, line in head.entries:
        if key not in _KEYS:
            raise FormatError(f"unknown key {key!r} in [CREDENTIAL]", line)
        if key in values:
            raise FormatError(f"duplicate key {key!r} (first on line {values[key][1]})", line)
        values[key] = (raw, line)
    for key in _KEYS:
        if key not in values:
            raise FormatError(f"[CREDENTIAL] lacks the required key {key!r}", head.line)
    if values["format"][0] != FORMAT:
        raise FormatError(f"unsupported format (expected {FORMAT})", values["format"][1])
    if not _GEN_RE.match(values["generation"][0]):
        raise FormatError("generation: not a whole number from 1", values["generation"][1])
    try:
        issued = parse_timestamp(values["issued"][0])
    except ValueError as exc:
        raise FormatError(f"issued: {exc}", values["issued"][1]) from None
    checks = (
        ("serial", SERIAL_RE),
        ("product", PRODUCT_RE),
        ("user-id", USER_ID_RE),
        ("credential-key", _B64_RE),
    )
    for key, pattern in checks:
        raw, line = values[key]
        if not pattern.match(raw):
            raise FormatError(f"{key}: malformed value {raw[:40]!r}", line)
    try:
        credential = Credential(
            values["serial"][0],
            values["product"][0],
            values["user-id"][0],
            int(values["generation"][0]),
            values["credential-key"][0],
            issued,
        )
    except ValueError as exc:
        raise FormatError(str(exc), values["credential-key"][1]) from None
    if [k for k, _, _ in private.entries] != ["ed25519-seed"]:
        raise FormatError("[PRIVATE] must hold exactly 'ed25519-seed'", private.line)
    _, seed_text, seed_line = private.entries[0]
    try:
        seed = base64.b64decode(seed_text, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError("ed25519-seed is not base64", seed_line) from None
    if len(seed) != 32:
        raise FormatError("ed25519-seed must be 32 bytes", seed_line)
    holder = SigningKey.from_raw(seed)
    if holder.public.to_base64() != credential.public_key:
        raise FormatError("the private key does not belong to the credential-key", seed_line)
    key_id, sig = _parse_signature(signature)
    body_text = text[: text.index("\n[SIGNATURE]\n") + 1]
    expected = credential.serialize_body(seed)
    if body_text != expected:
        for number, (got, exp) in enumerate(
            zip(body_text.split("\n"), expected.split("\n"), strict=False), start=1
        ):
            if got != exp:
                raise FormatError(f"not in canonical form (expected {exp[:70]!r})", number)
        raise FormatError("not in canonical form")
    return SignedCredential(credential, holder, body_text.encode("utf-8"), key_id, sig)


# ---------------------------------------------------------------------------- lease messages


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """Lease, renew (heartbeat) or release one feature of a user-bound license.

    Signed by the credential key. ``lease_id`` is empty for ``lease`` (the server picks it).
    Carries nothing personal beyond the credential's user id.
    """

    TYPE: ClassVar[str] = "lease"
    action: str
    serial: str
    user_id: str
    generation: int
    feature: str
    lease_id: str
    nonce: str
    sent: str
    signature: str = ""

    def payload(self) -> dict[str, Any]:
        obj = asdict(self)
        obj.pop("signature")
        obj["protocol"] = PROTOCOL
        obj["type"] = self.TYPE
        return obj

    def to_json(self) -> bytes:
        obj = self.payload()
        obj["signature"] = self.signature
        return canonical_json(obj)

    @classmethod
    def create(
        cls,
        action: str,
        credential: SignedCredential,
        feature: str,
        now: datetime,
        lease_id: str = "",
    ) -> LeaseRequest:
        """``now`` is sent along: the server refuses requests far from its own time, so a
        recorded request cannot be replayed after the server forgot its nonce."""
        c = credential.credential
        unsigned = cls(
            action,
            c.serial,
            c.user_id,
            c.generation,
            feature,
            lease_id,
            new_nonce(),
            format_timestamp(now),
        )
        sig = _b64(credential.key.sign(canonical_json(unsigned.payload())))
        return cls(**{**asdict(unsigned), "signature": sig})

    @property
    def sent_at(self) -> datetime:
        return parse_timestamp(self.sent)

    def verify_with(self, public_key: str) -> None:
        try:
            key = PublicKey.from_base64(public_key)
            signature = base64.b64decode(self.signature, validate=True)
        except (KeyFileError, binascii.Error, ValueError):
            raise SignatureError("lease request signature is malformed") from None
        if not key.verify(signature, canonical_json(self.payload())):
            raise SignatureError("lease request is not signed by the credential's key")

    @classmethod
    def from_json(cls, data: bytes | str | Mapping[str, Any]) -> LeaseRequest:
        """Parse only; the server verifies with the registered key (:meth:`verify_with`)."""
        obj = _load_object(data, "lease request")
        names = {"protocol", "type", "action", "serial", "user_id", "generation", "feature"}
        _fields(obj, names | {"lease_id", "nonce", "sent", "signature"}, set(), "lease request")
        if obj["type"] != cls.TYPE:
            raise FormatError("not a lease request")
        action = obj["action"]
        if action not in LEASE_ACTIONS:
            raise FormatError("field 'action' must be lease, renew or release")
        _string(obj, "serial", SERIAL_RE)
        _string(obj, "user_id", USER_ID_RE)
        _string(obj, "feature", FEATURE_RE)
        _string(obj, "nonce", _NONCE_RE)
        _string(obj, "signature", _B64_RE)
        try:
            parse_timestamp(_string(obj, "sent"))
        except ValueError:
            raise FormatError("field 'sent' is malformed") from None
        generation = obj["generation"]
        if (
            not isinstance(generation, int)
            or isinstance(generation, bool)
            or not 1 <= generation <= MAX_GENERATION
        ):
            raise FormatError("field 'generation' is malformed")
        lease_id = _string(obj, "lease_id")
        if action == "lease" and lease_id != "":
            raise FormatError("field 'lease_id' must be empty when leasing")
        if action != "lease" and not _LEASE_ID_RE.match(lease_id):
            raise FormatError("field 'lease_id' is malformed")
        del obj["protocol"], obj["type"]
        return cls(**obj)


@dataclass(frozen=True, slots=True)
class LeaseResponse:
    """The vendor-signed answer: the lease, its expiry and how many are in use."""

    TYPE: ClassVar[str] = "lease"
    action: str
    nonce: str
    server_time: datetime
    serial: str
    feature: str
    lease_id: str
    expires: datetime | None
    in_use: int
    count: int
    key_id: str = field(default="", repr=False)
    signature: str = field(default="", repr=False)

    def payload(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL,
            "type": self.TYPE,
            "action": self.action,
            "nonce": self.nonce,
            "server_time": format_timestamp(self.server_time),
            "serial": self.serial,
            "feature": self.feature,
            "lease_id": self.lease_id,
            "expires": None if self.expires is None else format_timestamp(self.expires),
            "in_use": self.in_use,
            "count": self.count,
        }

    def signed(self, key: SigningKey) -> LeaseResponse:
        sig = _b64(key.sign(canonical_json(self.payload())))
        return replace(self, key_id=key.key_id, signature=sig)

    def to_json(self) -> bytes:
        obj = self.payload()
        obj["key_id"] = self.key_id
        obj["signature"] = self.signature
        return canonical_json(obj)

    @classmethod
    def from_json(
        cls, data: bytes | str | Mapping[str, Any], keyring: Keyring, expected_nonce: str
    ) -> LeaseResponse:
        """Parse, verify the vendor signature and that it answers *this* request."""
        obj = _load_object(data, "lease response")
        names = {"protocol", "type", "action", "nonce", "server_time", "serial", "feature"}
        names |= {"lease_id", "expires", "in_use", "count", "key_id", "signature"}
        _fields(obj, names, set(), "lease response")
        if obj["type"] != cls.TYPE or obj["action"] not in LEASE_ACTIONS:
            raise FormatError("not a lease response")
        for name in ("in_use", "count"):
            value = obj[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise FormatError(f"field {name!r} is malformed")
        try:
            server_time = parse_timestamp(_string(obj, "server_time"))
            expires = None if obj["expires"] is None else parse_timestamp(_string(obj, "expires"))
        except ValueError:
            raise FormatError("a time field is malformed") from None
        signature = _string(obj, "signature", _B64_RE)
        response = cls(
            obj["action"],
            _string(obj, "nonce", _NONCE_RE),
            server_time,
            _string(obj, "serial", SERIAL_RE),
            _string(obj, "feature", FEATURE_RE),
            _string(obj, "lease_id"),
            expires,
            obj["in_use"],
            obj["count"],
            _string(obj, "key_id"),
            signature,
        )
        try:
            raw_sig = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raise FormatError("signature is not base64") from None
        keyring.verify(response.key_id, raw_sig, canonical_json(response.payload()))
        if response.nonce != expected_nonce:
            raise VerificationError("response does not answer this request (replayed?)")
        return response
