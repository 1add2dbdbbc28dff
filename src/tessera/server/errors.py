"""Errors the services raise; the HTTP layer maps each to one status code and one line."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session

__all__ = [
    "Conflict",
    "Forbidden",
    "Invalid",
    "NotFound",
    "RecordedRefusal",
    "ServiceError",
    "Unauthorized",
]


class ServiceError(Exception):
    """Base: ``str(exc)`` is the one-line reason shown to the client."""

    status = 400


class Invalid(ServiceError):
    """Well-formed JSON whose content breaks a rule (the field is named in the message)."""

    status = 422


class Unauthorized(ServiceError):
    status = 401


class Forbidden(ServiceError):
    """Refused: outside the caller's role, no free machine left, revoked, bad signature."""

    status = 403


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    """The thing exists already (product code, partner code)."""

    status = 409


class RecordedRefusal(Forbidden):
    """A refusal that must leave a trace although the transaction that refused rolls back.

    The request's own transaction is rolled back (nothing changed), then :meth:`record`
    runs in a fresh write transaction: a denied recovery or a blacklisted container caught
    at activation is on file for support and sales. ``serial`` is the license it counts
    against in the server's :class:`~tessera.server.refusals.RefusalLimit`.
    """

    def __init__(self, message: str, record: Callable[[Session, int], None], *, serial: str) -> None:
        super().__init__(message)
        self._record = record
        self.serial = serial

    def record(self, session: Session, suppressed: int = 0) -> None:
        """Write the refusal down; ``suppressed``: refusals of the same license the limit
        left out since the last one written."""
        self._record(session, suppressed)
