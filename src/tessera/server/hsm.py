"""The vendor signing key in an HSM, through PKCS#11 (SPEC section 5).

With ``[hsm]`` in ``tessera.toml`` the vendor's Ed25519 key pair is made inside the token
at ``server init`` (``CKM_EC_EDWARDS_KEY_PAIR_GEN``, private, sensitive, not extractable)
and every signature the server makes (license files, answers, batch roots, blacklists) is
made there (``CKM_EDDSA``). The data directory then holds no ``vendor.key`` at all: whoever
copies it gets no key, and the key cannot be read out of the token, only used while the
server holds a session opened with the token's PIN (``TESSERA_HSM_PIN``, or the file
``TESSERA_HSM_PIN_FILE`` names).

The key is used as :class:`tessera.core.signing.SigningKey` everywhere (same public key,
same key id, same signatures: Ed25519 is deterministic), so nothing else in the server
knows where it lives. One session serves the process, one signature at a time (a PKCS#11
session is not to be used by two threads at once). SoftHSM 2 signs in about 0.3 ms, against
0.03 ms in process: a check-in batch pays it once, an activation twice.

``python-pkcs11`` is imported only here, so a server without ``[hsm]`` never loads it
(``pip install 'tessera[hsm]'``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tessera.core.errors import KeyFileError
from tessera.core.signing import PublicKey, SigningKey
from tessera.server.config import HsmConfig

__all__ = [
    "HsmError",
    "HsmSigningKey",
    "check_token",
    "generate_key",
    "import_key",
    "open_signing_key",
    "read_pin",
]

#: RFC 8410's object identifier of Ed25519, DER-encoded: the key's CKA_EC_PARAMS.
_ED25519_PARAMS = bytes.fromhex("06032b6570")


class HsmError(Exception):
    """The HSM, its token, its PIN or the key in it is not as configured (one line)."""


def read_pin() -> str:
    value = os.environ.get("TESSERA_HSM_PIN")
    if value:
        return value
    named = os.environ.get("TESSERA_HSM_PIN_FILE")
    if not named:
        raise HsmError("the token's PIN is unknown: set TESSERA_HSM_PIN or TESSERA_HSM_PIN_FILE")
    try:
        text = Path(named).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise HsmError(f"TESSERA_HSM_PIN_FILE {named} is not readable ({exc.strerror})") from None
    if not text:
        raise HsmError(f"TESSERA_HSM_PIN_FILE {named} is empty")
    return text


class HsmSigningKey(SigningKey):
    """A vendor key that lives in a PKCS#11 token: it signs, and cannot be exported.

    A token that goes away (pulled, its directory moved, the HSM restarted) leaves the
    session and the key's handle dead for good: they keep failing (``ObjectHandleInvalid``)
    after the token is back. So a failed signature drops them, and the next signature opens
    a new session (log in, find the key again, re-initializing the PKCS#11 library when the
    module no longer sees the token) and tries once more: the server signs again as soon as
    the token does, without a restart. Re-opened, the key must still be this server's
    vendor key (same public key), or nothing is signed.
    """

    __slots__ = ("_failure", "_lock", "_mechanism", "_private", "_reopen", "_session", "token")

    def __init__(
        self,
        session: Any,
        private: Any,
        public: PublicKey,
        token: str,
        reopen: Callable[[], tuple[Any, Any, PublicKey]] | None = None,
    ) -> None:
        import pkcs11

        # Not SigningKey.__init__: there is no key material in this process.
        self._mechanism = pkcs11.Mechanism.EDDSA  # looked up once, not per signature
        self._failure = pkcs11.PKCS11Error
        self._session: Any = session
        self._private: Any = private
        self._reopen = reopen
        self._lock = threading.Lock()
        self.public = public
        self.token = token

    def sign(self, data: bytes) -> bytes:
        with self._lock:
            if self._private is None:  # dropped after a failure: the token may be back
                self._reconnect()
                return self._sign_once(data)
            try:
                return self._sign_once(data)
            except HsmError:
                if self._reopen is None:
                    raise
                # The token may be back already while this session is stale: one fresh
                # session, one more try; still failing, the first reason is the one told.
                try:
                    self._reconnect()
                except HsmError:
                    pass
                else:
                    return self._sign_once(data)
                raise

    def _sign_once(self, data: bytes) -> bytes:
        try:
            return bytes(self._private.sign(bytes(data), mechanism=self._mechanism))
        except self._failure as exc:
            self._drop()
            raise HsmError(f"token {self.token!r} refused to sign: {_name(exc)}") from None

    def _drop(self) -> None:
        session, self._session, self._private = self._session, None, None
        if session is not None:
            with contextlib.suppress(Exception):  # the token went away: nothing left to close
                session.close()

    def _reconnect(self) -> None:
        if self._reopen is None:
            raise HsmError(f"token {self.token!r}: the session was lost and cannot be re-opened")
        session, private, public = self._reopen()
        if public != self.public:
            with contextlib.suppress(Exception):
                session.close()
            raise HsmError(f"token {self.token!r} now holds another key than the vendor key: not signing")
        self._session, self._private = session, private

    def to_pem(self, passphrase: bytes) -> bytes:
        raise KeyFileError("the vendor key lives in the HSM and cannot be exported")

    def to_raw(self) -> bytes:
        raise KeyFileError("the vendor key lives in the HSM and cannot be exported")

    def close(self) -> None:
        with self._lock:
            self._reopen = None  # closed for good: no later signature re-opens a session
            self._drop()

    def __repr__(self) -> str:
        return f"HsmSigningKey(key_id={self.key_id!r}, token={self.token!r})"


def _library(config: HsmConfig) -> Any:
    try:
        import pkcs11
    except ImportError:
        raise HsmError("python-pkcs11 is not installed (pip install 'tessera[hsm]')") from None
    if not config.module.is_file():
        raise HsmError(f"PKCS#11 module {config.module} does not exist")
    try:
        return pkcs11.lib(str(config.module))
    except (RuntimeError, OSError, pkcs11.PKCS11Error) as exc:
        raise HsmError(f"cannot load PKCS#11 module {config.module}: {_name(exc)}") from None


def _session(config: HsmConfig, pin: str, *, rw: bool) -> Any:
    import pkcs11

    lib = _library(config)
    try:
        token = lib.get_token(token_label=config.token)
    except pkcs11.NoSuchToken:
        raise HsmError(f"no token labelled {config.token!r} in {config.module}") from None
    except pkcs11.MultipleTokensReturned:
        raise HsmError(f"more than one token labelled {config.token!r} in {config.module}") from None
    except pkcs11.PKCS11Error as exc:
        raise HsmError(f"token {config.token!r}: {_name(exc)}") from None
    try:
        return token.open(rw=rw, user_pin=pin)
    except pkcs11.PinIncorrect:
        raise HsmError(f"wrong PIN for token {config.token!r}") from None
    except (pkcs11.PinLenRange, pkcs11.PinInvalid):
        raise HsmError(f"the PIN for token {config.token!r} is malformed") from None
    except pkcs11.PKCS11Error as exc:
        raise HsmError(f"cannot log in to token {config.token!r}: {_name(exc)}") from None


def _public_key(public: Any) -> PublicKey:
    """The raw 32-byte key of a PKCS#11 Ed25519 public key object (CKA_EC_POINT, which
    holds it as a DER OCTET STRING: 0x04 0x20 and the key)."""
    import pkcs11

    point = bytes(public[pkcs11.Attribute.EC_POINT])
    if len(point) == 34 and point[:2] == b"\x04\x20":
        point = point[2:]
    if len(point) != 32:
        raise HsmError("the token's public key is not an Ed25519 key")
    try:
        return PublicKey(point)
    except Exception:
        raise HsmError("the token's public key is not a valid Ed25519 key") from None


def _refuse_taken_label(session: Any, config: HsmConfig) -> None:
    from pkcs11 import Attribute

    if list(session.get_objects({Attribute.LABEL: config.key})):
        raise HsmError(f"token {config.token!r} holds a key labelled {config.key!r} already")


def check_token(config: HsmConfig, pin: str) -> None:
    """The module loads, the token is there, the PIN logs in and the key's label is free:
    checked before ``server init`` makes anything, so a mistake leaves nothing behind."""
    session = _session(config, pin, rw=True)
    try:
        _refuse_taken_label(session, config)
    finally:
        session.close()


def generate_key(config: HsmConfig, pin: str) -> PublicKey:
    """Make the vendor key pair in the token (``server init``); its public key.

    Refuses if the token has a key labelled so already: replacing a vendor key orphans
    every license it signed.
    """
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism

    session = _session(config, pin, rw=True)
    try:
        _refuse_taken_label(session, config)
        try:
            parameters = session.create_domain_parameters(
                KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: _ED25519_PARAMS}, local=True
            )
            public, _ = parameters.generate_keypair(
                store=True,
                label=config.key,
                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                private_template={
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.PRIVATE: True,
                    Attribute.SIGN: True,
                },
            )
        except pkcs11.PKCS11Error as exc:
            raise HsmError(f"token {config.token!r} cannot make an Ed25519 key: {_name(exc)}") from None
        return _public_key(public)
    finally:
        session.close()


def import_key(config: HsmConfig, pin: str, key: SigningKey) -> PublicKey:
    """Put an existing vendor key into the token (``server hsm-import``): the private half
    sensitive and not extractable, the public half beside it, both under the label.

    Moving the key that signed every license so far, rather than making a new one, keeps
    the key id the agents' keyrings trust. Refuses a label in use, like :func:`generate_key`.
    """
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass

    public = key.public.raw
    session = _session(config, pin, rw=True)
    try:
        _refuse_taken_label(session, config)
        common = {
            Attribute.TOKEN: True,
            Attribute.LABEL: config.key,
            Attribute.KEY_TYPE: KeyType.EC_EDWARDS,
            Attribute.EC_PARAMS: _ED25519_PARAMS,
        }
        try:
            session.create_object(
                {
                    **common,
                    Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                    Attribute.VALUE: key.to_raw(),
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: True,
                }
            )
            session.create_object(
                {
                    **common,
                    Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                    Attribute.EC_POINT: b"\x04\x20" + public,  # a DER OCTET STRING, as generated
                    Attribute.PRIVATE: False,
                    Attribute.VERIFY: True,
                }
            )
        except pkcs11.PKCS11Error as exc:
            raise HsmError(f"token {config.token!r} cannot take the Ed25519 key: {_name(exc)}") from None
        return PublicKey(public)
    finally:
        session.close()


def _find_key(config: HsmConfig, pin: str) -> tuple[Any, Any, PublicKey]:
    """A new session on ``config``'s token and the vendor key pair in it (private handle,
    public key); the session is closed again if the key is not usable."""
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    session = _session(config, pin, rw=False)
    try:
        try:
            private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=config.key)
            public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=config.key)
        except pkcs11.NoSuchKey:
            raise HsmError(f"token {config.token!r} has no key labelled {config.key!r}") from None
        except pkcs11.MultipleObjectsReturned:
            raise HsmError(f"token {config.token!r} has several keys labelled {config.key!r}") from None
        except pkcs11.PKCS11Error as exc:
            raise HsmError(f"token {config.token!r}: cannot find key {config.key!r}: {_name(exc)}") from None
        if private[Attribute.KEY_TYPE] != pkcs11.KeyType.EC_EDWARDS:
            raise HsmError(f"the key {config.key!r} in token {config.token!r} is not an Ed25519 key")
        return session, private, _public_key(public)
    except BaseException:
        with contextlib.suppress(Exception):
            session.close()
        raise


def _reopener(config: HsmConfig, pin: str) -> Callable[[], tuple[Any, Any, PublicKey]]:
    """How a signing key gets a new session after its token came back. A module may keep
    the token's old state until it is initialized again (SoftHSM answers ``GeneralError``
    for a token whose directory went away and came back): if a plain re-open fails, the
    library is re-initialized (``C_Finalize``, ``C_Initialize``) and asked once more. Only
    the signing key holds sessions in a server process, and its own is dead already."""

    def reopen() -> tuple[Any, Any, PublicKey]:
        import pkcs11

        try:
            return _find_key(config, pin)
        except HsmError:
            lib = _library(config)
            try:
                lib.reinitialize()
            except pkcs11.PKCS11Error as exc:
                raise HsmError(f"cannot re-initialize PKCS#11 module {config.module}: {_name(exc)}") from None
            return _find_key(config, pin)

    return reopen


def open_signing_key(config: HsmConfig, pin: str | None = None) -> HsmSigningKey:
    """The vendor key of ``config``'s token, ready to sign (a session held until closed,
    re-opened after the token failed and came back)."""
    pin = pin if pin is not None else read_pin()
    session, private, public = _find_key(config, pin)
    key = HsmSigningKey(session, private, public, config.token, _reopener(config, pin))
    try:
        # One signature proves the pair belongs together and the token signs with it.
        probe = b"tessera hsm probe"
        if not key.public.verify(key.sign(probe), probe):
            raise HsmError(f"the key pair {config.key!r} in token {config.token!r} does not match")
        return key
    except BaseException:
        key.close()
        raise


def _name(exc: BaseException) -> str:
    """A PKCS#11 error as words: python-pkcs11's exceptions are named, their text often empty."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
