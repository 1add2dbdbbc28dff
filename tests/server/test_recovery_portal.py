"""The vendor's recovery portal, a real HTTP server on loopback: its verdict decides,
and a timeout or an error denies. The request it gets is HMAC-signed."""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tessera.core.signing import Keyring
from tessera.server import recovery
from tessera.server.app import ServerState
from tessera.server.config import ConfigError, load_config
from tessera.server.portal import (
    SIGNATURE_HEADER,
    PortalConfig,
    PortalVerdict,
    RecoveryPortal,
    sign_body,
)
from tessera.server.tokens import Principal

from .conftest import START, LiveServer
from .helpers import agent, setup_license

SECRET = b"portal-secret-0123456789abcdef"


class Portal:
    """What the vendor runs: checks the signature, answers as ``mode`` says."""

    def __init__(self) -> None:
        self.mode = "allow"
        self.questions: list[dict[str, Any]] = []
        portal = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                signed = hmac.compare_digest(self.headers.get(SIGNATURE_HEADER, ""), sign_body(SECRET, body))
                portal.questions.append({**json.loads(body), "signed": signed})
                if portal.mode == "slow":
                    time.sleep(1.5)
                if portal.mode == "error" or not signed:
                    self.send_response(500)
                    self.end_headers()
                    return
                answer = {"allow": portal.mode == "allow", "reason": f"portal says {portal.mode}"}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/recovery"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def portal(state: ServerState, tmp_path: Path) -> Iterator[Portal]:
    running = Portal()
    secret = tmp_path / "portal-hmac"
    secret.write_bytes(SECRET)
    state.portal = RecoveryPortal(PortalConfig(running.url, secret, timeout_seconds=0.5))
    yield running
    running.server.shutdown()
    running.server.server_close()


def test_the_portal_decides_when_the_rule_says_no(
    live_server: LiveServer,
    state: ServerState,
    admin: Principal,
    admin_token: str,
    keyring: Keyring,
    portal: Portal,
) -> None:
    serial, key = setup_license(
        state, admin, START, connect=False, recovery_allowance=0, recovery_old_container="revoke"
    )
    connect, api = live_server.client(), live_server.client(admin_token)
    assert connect.post("/api/v1/activate", content=agent(1).activation(key).to_json()).is_success
    assert portal.questions == []  # a free slot needs nobody's permission
    # Allowed by the portal: the agent-side recovery goes through.
    allowed = connect.post("/api/v1/recover", content=agent(2).activation(key).to_json())
    assert allowed.status_code == 200, allowed.text
    question = portal.questions[-1]
    assert question["signed"] and question["serial"] == serial
    assert question["from"] == agent(1).locking_id and question["to"] == agent(2).locking_id
    # Refused, timed out, failed: denied with the reason, and nothing moves.
    for mode, reason in (
        ("deny", "the recovery portal refused: portal says deny"),
        ("slow", "the recovery portal did not answer in time"),
        ("error", "the recovery portal answered 500"),
    ):
        portal.mode = mode
        refused = api.post(f"/api/v1/licenses/{serial}/rehost", json={"locking_id": agent(3).locking_id})
        assert refused.status_code == 403 and refused.json()["detail"] == reason
    portal.mode = "allow"
    moved = api.post(f"/api/v1/licenses/{serial}/rehost", json={"locking_id": agent(3).locking_id})
    assert moved.status_code == 200 and moved.json()["rule"] == "portal"
    decisions = api.get(f"/api/v1/licenses/{serial}/recoveries").json()
    assert [(d["granted"], d["rule"]) for d in decisions] == [
        (True, "portal"),
        (False, "portal"),
        (False, "portal"),
        (False, "portal"),
        (True, "portal"),
    ]


def test_an_unreachable_portal_denies(
    live_server: LiveServer,
    state: ServerState,
    admin: Principal,
    keyring: Keyring,
    portal: Portal,
) -> None:
    portal.server.shutdown()
    portal.server.server_close()
    _, key = setup_license(state, admin, START, connect=False, recovery_allowance=0)
    connect = live_server.client()
    assert connect.post("/api/v1/activate", content=agent(1).activation(key).to_json()).is_success
    refused = connect.post("/api/v1/recover", content=agent(2).activation(key).to_json())
    assert refused.status_code == 403
    assert refused.json()["detail"].startswith("the recovery portal cannot be reached")


def test_the_portal_is_configured_in_tessera_toml(tmp_path: Path) -> None:
    base = '[server]\ndatabase = "sqlite:///x.db"\n'
    (tmp_path / "tessera.toml").write_text(base)
    assert load_config(tmp_path).portal is None
    (tmp_path / "tessera.toml").write_text(
        base + '[recovery]\nportal_url = "https://127.0.0.1:9/r"\n'
        'portal_secret_file = "secrets/portal"\nportal_timeout_seconds = 2\n'
    )
    portal = load_config(tmp_path).portal
    assert portal is not None and portal.timeout_seconds == 2.0
    assert portal.secret_file == tmp_path.resolve() / "secrets" / "portal"
    for bad, why in (
        ('portal_url = "ftp://x"\nportal_secret_file = "s"\n', "https://"),
        ('portal_url = "https://x"\n', "portal_secret_file is missing"),
        (
            'portal_url = "https://x"\nportal_secret_file = "s"\nportal_timeout_seconds = 0\n',
            "0-60",
        ),
        ('portal_urll = "https://x"\n', "unknown key"),
    ):
        (tmp_path / "tessera.toml").write_text(base + "[recovery]\n" + bad)
        with pytest.raises(ConfigError, match=why):
            load_config(tmp_path)


