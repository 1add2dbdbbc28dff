"""Connect over real sockets: TLS with the pinned CA works, any other certificate is refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from agent_support import LICENSE_KEY, FakeServer, LiveServer, make_tls

from tessera.agent import Agent, AgentState, ServerUnreachable


def test_pinned_ca(open_agent: Callable[..., Agent], server: FakeServer, tmp_path: Path) -> None:
    ca_pem, cert, key = make_tls(tmp_path)
    live = LiveServer(server, tls=(cert, key))
    try:
        agent = open_agent(transport=None)
        agent.activate(live.url, LICENSE_KEY, ca_pem)
        assert agent.connect().state is AgentState.NORMAL
    finally:
        live.stop()


def test_certificate_of_another_ca_is_refused(
    open_agent: Callable[..., Agent], server: FakeServer, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ca_pem, _, _ = make_tls(tmp_path / "a")
    _, cert, key = make_tls(tmp_path / "b")
    live = LiveServer(server, tls=(cert, key))
    try:
        agent = open_agent(transport=None)
        with pytest.raises(ServerUnreachable, match="pinned CA"):
            agent.activate(live.url, LICENSE_KEY, ca_pem)
        assert agent.status().state is AgentState.UNLICENSED
    finally:
        live.stop()


def test_server_stopped_means_failover(
    open_agent: Callable[..., Agent], server: FakeServer, tmp_path: Path
) -> None:
    ca_pem, cert, key = make_tls(tmp_path)
    live = LiveServer(server, tls=(cert, key))
    agent = open_agent(transport=None)
    agent.activate(live.url, LICENSE_KEY, ca_pem)
    live.stop()
    with pytest.raises(ServerUnreachable):
        agent.connect()
    assert agent.status().state is AgentState.FAILOVER
    assert agent.check("uniplex")
