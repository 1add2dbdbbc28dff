"""Connect: activation, check-in, refused responses, directives, and what goes on the wire."""

from __future__ import annotations

import base64
from collections.abc import Callable

import httpx
import pytest
from agent_support import LICENSE_KEY, LOCKING_ID, FakeServer, make_license

from tessera.agent import Agent, AgentState, BadResponse, ServerRefused, ServerUnreachable
from tessera.core import ManualClock, SigningKey
from tessera.core.protocol import derive_checkin_key
from tessera.core.signing import Keyring

ALLOWED_ACTIVATE = {
    "protocol",
    "type",
    "license_key",
    "locking_id",
    "system_id",
    "nonce",
    "agent_key",
    "product",  # the product the agent runs in: refused early if the key is for another
    "signature",
}
ALLOWED_CHECKIN = ALLOWED_ACTIVATE - {"agent_key", "product", "signature"} | {"mac", "accept", "revision"}


def test_activation_imports_the_license(activated: Agent, server: FakeServer) -> None:
    status = activated.status()
    assert status.state is AgentState.NORMAL
    assert activated.check("uniplex")
    assert server.agent_key is not None  # the license is bound to this agent's key


def test_checkin_delivers_central_change(activated: Agent, server: FakeServer, vendor: SigningKey) -> None:
    server.pending_license = make_license(
        vendor, {"uniplex": (9, None)}, revision=2, agent_key=server.agent_key
    )
    status = activated.connect()
    assert status.features["uniplex"].count == 9
    assert not activated.check("backup")


@pytest.mark.parametrize(
    ("mode", "error", "words"),
    [
        ("down", ServerUnreachable, "cannot reach"),
        ("slow", ServerUnreachable, "timed out"),
        ("garbage", BadResponse, "not JSON"),
        ("unsigned", BadResponse, "signature"),
        ("badsig", BadResponse, "unknown key"),
        ("replay", BadResponse, "replayed"),
        ("refuse", ServerRefused, "license revoked"),
    ],
)
def test_untrusted_answers_are_refused_and_state_kept(
    activated: Agent, server: FakeServer, mode: str, error: type[Exception], words: str
) -> None:
    activated.connect()  # a good answer the replay mode can record
    server.mode = mode
    with pytest.raises(error, match=words):
        activated.connect()
    status = activated.status()
    assert status.state is AgentState.FAILOVER
    assert status.failover_days_left == 30
    assert activated.check("uniplex")


def test_forged_license_in_a_good_response_is_ignored(activated: Agent, server: FakeServer) -> None:
    server.pending_license = make_license(SigningKey.generate(), {"uniplex": (99, None)})
    status = activated.connect()
    assert status.state is AgentState.NORMAL
    assert status.features["uniplex"].count == 5


def test_lock_directive_and_release(activated: Agent, server: FakeServer) -> None:
    server.directives = ("lock",)
    assert activated.connect().state is AgentState.LOCKED
    assert not activated.check("uniplex")
    server.directives = ()
    assert activated.connect().state is AgentState.NORMAL


def test_revoke_directive_withdraws_the_license(
    activated: Agent, server: FakeServer, vendor: SigningKey
) -> None:
    server.directives = ("revoke",)
    status = activated.connect()
    assert status.state is AgentState.UNLICENSED and "revoked" in status.message
    with pytest.raises(Exception, match="revoked"):
        activated.import_license(server.license_text(server.agent_key or ""))


def test_license_of_another_installation_is_refused(
    open_agent: Callable[..., Agent], vendor: SigningKey
) -> None:
    agent = open_agent()
    other = SigningKey.generate().public.to_base64()
    with pytest.raises(Exception, match="another installation"):
        agent.import_license(make_license(vendor, agent_key=other))


def test_requests_carry_only_allowed_fields(activated: Agent, server: FakeServer) -> None:
    activated.connect()
    activate, checkin = server.bodies
    assert set(activate) == ALLOWED_ACTIVATE and set(checkin) == ALLOWED_CHECKIN
    assert activate["locking_id"] == LOCKING_ID
    assert activate["license_key"] == LICENSE_KEY
    assert activate["product"] == activated.installation.product
    import getpass
    import socket

    wire = repr(server.bodies)
    for personal in {socket.gethostname(), getpass.getuser()}:
        if len(personal) >= 4:  # shorter names occur in random base64 by chance
            assert personal not in wire
        for body in server.bodies:
            assert personal not in body.values()