class RacingPortal:
    """A portal whose answers the test controls: it approves moves away from ``approves``
    only, and while it thinks about the first move to ``race_to``, another recovery of
    the license (``during``) gets in and commits - two recoveries at nearly the same time."""

    def __init__(self, approves: str, race_to: str, during: Any) -> None:
        self.approves, self.race_to, self.during = approves, race_to, during
        self.questions: list[tuple[str, str]] = []

    def ask(self, question: dict[str, Any]) -> PortalVerdict:
        self.questions.append((question["from"], question["to"]))
        if question["to"] == self.race_to and self.during is not None:
            during, self.during = self.during, None
            during()  # the other recovery is decided and committed before this answer
        allow = question["from"] == self.approves
        return PortalVerdict(allow, "allowed" if allow else "the portal refused", question=question)


def test_a_portal_verdict_only_applies_to_the_move_it_approved(
    live_server: LiveServer, state: ServerState, admin: Principal, admin_token: str
) -> None:
    """Y0 bound; Y1 and Y2 recover at once. The portal approved "Y0 to Y1" and "Y0 to Y2":
    once Y1 has the license, the approval "Y0 to Y2" must not move it on from Y1 (and
    blacklist Y1, which nobody approved): the portal is asked about Y1 to Y2."""
    serial, key = setup_license(state, admin, START, connect=False, recovery_allowance=0)
    connect, api = live_server.client(), live_server.client(admin_token)
    y0, y1, y2 = agent(1), agent(2), agent(3)
    assert connect.post("/api/v1/activate", content=y0.activation(key).to_json()).is_success
    first: list[httpx.Response] = []

    def y1_recovers() -> None:
        first.append(connect.post("/api/v1/recover", content=y1.activation(key).to_json()))

    fake = RacingPortal(approves=y0.locking_id, race_to=y2.locking_id, during=y1_recovers)
    state.portal = fake  # type: ignore[assignment]
    second = connect.post("/api/v1/recover", content=y2.activation(key).to_json())
    assert first[0].status_code == 200, first[0].text
    assert fake.questions == [
        (y0.locking_id, y2.locking_id),
        (y0.locking_id, y1.locking_id),
        (y1.locking_id, y2.locking_id),  # asked again about the move as it is now
    ]
    assert second.status_code == 403 and second.json()["detail"] == "the portal refused"
    assert [e["locking_id"] for e in api.get("/api/v1/blacklist").json()] == [y0.locking_id]
    decisions = api.get(f"/api/v1/licenses/{serial}/recoveries").json()
    assert [(d["from"], d["to"], d["granted"]) for d in decisions] == [
        (y0.locking_id, y1.locking_id, True),
        (y1.locking_id, y2.locking_id, False),
    ]


def test_a_license_that_keeps_moving_is_refused_with_a_reason_to_retry(
    live_server: LiveServer, state: ServerState, admin: Principal, admin_token: str
) -> None:
    """Each answer arrives after the license moved again: after a few questions the
    request is refused (409), nothing changed by it, rather than waiting for ever."""
    serial, key = setup_license(state, admin, START, connect=False, recovery_allowance=0)
    connect, api = live_server.client(), live_server.client(admin_token)
    assert connect.post("/api/v1/activate", content=agent(1).activation(key).to_json()).is_success
    target = agent(9)
    movers = iter(range(2, 9))

    class MovingPortal:
        def ask(self, question: dict[str, Any]) -> PortalVerdict:
            if question["to"] == target.locking_id:
                state.portal = None  # the other recoveries go by the rule: support authorized them
                with state.db.write() as session:
                    recovery.authorize_recovery(session, admin, serial, 1, state.now())
                moved = connect.post("/api/v1/recover", content=agent(next(movers)).activation(key).to_json())
                assert moved.status_code == 200, moved.text
                state.portal = self  # type: ignore[assignment]
            return PortalVerdict(True, "allowed", question=question)

    state.portal = MovingPortal()  # type: ignore[assignment]
    refused = connect.post("/api/v1/recover", content=target.activation(key).to_json())
    assert refused.status_code == 409
    assert "moved by another recovery while the recovery portal was asked" in refused.json()["detail"]
    assert "retry" in refused.json()["detail"]
    decisions = api.get(f"/api/v1/licenses/{serial}/recoveries").json()
    assert target.locking_id not in {d["to"] for d in decisions}
