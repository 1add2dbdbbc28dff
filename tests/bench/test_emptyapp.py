"""The floor endpoints do the work they stand for: an agent accepts what they answer.

A floor that skipped a step (the request's signature, the sealed key) would make the
benchmark's floor rows higher than any correct server could reach, and the claim built on
them ("no correct activation can reach 0.5x") wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from bench.emptyapp import AGENT_PUBLIC, CHECKIN_KEY, VENDOR_KEY
from bench.http_server import sample_body, uvicorn_args
from bench.processes import free_port, serving
from bench.tessera_server import activation_bodies, installations

from tessera.core import Keyring, License, load_signed
from tessera.core.protocol import (
    ActivationRequest,
    CheckinRequest,
    ServerResponse,
    derive_checkin_key,
    open_checkin_key,
)

KEYRING = Keyring([VENDOR_KEY.public])


@pytest.fixture(scope="module")
def baseline() -> Iterator[str]:
    """The baseline app as the benchmark serves it (uvicorn, one worker, loopback): its URL."""
    port = free_port()
    with serving([*uvicorn_args(port), "--log-level", "critical"], port=port):
        yield f"http://127.0.0.1:{port}"


def post(url: str, body: bytes | str) -> httpx.Response:
    """One request on a connection of its own: a refused request ends in an exception in
    the app (a 500), and whatever uvicorn then does with that connection must not reach
    the next request."""
    return httpx.post(url, content=body, timeout=30)


def other_system(body: bytes) -> str:
    """``body`` naming another installation than it was signed (or MACed) for."""
    forged = json.loads(body)
    forged["system_id"] = forged["system_id"][:-1] + ("0" if forged["system_id"][-1] != "0" else "1")
    return json.dumps(forged)


def test_the_activation_floor_answers_what_an_agent_accepts(baseline: str) -> None:
    (installation,) = installations(["K7QXM-2VDRT-9HFNA-PC4WE-8BZJY"], 1, prefix="floor")
    body = activation_bodies([installation])[0]
    request = ActivationRequest.from_json(body)
    reply = post(baseline + "/activation-floor", body)
    assert reply.status_code == 200, reply.text
    answer = ServerResponse.from_json(reply.content, KEYRING, request.nonce)
    assert answer.license is not None and answer.checkin_key is not None
    document = load_signed(answer.license, KEYRING).document
    assert isinstance(document, License)
    assert document.locking_id == installation.locking_id
    assert document.agent_key == request.agent_key
    assert open_checkin_key(answer.checkin_key, installation.agent) == derive_checkin_key(
        b"bench server secret", request.agent_key
    )


def test_the_activation_floor_checks_the_request_signature(baseline: str) -> None:
    (installation,) = installations(["K7QXM-2VDRT-9HFNA-PC4WE-8BZJY"], 1, prefix="floor")
    forged = other_system(activation_bodies([installation])[0])
    assert post(baseline + "/activation-floor", forged).status_code == 500  # SignatureError


def test_the_checkin_floor_checks_the_mac_and_signs_its_answer(baseline: str) -> None:
    body = sample_body()
    request = CheckinRequest.from_json(body)
    request.authenticate(AGENT_PUBLIC, CHECKIN_KEY)
    reply = post(baseline + "/floor", body)
    assert reply.status_code == 200, reply.text
    assert ServerResponse.from_json(reply.content, KEYRING, request.nonce).serial
    assert post(baseline + "/floor", other_system(body)).status_code == 500  # SignatureError
