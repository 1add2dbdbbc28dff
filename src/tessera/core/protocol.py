"""The Connect wire protocol ``tessera-connect/1``: what agent and server say to each other.

Messages are JSON objects. Each is signed over its *canonical* JSON (sorted keys, no
whitespace, ASCII) without the signature fields:

* requests (activation, check-in, the offline request file) by the agent's own Ed25519 key,
  made at activation; an activation request carries that public key and so proves
  possession of it;
* or, for check-ins, by an HMAC-SHA256 with the installation's *check-in key*: the server
  derives it from its own secret and the registered agent key (so it stores nothing new),
  and hands it over once, in the activation response, sealed to the agent's key. Only the
  server and that installation know it, so it authenticates the agent as well as a
  signature does, for a fortieth of the server's cost (check-ins are most of its work);
* responses by the vendor key, and they echo the request's nonce, so a recorded response
  cannot be replayed to another request. Responses stay asymmetric: an agent must not be
  able to forge its own server's answers.

A request carries only what the spec allows on the wire: Locking ID, system ID, license
key, nonce and signature (plus the agent's public key and its product code when activating).
No user names, host names or addresses. ``docs/protocol.md`` is the prose version of this module.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Final

import orjson
from nacl.bindings import crypto_sign_ed25519_pk_to_curve25519
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey as _BoxPrivateKey
from nacl.public import PublicKey as _BoxPublicKey
from nacl.public import SealedBox
from nacl.signing import SigningKey as _NaclSigningKey

from tessera.core import merkle
from tessera.core.errors import FormatError, KeyFileError, SignatureError, VerificationError
from tessera.core.fileformat import KEY_ID_RE, format_timestamp, parse_timestamp
from tessera.core.fingerprint import LockingId
from tessera.core.licensekey import normalize_license_key
from tessera.core.model import MAX_COUNT, PRODUCT_RE, SERIAL_RE
from tessera.core.signing import Keyring, PublicKey, SigningKey

__all__ = [
    "AGENT_KEY_CACHE_SIZE",
    "DIRECTIVES",
    "MAX_MESSAGE_SIZE",
    "MAX_REVISION",
    "PROTOCOL",
    "ActivationRequest",
    "CheckinRequest",
    "ServerResponse",
    "canonical_json",
    "derive_checkin_key",
    "new_nonce",
    "new_system_id",
    "open_checkin_key",
    "seal_checkin_key",
    "sign_batch",
]

PROTOCOL = "tessera-connect/1"
#: ``CheckinRequest.accept``: the agent takes an answer signed as part of a batch.
BATCH = "batch"
#: ``CheckinRequest.revision`` at most: what a license's revision can be (``model.MAX_COUNT``).
MAX_REVISION = MAX_COUNT
MAX_MESSAGE_SIZE = 1024 * 1024
#: What a server may tell an agent to do: ``lock`` (honeypot: stop everything, a blacklisted
#: container), ``revoke`` (this license is withdrawn here).
DIRECTIVES = ("lock", "revoke")

_NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")
_SYSTEM_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_B64_RE = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_MAC_RE = re.compile(r"^[A-Za-z0-9+/]{43}=$")  # 32 bytes


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, ASCII only: the bytes every signature and MAC covers.

    The definition is the standard library's ``json.dumps(sort_keys=True,
    separators=(",", ":"), ensure_ascii=True)``. orjson writes the same bytes for what
    protocol messages hold (strings, integers, booleans, null, lists and objects with
    string keys) as long as its output is ASCII without DEL (``\\x7f``, which only
    ``ensure_ascii`` escapes) and there is no float (whose shortest forms differ); it costs
    a fifteenth, and the server builds two canonical texts per check-in. Anything else
    takes the definition itself. ``tests/core/test_protocol.py`` checks both agree.
    """
    if _orjson_safe(obj):
        try:
            out = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # a non-string key, an integer over 64 bits: the definition decides
            pass
        else:
            if out.isascii() and b"\x7f" not in out:
                return out
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _orjson_safe(value: Any) -> bool:
    """No floats and no types orjson knows but json does not (datetimes, dataclasses...).

    One loop per container, scalars checked in line: protocol messages are flat objects of
    strings, and this runs on every canonical text the server makes (three per check-in).
    """
    kind = type(value)
    if kind in _JSON_SCALARS:
        return True
    if kind is dict:
        items = value.values()
    elif kind is list or kind is tuple:
        items = value
    else:
        return False
    for item in items:  # noqa: SIM110 (a loop: all() over a generator costs a third more)
        if type(item) not in _JSON_SCALARS and not _orjson_safe(item):
            return False
    return True


