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


def test_without_a_pinned_ca_the_refusal_names_the_system_store(
    open_agent: Callable[..., Agent], server: FakeServer, tmp_path: Path
) -> None:
    """QA: with no --ca (the system's CA store trusted) the refusal said "not signed by the
    pinned CA", though nothing was pinned."""
    _, cert, key = make_tls(tmp_path)
    live = LiveServer(server, tls=(cert, key))
    try:
        agent = open_agent(transport=None)
        with pytest.raises(ServerUnreachable) as caught:
            agent.activate(live.url, LICENSE_KEY, None)
        message = str(caught.value)
        assert "not trusted by this machine's CA store" in message and "--ca" in message, message
        assert "pinned CA" not in message
    finally:
        live.stop()


def test_a_host_name_the_certificate_lacks_is_named_as_the_cause(
    open_agent: Callable[..., Agent], server: FakeServer, tmp_path: Path
) -> None:
    ca_pem, cert, key = make_tls(tmp_path)  # made out to 127.0.0.1 only
    live = LiveServer(server, tls=(cert, key))
    try:
        agent = open_agent(transport=None)
        with pytest.raises(ServerUnreachable) as caught:
            agent.activate(live.url.replace("127.0.0.1", "localhost"), LICENSE_KEY, ca_pem)
        message = str(caught.value)
        assert "not made out to the host in the URL" in message and "pinned CA" not in message, message
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