def test_checkins_are_maced_with_the_key_from_activation_else_signed(
    activated: Agent, server: FakeServer
) -> None:
    activated.connect()
    assert "mac" in server.bodies[-1] and "signature" not in server.bodies[-1]
    assert activated._store.get_all()["checkin_key"] != ""  # kept encrypted, never in clear
    raw = derive_checkin_key(server.secret, server.agent_key or "")
    assert base64.b64encode(raw).decode() not in repr(activated._store.get_all())
    # A server that hands out no check-in key (an older one) gets signed check-ins.
    server.hand_out_checkin_keys = False
    activated.activate("https://license.example", LICENSE_KEY)
    activated.connect()
    assert "signature" in server.bodies[-1] and "mac" not in server.bodies[-1]


def test_background_thread_checks_in(activated: Agent, server: FakeServer, clock: ManualClock) -> None:
    import time

    calls = len(server.bodies)
    clock.advance(days=2)  # a check-in is overdue: the thread runs one at once
    activated.start()
    deadline = time.monotonic() + 5
    while len(server.bodies) == calls and time.monotonic() < deadline:
        time.sleep(0.01)
    activated.stop()
    assert len(server.bodies) > calls
    assert activated.status().state is AgentState.NORMAL


def test_a_failed_checkin_logs_one_clear_reason(
    activated: Agent, server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.mode = "garbage"
    with caplog.at_level("WARNING", logger="tessera.agent"), pytest.raises(BadResponse):
        activated.connect()
    records = [r for r in caplog.records if r.name == "tessera.agent"]
    assert len(records) == 1
    assert "running on the last verified state" in records[0].getMessage()
    assert "not a valid response" in records[0].getMessage()


def test_huge_answer_is_refused(activated: Agent) -> None:
    import httpx

    huge = b"{" + b" " * (2 * 1024 * 1024) + b"}"
    activated._transport = httpx.MockTransport(lambda request: httpx.Response(200, content=huge))
    with pytest.raises(BadResponse, match="too large"):
        activated.connect()
    assert activated.check("uniplex")


def test_a_batch_signed_answer_is_taken_and_a_tampered_one_refused(
    activated: Agent, server: FakeServer, vendor: SigningKey
) -> None:
    server.mode = "batch"
    server.directives = ("lock",)
    assert activated.connect().state is AgentState.LOCKED  # the answer in the batch counted
    assert server.bodies[-1]["accept"] == "batch"
    server.directives = ()
    server.mode = "batch-badsig"  # the batch's root signed by another key: no answer
    with pytest.raises(BadResponse):
        activated.connect()
    assert activated.status().state is AgentState.LOCKED  # nothing changed


def test_an_older_server_is_asked_again_as_an_older_agent_asks(activated: Agent, server: FakeServer) -> None:
    server.mode = "old"
    activated.connect()
    refused, asked_again = server.bodies[-2:]
    assert refused["accept"] == "batch" and refused["revision"] == 1
    assert "accept" not in asked_again and "revision" not in asked_again
    assert "mac" in asked_again


def test_checkins_name_the_revision_in_force(
    activated: Agent, server: FakeServer, vendor: SigningKey
) -> None:
    """So a server whose answer with a new revision was lost sends it again."""
    activated.connect()
    assert server.bodies[-1]["revision"] == 1
    server.pending_license = make_license(
        vendor, {"uniplex": (9, None)}, revision=2, agent_key=server.agent_key
    )
    activated.connect()
    activated.connect()
    assert server.bodies[-1]["revision"] == 2


@pytest.mark.parametrize(
    "url",
    [
        "http://license.example",
        "ftp://license.example",
        "https://",
        "https://127.0.0.1:abc",
        "https://h:99999",
    ],
)
def test_only_a_tls_url_with_host_and_port_is_used(
    open_agent: Callable[..., Agent], server: FakeServer, url: str
) -> None:
    """The license key goes out in every request: never in clear, never to a URL that is
    no address (a bad port was an internal error)."""
    from tessera.core.errors import FormatError

    agent = open_agent()
    with pytest.raises(FormatError, match="server URL"):
        agent.activate(url, LICENSE_KEY)
    assert server.bodies == [] and agent.status().state is AgentState.UNLICENSED


@pytest.mark.parametrize(
    ("status", "verb"), [(503, "is unavailable"), (502, "is unavailable"), (403, "refused")]
)
def test_an_unavailable_server_is_not_called_a_refusal(status: int, verb: str) -> None:
    """Behind the relay the agent said 'the license server refused (HTTP 503): the license
    server is unreachable'."""
    from tessera.agent.connect import ConnectClient

    detail = "the relay cannot reach the license server: connection refused"
    transport = httpx.MockTransport(lambda _request: httpx.Response(status, json={"detail": detail}))
    client = ConnectClient(
        "https://license.example:7790", None, Keyring([SigningKey.generate().public]), transport=transport
    )
    with pytest.raises(ServerRefused) as caught:
        client.post_raw("/api/v1/checkin", b"{}")
    assert str(caught.value) == f"the license server {verb} (HTTP {status}): {detail}"
