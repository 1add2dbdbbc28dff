"""A stand-in for the license server: answers what a test tells it to and records every
request, so a test can show that the CLI sent nothing, or what it did with a broken answer."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class FakeServer:
    url: str = ""
    #: (METHOD, path) -> (status, body); a body that is bytes goes out as is, else as JSON.
    #: A list of them is answered one per request, in order (the last one repeats).
    answers: dict[tuple[str, str], Any] = field(default_factory=dict)
    #: What any other request gets.
    default: tuple[int, Any] = (200, {})
    requests: list[tuple[str, str, bytes]] = field(default_factory=list)
    #: Seconds each answer waits after its request is recorded (a request "in flight").
    delay: float = 0.0

    def env(self) -> dict[str, str]:
        return {"TESSERA_URL": self.url, "TESSERA_TOKEN": "t"}


@contextmanager
def fake_server() -> Iterator[FakeServer]:
    state = FakeServer()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = self.path.split("?", 1)[0]
            state.requests.append((self.command, path, body))
            if state.delay:
                time.sleep(state.delay)
            planned = state.answers.get((self.command, path), state.default)
            if isinstance(planned, list):
                planned = planned.pop(0) if len(planned) > 1 else planned[0]
            status, answer = planned
            data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
