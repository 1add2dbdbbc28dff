"""One hot Connect route served as plain ASGI, in front of the framework's per-request layers.

Check-ins are nearly all of a license server's traffic. On this path FastAPI's routing,
its dependency solving, the ``Request`` object and the send wrappers of the exception
middlewares cost about 75 µs a request, as much as a check-in's own database work
(``docs/performance.md``). :class:`ConnectLane` takes ``POST`` on one path before all that
and hands the body to the same handler the declared route runs, so both answer with the
same bytes; the route stays declared for the OpenAPI document and for what the lane does
not take (a body without ``Content-Length``, or one larger than a Connect message, which
the route refuses the usual way).

A handler's exception is answered by the app's own exception handlers (the same 4xx and
503 bodies as on every other route); one no handler is registered for propagates to the
server-error middleware outside, as on any route.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["ConnectLane"]

Handler = Callable[[bytes], Awaitable[Response]]
#: As Starlette keeps them: by exception class (or status code), sync or async.
ExceptionHandler = Callable[[Request, Any], Response | Awaitable[Response]]


class ConnectLane:
    def __init__(
        self,
        app: ASGIApp,
        *,
        path: str,
        handler: Handler,
        exception_handlers: Mapping[Any, ExceptionHandler],
        max_body: int,
    ) -> None:
        self.app = app
        self.path = path
        self.handler = handler
        #: The app's own mapping (the same dict, so handlers added later count too).
        self.exception_handlers = exception_handlers
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != scope.get("root_path", "") + self.path
        ):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is None or declared > self.max_body:
            await self.app(scope, receive, send)  # the route answers it (422 or 413)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:  # more than declared: never trust the header
                body = body[: self.max_body + 1]
                break
            if not message.get("more_body", False):
                break
        try:
            response = await self.handler(body)
        except Exception as exc:
            handle = self._handler_for(exc)
            if handle is None:
                raise
            answer = handle(Request(scope, receive), exc)
            response = await answer if inspect.isawaitable(answer) else answer
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> ExceptionHandler | None:
        for kind in type(exc).__mro__:
            if kind in self.exception_handlers:
                return self.exception_handlers[kind]
        return None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
            return length if length >= 0 else None
    return None
