"""Control characters are refused at the edge, before any service sees the text.

PostgreSQL cannot store or compare a NUL in a text value (psycopg refuses to send one), so a
NUL that reached a query became a database error, i.e. a 503 "database refused" that any
token holder or portal user could fake at will, where SQLite answered 404 or 422. Rather
than guarding every lookup, the routers refuse such text once, for every route, naming the
parameter: path and query parameters (names, codes, serials, search words) may hold no C0
control character at all; strings in a JSON body may hold tab, line feed and carriage
return (a PEM certificate, a note) but no other control character. Fields with a stricter
form (a URL, an order number) check the rest themselves.

The Connect endpoints do not go through this: they parse their own strict formats (every
string field has a pattern without control characters) and are the hot path.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.convertors import PathConvertor
from starlette.exceptions import HTTPException

__all__ = [
    "BODY_CONTROL",
    "LINE_CONTROL",
    "control_character_error",
    "reject_control_characters",
    "reject_parameter_control",
]

#: What a one-line value (path or query parameter) may not hold.
LINE_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: What a string in a body may not hold (tab, line feed and carriage return may be text).
BODY_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _describe(char: str) -> str:
    return "a NUL byte" if char == "\x00" else f"a control character (U+{ord(char):04X})"


def control_character_error(value: str, pattern: re.Pattern[str] = LINE_CONTROL) -> str | None:
    """Why ``value`` is refused, or None when it holds no forbidden character."""
    found = pattern.search(value)
    return None if found is None else f"must not contain {_describe(found.group())}"


def _error(loc: tuple[str | int, ...], reason: str, value: str) -> RequestValidationError:
    return RequestValidationError([{"loc": loc, "msg": reason, "type": "control_character", "input": value}])


def _body_strings(body: Any) -> Any:
    """Every string in a parsed JSON body, keys too, with where it is. Iterative: a body
    nested as deep as the JSON parser allows must not exhaust the stack here."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [(("body",), body)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, str):
            yield loc, value
        elif isinstance(value, dict):
            for key, item in value.items():
                yield (*loc, str(key)), str(key)
                stack.append(((*loc, str(key)), item))
        elif isinstance(value, list):
            stack.extend(((*loc, i), item) for i, item in enumerate(value))


async def reject_parameter_control(request: Request) -> None:
    """A router dependency: runs after routing (so parameters have their names) and before
    the endpoint and its own validation. The portal's forms are checked where it reads them.

    Also: an encoded slash ("%2F") in a parameter that is one path segment. The server
    decodes it before routing, so ``/licenses/2026-000001%2Frevisions`` would reach the
    revisions route with the serial cut short: a different request than the client sent.
    No identifier of a single segment holds a slash, so there is no such endpoint (404)."""
    raw = request.scope.get("raw_path")
    if raw is not None and b"%2f" in raw.lower():
        route = request.scope.get("route")
        convertors = getattr(route, "param_convertors", {}).values()
        if not any(isinstance(c, PathConvertor) for c in convertors):
            raise HTTPException(404)
    for name, value in request.path_params.items():
        if isinstance(value, str) and (reason := control_character_error(value)) is not None:
            raise _error(("path", name), reason, value)
    for name, value in request.query_params.multi_items():
        if (reason := control_character_error(value)) is not None:
            raise _error(("query", name), reason, value)


async def reject_control_characters(request: Request) -> None:
    """:func:`reject_parameter_control`, and the strings of a JSON body."""
    await reject_parameter_control(request)
    if request.method not in _BODY_METHODS:
        return
    try:
        body = await request.json()  # parsed (and cached) by FastAPI already where it is JSON
    except Exception:  # no body or not JSON: the endpoint's own validation answers
        return
    for loc, text in _body_strings(body):
        if (reason := control_character_error(text, BODY_CONTROL)) is not None:
            raise _error(loc, reason, text)
