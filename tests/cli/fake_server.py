"""A stand-in for the license server: answers what a test tells it to and records every
request, so a test can show that the CLI sent nothing, or what it did with a broken answer."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tessera.server.tls import make_tls_material


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
def fake_server(tls_dir: Path | None = None) -> Iterator[FakeServer]:
    """Plain HTTP; with ``tls_dir``, HTTPS with a certificate for localhost and 127.0.0.1
    signed by a CA of its own (``tls_dir/ca.pem``), as ``server init`` makes them."""
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
    if tls_dir is not None:
        material = make_tls_material(datetime.now(UTC))
        (tls_dir / "ca.pem").write_bytes(material.ca_cert_pem)
        (tls_dir / "server.pem").write_bytes(material.server_cert_pem)
        (tls_dir / "server.key").write_bytes(material.server_key_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls_dir / "server.pem", tls_dir / "server.key")
        server.socket = context.wrap_socket(server.socket, server_side=True)
        state.url = state.url.replace("http://", "https://")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
