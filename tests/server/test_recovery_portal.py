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

import pytest

from tessera.core.signing import Keyring
from tessera.server.app import ServerState
from tessera.server.config import ConfigError, load_config
from tessera.server.portal import SIGNATURE_HEADER, PortalConfig, RecoveryPortal, sign_body
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
