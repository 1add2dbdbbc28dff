"""Schemathesis against the published OpenAPI document: no input gives a 500.

Runs over real HTTP against the live app (SQLite), authenticated as admin so generated
requests reach the handlers' validation and not only the token check. Bounded to a few
examples per operation so it finishes in seconds; ``make fuzz`` raises the count.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tessera.core.clock import ManualClock
from tessera.core.signing import SigningKey
from tessera.server.app import ServerState, create_app
from tessera.server.migrate import upgrade
from tessera.server.storage import Database
from tessera.server.tokens import Role, create_token

from .conftest import START, LiveServer

pytestmark = pytest.mark.fuzz

# Every response is documented (status, content type, body schema). Not "positive data
# acceptance" (a schema-valid Connect request still carries a signature that must verify; a
# schema-valid license must name features the product has) and not "negative data
# rejection" (unknown query parameters are ignored, as HTTP APIs commonly do).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# A few per operation in the normal suite; `make fuzz` (TESSERA_FUZZ_EXAMPLES) runs more.
EXAMPLES = int(
    os.environ.get("TESSERA_API_FUZZ_EXAMPLES") or (200 if os.environ.get("TESSERA_FUZZ_EXAMPLES") else 8)
)


@pytest.fixture
def fuzz_server(tmp_path: Path) -> Iterator[tuple[LiveServer, str]]:
    db = Database(f"sqlite:///{tmp_path / 'fuzz.db'}")
    upgrade(db)
    state = ServerState(db, SigningKey.generate(), secrets.token_bytes(32), ManualClock(START))
    with db.write() as session:
        _, token = create_token(session, name="fuzz", role=Role.ADMIN, now=START)
    admin = httpx.Client(headers={"Authorization": f"Bearer {token}"})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="critical", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    # Some data, so generated ids and codes sometimes hit real rows.
    admin.post(
        f"{url}/api/v1/products",
        json={"code": "cortex", "name": "C", "features": [{"code": "uniplex"}]},
    )
    admin.post(f"{url}/api/v1/customers", json={"name": "Fuzz Inc"})
    try:
        yield LiveServer(url, state), token
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        db.dispose()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_no_input_gives_a_server_error(fuzz_server: tuple[LiveServer, str], mode: GenerationMode) -> None:
    server, token = fuzz_server
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    headers = {"Authorization": f"Bearer {token}"}
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def exercise(case: schemathesis.Case) -> None:
            response = case.call(base_url=server.url, headers=headers, timeout=30)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}"
                )
            case.validate_response(response, checks=CHECKS)

        try:
            exercise()
        except Unsatisfiable:
            # Nothing to make invalid (e.g. GET /health has no parameters).
            assert mode is GenerationMode.NEGATIVE
    assert operations >= 14
    assert failures == []
