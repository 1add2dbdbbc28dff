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

__all__ = ["RETRY_AFTER_SECONDS", "describe_failure", "install_outage_handlers", "outage_reason"]

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
    # SQLite: "database or disk is full"; PostgreSQL: "No space left on device" (53100).
    # Told apart from "cannot reach": the operator frees space, not the network.
    if (
        "disk is full" in text
        or "no space left" in text
        or getattr(getattr(exc, "orig", None), "sqlstate", None) == "53100"
    ):
        return "the server's database is out of disk space (its disk is full)"
    if isinstance(exc, OperationalError):
        return "the server cannot reach its database"
    return "the server's database refused the request"


#: How much of the failing statement a log line shows: enough to know which one it was.
LOGGED_STATEMENT_CHARS = 200


def describe_failure(exc: Exception) -> str:
    """One log line for a database failure: the driver's first line and the statement's
    start. SQLAlchemy's own text carries the whole statement and every parameter set (25 KB
    for one failed batch; parameters may hold secrets, which the engines hide anyway)."""
    cause = getattr(exc, "orig", None) or exc
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    statement = " ".join(str(getattr(exc, "statement", "") or "").split())
    if len(statement) > LOGGED_STATEMENT_CHARS:
        statement = statement[:LOGGED_STATEMENT_CHARS] + "..."
    return f"{type(cause).__name__}: {first}" + (f" [{statement}]" if statement else "")


def install_outage_handlers(app: FastAPI) -> None:
    """Map database failures to 503 (IntegrityError keeps its own, more specific handler)."""

    async def _unavailable(_request: Request, exc: Exception) -> JSONResponse:
        log.warning("database error: %s", describe_failure(exc))
        return JSONResponse(
            {"detail": outage_reason(exc)},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    for kind in (OperationalError, DBAPIError, PoolTimeout):
        app.add_exception_handler(kind, _unavailable)
