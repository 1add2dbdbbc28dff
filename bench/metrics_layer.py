"""The metrics layer's cost per request: a bare ASGI app with and without
:class:`~tessera.server.metrics.MetricsMiddleware` in front, in process.

``[interfaces] metrics = true`` puts that layer around every request, the Connect lanes
included; this row says what it adds to a request (docs/server.md, metrics). Requests go
through in runs of :data:`PER_CALL` inside one event-loop turn, so the loop's own start-up
does not drown the difference.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bench.harness import Context, Row, benchmark, compare
from tessera.server.metrics import Metrics, MetricsMiddleware

PER_CALL = 200
_SCOPE: Scope = {"type": "http", "method": "POST", "path": "/api/v1/checkin", "headers": []}
_START: Message = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"x")]}
_BODY: Message = {"type": "http.response.body", "body": b"{}"}


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    await send(_START)
    await send(_BODY)


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(_message: Message) -> None:
    return None


@benchmark("metrics-layer")
def metrics_layer(ctx: Context) -> list[Row]:
    """requests through the metrics layer vs the same app without it"""
    wrapped = MetricsMiddleware(_app, Metrics())
    loop = asyncio.new_event_loop()

    def runs(app: ASGIApp) -> Callable[[], None]:
        async def many() -> None:
            for _ in range(PER_CALL):
                await app(_SCOPE, _receive, _send)

        return lambda: loop.run_until_complete(many())

    try:
        with_layer, bare, ratio = compare(runs(wrapped), runs(_app), ctx.budget(2.0, 6.0), batch=5)
    finally:
        loop.close()
    added_us = (1 / with_layer - 1 / bare) / PER_CALL * 1e6
    return [
        Row(
            "metrics layer",
            with_layer * PER_CALL,
            "requests/s",
            "the app without it",
            bare * PER_CALL,
            note=f"info: {added_us:.1f} µs a request (only when metrics are switched on)",
            paired_ratio=ratio,
        )
    ]
