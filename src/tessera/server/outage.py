"""How a database outage looks to clients: 503, a one-line reason, ``Retry-After``.

A database that is down, unreachable, locked by another process or out of connections is
not the client's fault and not a bug, so it must never surface as a 500 (which agents and
operators read as "broken") nor as a hang (agents give up after 15 s and learn nothing).
The reason names the kind of trouble without the database's address or credentials, since
Connect clients are on the public side.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

__all__ = ["RETRY_AFTER_SECONDS", "install_outage_handlers", "outage_reason"]

log = logging.getLogger("tessera.server")

#: What a client is told to wait before trying again.
RETRY_AFTER_SECONDS = 5


def outage_reason(exc: Exception) -> str:
    """The one line a client gets for this database failure."""
    if isinstance(exc, PoolTimeout):
        return "the server's database is overloaded (no free connection)"
    text = str(getattr(exc, "orig", None) or exc).lower()
    if "locked" in text or "busy" in text:
        return "the server's database is busy (locked by another process)"
    if isinstance(exc, OperationalError):
        return "the server cannot reach its database"
    return "the server's database refused the request"


def install_outage_handlers(app: FastAPI) -> None:
    """Map database failures to 503 (IntegrityError keeps its own, more specific handler)."""

    async def _unavailable(_request: Request, exc: Exception) -> JSONResponse:
        log.warning("database error: %s", exc)
        return JSONResponse(
            {"detail": outage_reason(exc)},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    for kind in (OperationalError, DBAPIError, PoolTimeout):
        app.add_exception_handler(kind, _unavailable)