_JSON_SCALARS: Final = frozenset({str, int, bool, type(None)})


CHECKIN_KEY_SIZE = 32
_CHECKIN_KEY_CONTEXT = b"tessera-connect/1 checkin key\0"


def derive_checkin_key(server_secret: bytes, agent_key: str) -> bytes:
    """The check-in key of the installation registered with ``agent_key`` (base64).

    Bound to the agent key, so a new activation with a new key gets a new check-in key and
    the server never stores one.
    """
    return hmac.digest(server_secret, _CHECKIN_KEY_CONTEXT + agent_key.encode("ascii"), hashlib.sha256)


def seal_checkin_key(checkin_key: bytes, agent_key: PublicKey) -> str:
    """``checkin_key`` readable only by the holder of ``agent_key``'s private key.

    A libsodium sealed box to the X25519 form of the agent's Ed25519 key, so the key is not
    in clear even where TLS is terminated on the way.
    """
    box_key = _x25519_public(agent_key.raw)
    if box_key is None:
        raise FormatError("the agent key is not a usable Ed25519 public key (it has a small-order part)")
    return _b64(SealedBox(_BoxPublicKey(box_key)).encrypt(checkin_key))


#: How many agent keys' X25519 forms :func:`_x25519_public` keeps (about 100 bytes each).
AGENT_KEY_CACHE_SIZE: Final = 4096


@functools.lru_cache(maxsize=AGENT_KEY_CACHE_SIZE)
def _x25519_public(ed25519_public: bytes) -> bytes | None:
    """The X25519 form of an Ed25519 public key; None unless the point is in the
    prime-order group.

    An agent's own key always is. A crafted key with a small-order part still verifies its
    own request half the time, but cannot be sealed to, so an activation request with one
    is refused when it is parsed (:func:`_check_agent_key`), before the server does any
    work for it. libsodium proves the group with a scalar multiplication (about 45 us);
    cached, the proof at parsing is the conversion the answer's sealing then reuses.
    """
    try:
        return crypto_sign_ed25519_pk_to_curve25519(ed25519_public)
    except (CryptoError, RuntimeError, ValueError):
        return None


def _check_agent_key(text: str) -> None:
    # Malformed, so a FormatError (422 naming the field), not a bad signature (403).
    try:
        key = PublicKey.from_base64(text)
    except KeyFileError as exc:
        raise FormatError(f"field 'agent_key' is not an Ed25519 public key ({exc})") from None
    if _x25519_public(key.raw) is None:
        raise FormatError("field 'agent_key' is not a usable Ed25519 public key (it has a small-order part)")


def open_checkin_key(sealed: str, agent: SigningKey) -> bytes:
    """The check-in key sealed to ``agent``; ``FormatError`` if it is not one."""
    box_key: _BoxPrivateKey = _NaclSigningKey(agent.to_raw()).to_curve25519_private_key()
    try:
        key = SealedBox(box_key).decrypt(_unb64(sealed, "checkin_key"))
    except CryptoError:
        raise FormatError("field 'checkin_key' is not sealed to this agent's key") from None
    if len(key) != CHECKIN_KEY_SIZE:
        raise FormatError("field 'checkin_key' is malformed")
    return key


def _mac(checkin_key: bytes, payload: bytes) -> str:
    return _b64(hmac.digest(checkin_key, payload, hashlib.sha256))


def new_nonce() -> str:
    return base64.urlsafe_b64encode(os.urandom(16)).decode("ascii").rstrip("=")


def new_system_id() -> str:
    """A random installation id: identifies the installation, says nothing about anyone."""
    return base64.urlsafe_b64encode(os.urandom(12)).decode("ascii")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{what} is not base64") from None


