"""Errors raised by :mod:`tessera.agent`.

They extend the core hierarchy, so a front end that turns a :class:`TesseraError` into one
line (the CLI does) needs nothing new. Import failures keep the core types
(:class:`~tessera.core.FormatError` for unreadable files, a
:class:`~tessera.core.VerificationError` subclass for a file that must not be trusted here)::

    TesseraError
    ├── FormatError, VerificationError, ...   (tessera.core: a file failed on import)
    └── AgentError                 something the agent cannot do, and why
        ├── FeatureDenied          require(feature): the feature may not be used now
        ├── SeatError              assign/unassign: no free seat, feature not licensed,
        │                          subject holds no seat (a malformed code is a FormatError)
        ├── StateError             the state directory cannot be read or written
        │   │                      (read-only, disk full, locked, damaged); nothing was lost
        │   └── NotInstalled       Agent(..., create=False): the directory holds no installation
        ├── BackupError            a backup file is unreadable or not for this installation
        └── ConnectError           one validation with the license server failed
            ├── ServerUnreachable  network, TLS (certificate not the pinned CA), timeout
            ├── ServerRefused      the server answered with a refusal (HTTP 4xx/5xx detail)
            └── BadResponse        garbage, unsigned, badly signed or replayed response

A ``ConnectError`` never changes the verified state: the agent keeps running on it (failover).
"""

from __future__ import annotations

from pathlib import Path

from tessera.core.errors import TesseraError

__all__ = [
    "AgentError",
    "BackupError",
    "BadResponse",
    "ConnectError",
    "FeatureDenied",
    "NotInstalled",
    "SeatError",
    "ServerRefused",
    "ServerUnreachable",
    "StaleBlacklist",
    "StateError",
]


class AgentError(TesseraError):
    """Base of everything the agent refuses or cannot do."""


class FeatureDenied(AgentError):
    """``require(feature)`` failed; ``reason`` says why in words an administrator can act on."""

    def __init__(self, feature: str, reason: str) -> None:
        self.feature = feature
        self.reason = reason
        super().__init__(f"feature {feature} is not available: {reason}")


class SeatError(AgentError):
    """A seat cannot be assigned or released."""


class StateError(AgentError):
    """The state store cannot be used; the previous state is intact."""


class BackupError(AgentError):
    """A backup cannot be written or restored."""


class ConnectError(AgentError):
    """One validation with the license server failed; the agent runs on its last state."""


class ServerUnreachable(ConnectError):
    """No answer: connection refused, DNS, timeout, TLS handshake (e.g. wrong certificate)."""


class ServerRefused(ConnectError):
    """The server answered with an error status and a reason (``status_code``)."""

    def __init__(self, message: str, status_code: int) -> None:
        self.status_code = status_code
        super().__init__(message)


class BadResponse(ConnectError):
    """The answer cannot be trusted: not JSON, not signed by the vendor, or replayed."""


class StaleBlacklist(AgentError):
    """A blacklist file older than the one in force (a replay that could lift an entry)."""


class NotInstalled(StateError):
    """``Agent(..., create=False)`` on a directory that holds no installation (neither
    ``state.db`` nor ``installation.key``; the directory may not exist): nothing was created."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        super().__init__(f"nothing is installed in {state_dir} (never activated)")
