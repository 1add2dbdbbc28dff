"""The check-in lane: it takes exactly its route's plain requests, and answers as the route."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from tessera.core.protocol import MAX_MESSAGE_SIZE, ServerResponse
from tessera.core.signing import Keyring
from tessera.server.app import ServerState, create_app
from tessera.server.errors import Forbidden, ServiceError
from tessera.server.lane import ConnectLane
from tessera.server.tokens import Principal

from .conftest import START, LiveServer
from .helpers import agent, setup_license


class _Boom(Exception):
    pass


def _lane_app() -> tuple[Starlette, list[bytes]]:
    """A route that says who answered, behind a lane that records what it was handed."""
    handed: list[bytes] = []

    async def handler(body: bytes) -> Response:
        handed.append(body)
        if body == b"forbidden":
            raise Forbidden("no")
        if body == b"boom":
            raise _Boom
        return PlainTextResponse("lane:" + body.decode())

    async def route(request: Request) -> Response:
        return PlainTextResponse("route:" + (await request.body()).decode())

    async def service_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    app = Starlette(
        routes=[Route("/in", route, methods=["GET", "POST"]), Route("/other", route, methods=["POST"])]
    )
    app.add_exception_handler(ServiceError, service_error)
    app.add_middleware(
        ConnectLane, path="/in", handler=handler, exception_handlers=app.exception_handlers, max_body=16
    )
    return app, handed


def _client(app: Starlette) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://lane.test")


def test_the_lane_takes_post_on_its_path_with_a_declared_length_only() -> None:
    app, handed = _lane_app()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"chunked"

    async def run() -> list[str]:
        async with _client(app) as client:
            return [
                (await client.post("/in", content=b"hello")).text,
                (await client.get("/in")).text,
                (await client.post("/other", content=b"x")).text,
                (await client.post("/in", content=chunks())).text,  # no Content-Length
                (await client.post("/in", content=b"x" * 17)).text,  # over max_body
            ]

    assert asyncio.run(run()) == ["lane:hello", "route:", "route:x", "route:chunked", "route:" + "x" * 17]
    assert handed == [b"hello"]


def test_the_lane_answers_errors_with_the_apps_handlers() -> None:
    app, _ = _lane_app()

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with _client(app) as client:
            return await client.post("/in", content=b"forbidden"), await client.post("/in", content=b"boom")

    refused, crashed = asyncio.run(run())
    assert refused.status_code == 403 and refused.json() == {"detail": "no"}  # by the base class
    assert crashed.status_code == 500 and "Traceback" not in crashed.text  # the server-error middleware


def test_the_check_in_lane_is_outermost_and_answers_as_the_route(
    live_server: LiveServer, state: ServerState, admin: Principal, keyring: Keyring
) -> None:
    """The same requests through the lane (a plain body) and through the route (chunked):
    the same statuses and the same one-line refusals."""
    app = create_app(state)
    outermost = app.build_middleware_stack()  # in front of FastAPI's own layers too
    assert isinstance(outermost, ConnectLane) and isinstance(outermost.app, ConnectLane)
    assert {outermost.path, outermost.app.path} == {"/api/v1/checkin", "/api/v1/activate"}
    serial, key = setup_license(state, admin, START)
    a = agent(1)
    client = live_server.client()
    assert client.post("/api/v1/activate", content=a.activation(key).to_json()).status_code == 200

    def both(body: bytes) -> tuple[tuple[int, str], tuple[int, str]]:
        lane = client.post("/api/v1/checkin", content=body)
        route = client.post("/api/v1/checkin", content=iter([body]))
        return (lane.status_code, lane.text), (route.status_code, route.text)

    good = [a.checkin(key) for _ in range(2)]
    lane = client.post("/api/v1/checkin", content=good[0].to_json())
    route = client.post("/api/v1/checkin", content=iter([good[1].to_json()]))
    for request, reply in zip(good, (lane, route), strict=True):
        assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
        assert ServerResponse.from_json(reply.content, keyring, request.nonce).serial == serial
    unknown = agent(2).checkin("AAAAA-BBBBB-CCCCC-DDDDD-EEEEE").to_json()
    forged = json.loads(a.checkin(key).to_json())
    forged["system_id"] = agent(3).system_id
    for body, status in (
        (unknown, 404),
        (b"{not json", 422),
        (b'{"type": "checkin"}', 422),
        (json.dumps(forged).encode(), 403),
    ):
        via_lane, via_route = both(body)
        assert via_lane == via_route and via_lane[0] == status, (body, via_lane, via_route)
        assert len(json.loads(via_lane[1])) == 1  # {"detail": one line}
    too_large = client.post("/api/v1/checkin", content=b"{" + b" " * MAX_MESSAGE_SIZE + b"}")
    assert too_large.status_code == 422 and too_large.json() == {"detail": "request is too large"}
    assert client.get("/api/v1/checkin").status_code == 405


@pytest.mark.parametrize("declared", [b"12abc", b"-1"])
def test_a_bad_content_length_is_left_to_the_route(declared: bytes) -> None:
    seen: list[str] = []

    async def app(_scope: Scope, _receive: Receive, _send: Send) -> None:
        seen.append("app")

    async def never(_body: bytes) -> Response:
        raise AssertionError("the lane must not take this request")

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_message: Message) -> None:
        raise AssertionError("the lane must not answer")

    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": "/in",
        "headers": [(b"content-length", declared)],
    }
    lane = ConnectLane(app, path="/in", handler=never, exception_handlers={}, max_body=16)
    asyncio.run(lane(scope, receive, send))
    assert seen == ["app"]
