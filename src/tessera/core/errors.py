"""Errors raised by :mod:`tessera.core`.

Every error a user can provoke with bad input derives from :class:`TesseraError`, so a
front end (CLI, HTTP) can turn it into one clear line without ever showing a traceback::

    TesseraError
    ├── FormatError            the bytes are not a well-formed document (names the line)
    ├── KeyFileError           a key or keyring file is unreadable, or the passphrase is wrong
    └── VerificationError      the document is well formed but must not be trusted
        ├── UnknownKeyError    signed by a key that is not in the keyring
        ├── SignatureError     the signature does not match the signed bytes
        ├── BindingError       the license belongs to another machine / instance
        ├── VersionError       the product version is outside the licensed range
        └── DecryptionError    sealed entitlements cannot be opened with this key

``FormatError`` means "unreadable input" (CLI exit code 2); a ``VerificationError`` is a
negative verdict about readable input (CLI exit code 1).
"""

from __future__ import annotations

__all__ = [
    "SHOWN_CHARS",
    "BindingError",
    "DecryptionError",
    "FormatError",
    "KeyFileError",
    "SignatureError",
    "TesseraError",
    "UnknownKeyError",
    "VerificationError",
    "VersionError",
    "clipped",
    "shown",
]

#: How much of a value a user typed an error message repeats: enough to recognize it, and
#: a 100,000-character argument does not come back as a 100,000-character "line".
SHOWN_CHARS = 80


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``value`` quoted (``repr``: control characters escaped, so the line stays one line)
    for an error message: at most ``limit`` characters of it, then "…"."""
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[:limit] + "…")
    return clipped(repr(value), limit)


def clipped(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` unquoted (a path, another error's message) cut to ``limit`` characters and
    "…"; characters that are not printable are escaped, as ``repr`` would."""
    if len(text) > limit:
        text = text[:limit] + "…"
    return text if text.isprintable() else repr(text)[1:-1]


class TesseraError(Exception):
    """Base of every error that is the input's fault rather than the program's."""


class FormatError(TesseraError):
    """A document could not be parsed; ``line`` is 1-based where a line is to blame."""

    def __init__(self, message: str, line: int | None = None) -> None:
        self.reason = message
        self.line = line
        super().__init__(f"line {line}: {message}" if line is not None else message)


class KeyFileError(TesseraError):
    """A key file or keyring is malformed, or a private key's passphrase is wrong."""


class VerificationError(TesseraError):
    """A well-formed document failed a trust check."""


class UnknownKeyError(VerificationError):
    """The signature names a key id that the keyring does not hold."""


class SignatureError(VerificationError):
    """The signature does not cover these bytes: the document was altered or forged."""


class BindingError(VerificationError):
    """The license is bound to a different machine, instance or user."""


class VersionError(VerificationError):
    """The running product version is outside the license's version range."""


class DecryptionError(VerificationError):
    """Sealed entitlements could not be opened: wrong license key or altered ciphertext."""