def _load_object(data: bytes | str | Mapping[str, Any], what: str) -> dict[str, Any]:
    if isinstance(data, Mapping):
        return dict(data)
    if len(data) > MAX_MESSAGE_SIZE:
        raise FormatError(f"{what} is too large")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:  # also invalid UTF-8, lone surrogates, NaN, nesting over 1024
        raise FormatError(f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{what} must be a JSON object")
    return obj


def _fields(obj: dict[str, Any], required: set[str], optional: set[str], what: str) -> None:
    missing = required - obj.keys()
    if missing:
        raise FormatError(f"{what} lacks field {sorted(missing)[0]!r}")
    unknown = obj.keys() - required - optional
    if unknown:
        raise FormatError(f"{what} has unknown field {sorted(unknown)[0]!r}")
    if obj.get("protocol") != PROTOCOL:
        raise FormatError(f"{what}: unsupported protocol (expected {PROTOCOL})")


def _string(obj: dict[str, Any], name: str, pattern: re.Pattern[str] | None = None) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
        raise FormatError(f"field {name!r} is malformed")
    return value


def _check_common(obj: dict[str, Any]) -> None:
    try:
        normalize_license_key(_string(obj, "license_key"))
    except ValueError:
        raise FormatError("field 'license_key' is malformed") from None
    try:
        LockingId.check(_string(obj, "locking_id"))
    except ValueError:
        raise FormatError("field 'locking_id' is malformed") from None
    _string(obj, "system_id", _SYSTEM_ID_RE)
    _string(obj, "nonce", _NONCE_RE)


@dataclass(frozen=True, slots=True)
class _AgentRequest:
    TYPE: ClassVar[str] = ""
    #: The fields the signature or MAC covers: all but the proof itself.
    COVERED: ClassVar[tuple[str, ...]] = ("license_key", "locking_id", "system_id", "nonce")
    #: Optional covered fields: left out of the message when empty (older agents).
    OMITTED_IF_EMPTY: ClassVar[tuple[str, ...]] = ()
    license_key: str
    locking_id: str
    system_id: str
    nonce: str
    signature: str

    def payload(self) -> dict[str, Any]:
        obj = {name: getattr(self, name) for name in self.COVERED}
        for name in self.OMITTED_IF_EMPTY:
            if not obj[name]:
                del obj[name]
        obj["protocol"] = PROTOCOL
        obj["type"] = self.TYPE
        return obj

    def to_json(self) -> bytes:
        obj = self.payload()
        obj["signature"] = self.signature
        return canonical_json(obj)

    def verify_with(self, agent_key: PublicKey | str) -> None:
        key = PublicKey.from_base64(agent_key) if isinstance(agent_key, str) else agent_key
        if not key.verify(_unb64(self.signature, "signature"), canonical_json(self.payload())):
            raise SignatureError("request signature does not match the agent's key")


@dataclass(frozen=True, slots=True)
class ActivationRequest(_AgentRequest):
    """Online activation, and the offline request file: self-signed by the new agent key.

    ``product`` names the product the agent runs in, so the server refuses a key for
    another product before it takes a machine slot (the agent would reject that license
    file anyway, with the slot gone). Empty for the generic agent, which adopts the product
    of the first license it accepts, and in requests of older agents.
    """

    TYPE: ClassVar[str] = "activate"
    COVERED: ClassVar[tuple[str, ...]] = (*_AgentRequest.COVERED, "agent_key", "product")
    OMITTED_IF_EMPTY: ClassVar[tuple[str, ...]] = ("product",)
    agent_key: str = ""
    product: str = ""

    @classmethod
    def create(
        cls,
        license_key: str,
        locking_id: str,
        system_id: str,
        agent: SigningKey,
        product: str | None = None,
    ) -> ActivationRequest:
        unsigned = cls(
            normalize_license_key(license_key),
            locking_id,
            system_id,
            new_nonce(),
            "",
            agent.public.to_base64(),
            product or "",
        )
        sig = agent.sign(canonical_json(unsigned.payload()))
        return cls(**{**asdict(unsigned), "signature": _b64(sig)})

    @classmethod
    def from_json(cls, data: bytes | str | Mapping[str, Any]) -> ActivationRequest:
        """Parse and check the self-signature; ``FormatError``/``SignatureError`` if bad."""
        obj = _load_object(data, "activation request")
        names = {"protocol", "type", "license_key", "locking_id", "system_id", "nonce", "agent_key"}
        _fields(obj, names | {"signature"}, {"product"}, "activation request")
        if obj["type"] != cls.TYPE:
            raise FormatError("not an activation request")
        _check_common(obj)
        if "product" in obj:
            _string(obj, "product", PRODUCT_RE)
        _check_agent_key(_string(obj, "agent_key", _B64_RE))
        _string(obj, "signature", _B64_RE)
        del obj["protocol"], obj["type"]
        request = cls(**obj)
        request.verify_with(request.agent_key)
        return request


@dataclass(frozen=True, slots=True)
class CheckinRequest(_AgentRequest):
    """Periodic validation: a MAC with the installation's check-in key (``mac``) or, before
    the agent has one (activated offline), a signature by its registered agent key.

    ``accept`` is ``"batch"`` when the agent takes an answer signed as part of a batch
    (:func:`sign_batch`); covered by the MAC, so nobody on the way can change what the
    agent accepts. ``revision`` is the revision of the license file the agent has in
    force, so the server sends a newer one again when the answer that carried it was lost
    on the way. Both are left out (empty, 0) in requests of older agents, whose bytes stay
    as they were.
    """

    TYPE: ClassVar[str] = "checkin"
    COVERED: ClassVar[tuple[str, ...]] = (*_AgentRequest.COVERED, "accept", "revision")
    OMITTED_IF_EMPTY: ClassVar[tuple[str, ...]] = ("accept", "revision")
    mac: str = ""
    accept: str = ""
    revision: int = 0

    @classmethod
    def create(
        cls,
        license_key: str,
        locking_id: str,
        system_id: str,
        agent: SigningKey,
        checkin_key: bytes | None = None,
        *,
        accept_batch: bool = True,
        revision: int = 0,
    ) -> CheckinRequest:
        """``revision``: of the license file in force (0: none, or an older agent's request)."""
        if not 0 <= revision <= MAX_REVISION:
            raise ValueError(f"revision {revision} is out of range")
        unsigned = cls(
            normalize_license_key(license_key), locking_id, system_id, new_nonce(), "",
            accept=BATCH if accept_batch else "", revision=revision,
        )  # fmt: skip
        payload = canonical_json(unsigned.payload())
        if checkin_key is not None:
            return cls(**{**asdict(unsigned), "mac": _mac(checkin_key, payload)})
        return cls(**{**asdict(unsigned), "signature": _b64(agent.sign(payload))})

    def to_json(self) -> bytes:
        obj = self.payload()
        if self.mac:
            obj["mac"] = self.mac
        else:
            obj["signature"] = self.signature
        return canonical_json(obj)

    def authenticate(self, agent_key: str, checkin_key: bytes) -> None:
        """Check the MAC with ``checkin_key``, or the signature with ``agent_key``."""
        if not self.mac:
            self.verify_with(agent_key)
            return
        expected = _mac(checkin_key, canonical_json(self.payload()))
        if not hmac.compare_digest(expected, self.mac):
            raise SignatureError("request MAC does not match the installation's check-in key")

    @classmethod
    def from_json(cls, data: bytes | str | Mapping[str, Any]) -> CheckinRequest:
        """Parse only: the caller checks it with the registered key (:meth:`authenticate`)."""
        obj = _load_object(data, "check-in request")
        names = {"protocol", "type", "license_key", "locking_id", "system_id", "nonce"}
        _fields(obj, names, {"signature", "mac", "accept", "revision"}, "check-in request")
        if obj["type"] != cls.TYPE:
            raise FormatError("not a check-in request")
        _check_common(obj)
        if "accept" in obj and obj["accept"] != BATCH:
            raise FormatError("field 'accept' is malformed")
        if "revision" in obj:
            revision = obj["revision"]
            # 0 is left out, never sent: one message, one encoding (the MAC covers the bytes).
            if type(revision) is not int or not 1 <= revision <= MAX_REVISION:
                raise FormatError("field 'revision' is malformed")
        if ("signature" in obj) == ("mac" in obj):
            raise FormatError("check-in request needs exactly one of 'signature' and 'mac'")
        if "mac" in obj:
            _string(obj, "mac", _MAC_RE)
            obj["signature"] = ""
        else:
            _string(obj, "signature", _B64_RE)
        del obj["protocol"], obj["type"]
        return cls(**obj)


@dataclass(frozen=True, slots=True)
class ServerResponse:
    """A vendor-signed answer to an activation or check-in.

    ``license``/``identity`` carry complete signed files (which the agent verifies again on
    their own); ``directives`` are orders such as ``lock``; ``message`` says why.
    """

    kind: str  # "activation" | "checkin"
    nonce: str
    server_time: datetime
    serial: str
    license: str | None = None
    identity: str | None = None
    directives: tuple[str, ...] = ()
    message: str | None = None
    #: Activation only: the installation's check-in key, sealed to its agent key.
    checkin_key: str | None = field(default=None, repr=False)
    key_id: str = field(default="", repr=False)
    signature: str = field(default="", repr=False)
    #: Signed as part of a batch (:func:`sign_batch`): the position in the batch and the
    #: sibling hashes up to the signed root (base64); None for a response signed alone.
    batch_index: int | None = field(default=None, repr=False)
    batch_path: str | None = field(default=None, repr=False)

    def payload(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "protocol": PROTOCOL,
            "type": self.kind,
            "nonce": self.nonce,
            "server_time": format_timestamp(self.server_time),
            "serial": self.serial,
            "directives": list(self.directives),
        }
        for name in ("license", "identity", "message", "checkin_key"):
            value = getattr(self, name)
            if value is not None:
                obj[name] = value
        return obj

    def signed_json(self, key: SigningKey) -> bytes:
        """``signed(key).to_json()`` in one pass (the server answers every check-in so)."""
        obj = self.payload()
        obj["signature"] = _b64(key.sign(canonical_json(obj)))
        obj["key_id"] = key.key_id
        return canonical_json(obj)

    def signed(self, key: SigningKey) -> ServerResponse:
        sig = _b64(key.sign(canonical_json(self.payload())))
        return ServerResponse(**{**_shallow(self), "key_id": key.key_id, "signature": sig})

    def to_json(self) -> bytes:
        obj = self.payload()
        obj["key_id"] = self.key_id
        obj["signature"] = self.signature
        if self.batch_path is not None:
            obj["batch_index"] = self.batch_index
            obj["batch_path"] = self.batch_path
        return canonical_json(obj)

    @classmethod
    def from_json(
        cls, data: bytes | str | Mapping[str, Any], keyring: Keyring, expected_nonce: str
    ) -> ServerResponse:
        """Parse, verify the vendor signature and that it answers *this* request."""
        obj = _load_object(data, "server response")
        required = {"protocol", "type", "nonce", "server_time", "serial", "directives"}
        optional = {"license", "identity", "message", "checkin_key", "batch_index", "batch_path"}
        _fields(obj, required | {"key_id", "signature"}, optional, "server response")
        kind = obj["type"]
        if kind not in ("activation", "checkin"):
            raise FormatError("server response has an unknown type")
        key_id = _string(obj, "key_id", KEY_ID_RE)
        signature = _unb64(_string(obj, "signature", _B64_RE), "signature")
        directives = obj["directives"]
        if not isinstance(directives, list) or any(d not in DIRECTIVES for d in directives):
            raise FormatError("server response has unknown directives")
        for name in ("license", "identity", "message"):
            if name in obj and not isinstance(obj[name], str):
                raise FormatError(f"field {name!r} is malformed")
        if "checkin_key" in obj and (kind != "activation" or not isinstance(obj["checkin_key"], str)):
            raise FormatError("field 'checkin_key' is malformed")
        try:
            server_time = parse_timestamp(_string(obj, "server_time"))
        except ValueError:
            raise FormatError("field 'server_time' is malformed") from None
        batch_index, batch_path = _batch_fields(obj)
        response = cls(
            kind,
            _string(obj, "nonce", _NONCE_RE),
            server_time,
            _string(obj, "serial", SERIAL_RE),
            obj.get("license"),
            obj.get("identity"),
            tuple(directives),
            obj.get("message"),
            obj.get("checkin_key"),
            key_id,
            obj["signature"],
            batch_index,
            obj.get("batch_path"),
        )
        message = canonical_json(response.payload())
        if batch_path is not None:
            assert batch_index is not None
            try:
                root = merkle.root_from_path(merkle.leaf_hash(message), batch_index, batch_path)
            except ValueError as exc:
                raise FormatError(str(exc)) from None
            message = merkle.ROOT_CONTEXT + root
        keyring.verify(key_id, signature, message)
        if response.nonce != expected_nonce:
            raise VerificationError("response does not answer this request (replayed?)")
        return response


def _batch_fields(obj: dict[str, Any]) -> tuple[int | None, bytes | None]:
    """A batch-signed response's position and path (both or neither), checked for form."""
    if ("batch_index" in obj) != ("batch_path" in obj):
        raise FormatError("server response needs both 'batch_index' and 'batch_path' or neither")
    if "batch_path" not in obj:
        return None, None
    index = obj["batch_index"]
    if type(index) is not int or not 0 <= index < 1 << merkle.MAX_DEPTH:
        raise FormatError("field 'batch_index' is malformed")
    return index, _unb64(_string(obj, "batch_path", _B64_RE), "batch_path")


def sign_batch(responses: Sequence[ServerResponse], key: SigningKey) -> list[bytes]:
    """Every response's JSON, signed together with one signature (``core/merkle.py``).

    For agents that ask for it (``CheckinRequest.accept``); each response verifies on its
    own, with its path, like one signed alone.
    """
    objs = [r.payload() for r in responses]
    root, paths = merkle.tree([merkle.leaf_hash(canonical_json(obj)) for obj in objs])
    signature = _b64(key.sign(merkle.ROOT_CONTEXT + root))
    out = []
    for index, (obj, path) in enumerate(zip(objs, paths, strict=True)):
        obj["key_id"] = key.key_id
        obj["signature"] = signature
        obj["batch_index"] = index
        obj["batch_path"] = _b64(path)
        out.append(canonical_json(obj))
    return out


def _shallow(obj: ServerResponse) -> dict[str, Any]:
    return {f: getattr(obj, f) for f in obj.__dataclass_fields__}
