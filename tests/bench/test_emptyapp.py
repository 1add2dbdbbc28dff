"""The floor endpoints do the work they stand for: an agent accepts what they answer.

A floor that skipped a step (the request's signature, the sealed key) would make the
benchmark's floor rows higher than any correct server could reach, and the claim built on
them ("no correct activation can reach 0.5x") wrong.
"""

from __future__ import annotations

import json

import pytest
from bench.emptyapp import AGENT_PUBLIC, CHECKIN_KEY, VENDOR_KEY, app
from bench.http_server import sample_body
from bench.tessera_server import activation_bodies, installations
from fastapi.testclient import TestClient

from tessera.core import Keyring, License, load_signed
from tessera.core.errors import SignatureError
from tessera.core.protocol import (
    ActivationRequest,
    CheckinRequest,
    ServerResponse,
    derive_checkin_key,
    open_checkin_key,
)

KEYRING = Keyring([VENDOR_KEY.public])


def test_the_activation_floor_answers_what_an_agent_accepts() -> None:
    (installation,) = installations(["K7QXM-2VDRT-9HFNA-PC4WE-8BZJY"], 1, prefix="floor")
    body = activation_bodies([installation])[0]
    request = ActivationRequest.from_json(body)
    with TestClient(app) as client:
        reply = client.post("/activation-floor", content=body)
    assert reply.status_code == 200
    answer = ServerResponse.from_json(reply.content, KEYRING, request.nonce)
    assert answer.license is not None and answer.checkin_key is not None
    document = load_signed(answer.license, KEYRING).document
    assert isinstance(document, License)
    assert document.locking_id == installation.locking_id
    assert document.agent_key == request.agent_key
    assert open_checkin_key(answer.checkin_key, installation.agent) == derive_checkin_key(
        b"bench server secret", request.agent_key
    )


def other_system(body: bytes) -> str:
    """``body`` naming another installation than it was signed (or MACed) for."""
    forged = json.loads(body)
    forged["system_id"] = forged["system_id"][:-1] + ("0" if forged["system_id"][-1] != "0" else "1")
    return json.dumps(forged)


def test_the_activation_floor_checks_the_request_signature() -> None:
    (installation,) = installations(["K7QXM-2VDRT-9HFNA-PC4WE-8BZJY"], 1, prefix="floor")
    forged = other_system(activation_bodies([installation])[0])
    with TestClient(app) as client, pytest.raises(SignatureError):
        client.post("/activation-floor", content=forged)


def test_the_checkin_floor_checks_the_mac_and_signs_its_answer() -> None:
    body = sample_body()
    request = CheckinRequest.from_json(body)
    request.authenticate(AGENT_PUBLIC, CHECKIN_KEY)
    with TestClient(app) as client:
        reply = client.post("/floor", content=body)
        assert ServerResponse.from_json(reply.content, KEYRING, request.nonce).serial
        with pytest.raises(SignatureError):
            client.post("/floor", content=other_system(body))
