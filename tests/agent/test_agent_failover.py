"""Failover, emergency mode and checkpoint licenses, moved through time with a ManualClock."""

from __future__ import annotations

from collections.abc import Callable

from agent_support import FakeServer, make_license

from tessera.agent import Agent, AgentState
from tessera.core import ManualClock, SigningKey


def _activate(
    open_agent: Callable[..., Agent], server: FakeServer, vendor: SigningKey, **policy: object
) -> Agent:
    server.license_text = lambda key: make_license(
        vendor,
        {"uniplex": (5, None), "ctxjs": (1, None)},
        agent_key=key,
        emergency=("ctxjs",),
        **policy,
    )
    agent = open_agent()
    agent.activate("https://license.example", "K7QXM-2VDRT-9HFNA-PC4WE-8BZJY")
    return agent


def test_failover_then_emergency_then_back(
    open_agent: Callable[..., Agent], server: FakeServer, vendor: SigningKey, clock: ManualClock
) -> None:
    agent = _activate(open_agent, server, vendor)
    server.mode = "down"
    clock.advance(days=10)
    status = agent.status()
    assert status.state is AgentState.FAILOVER and status.failover_days_left == 20
    assert agent.check("uniplex") and agent.check("ctxjs")
    clock.advance(days=21)
    status = agent.status()
    assert status.state is AgentState.EMERGENCY and status.failover_days_left == 0
    assert agent.check("ctxjs") and not agent.check("uniplex")
    server.mode = "ok"
    assert agent.connect().state is AgentState.NORMAL
    assert agent.check("uniplex")


def test_failover_days_from_license(
    open_agent: Callable[..., Agent], server: FakeServer, vendor: SigningKey, clock: ManualClock
) -> None:
    agent = _activate(open_agent, server, vendor, failover_days=5)
    clock.advance(days=3)
    assert agent.status().failover_days_left == 2
    clock.advance(days=2)
    assert agent.status().state is AgentState.EMERGENCY


def test_fresh_offline_import_gets_the_grace_once(
    open_agent: Callable[..., Agent], vendor: SigningKey, clock: ManualClock
) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, emergency=("backup",)))
    assert agent.status().state is AgentState.NORMAL
    clock.advance(days=2)
    assert agent.status().state is AgentState.FAILOVER
    assert agent.status().failover_days_left == 28
    clock.advance(days=29)
    agent.import_license(make_license(vendor, emergency=("backup",), revision=2))
    status = agent.status()
    assert status.state is AgentState.EMERGENCY  # re-import does not restart it
    # no server to connect to: the advice fits an offline installation
    assert "agent connect" not in status.message and "tessera agent import" in status.message


def test_emergency_advice_online(
    open_agent: Callable[..., Agent], server: FakeServer, vendor: SigningKey, clock: ManualClock
) -> None:
    agent = _activate(open_agent, server, vendor)
    clock.advance(days=31)
    assert "run 'tessera agent connect'" in agent.status().message


def test_checkpoint_license_lapses_and_renews(
    open_agent: Callable[..., Agent], server: FakeServer, vendor: SigningKey, clock: ManualClock
) -> None:
    agent = _activate(open_agent, server, vendor, checkpoint_days=7)
    clock.advance(days=6)
    assert agent.check("uniplex")
    clock.advance(days=2)
    assert not agent.check("uniplex") and not agent.check("ctxjs")
    status = agent.status()
    assert "checkpoint" in status.denied["uniplex"]
    assert "every feature is refused until a check-in" in status.message
    assert "everything works" not in status.message
    agent.connect()
    assert agent.check("uniplex")
    clock.advance(days=6)
    assert agent.check("uniplex")


def test_a_lapsed_checkpoint_in_emergency_mode_says_every_feature_is_refused(
    open_agent: Callable[..., Agent], server: FakeServer, vendor: SigningKey, clock: ManualClock
) -> None:
    """Past both the checkpoint (3 days) and the failover period (10): emergency mode would
    leave the emergency feature working, but the lapsed checkpoint refuses it too, and the
    message must say so rather than "only emergency features work"."""
    agent = _activate(open_agent, server, vendor, checkpoint_days=3, failover_days=10)
    server.mode = "down"
    clock.advance(days=12)
    status = agent.status()
    assert status.state is AgentState.EMERGENCY and status.failover_days_left == 0
    assert not agent.check("ctxjs") and not agent.check("uniplex")
    assert "only emergency features work" not in status.message
    assert "every feature is refused (the emergency features too) until a check-in" in status.message
    assert status.message.startswith("emergency mode: ") and "tessera agent connect" in status.message


def test_connect_off_license_never_fails_over(
    open_agent: Callable[..., Agent], vendor: SigningKey, clock: ManualClock
) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, connect=False))
    clock.advance(days=400)
    assert agent.status().state is AgentState.NORMAL


def test_fresh_installation_grace_features_once(
    open_agent: Callable[..., Agent], vendor: SigningKey, clock: ManualClock
) -> None:
    agent = open_agent(grace_features=("basic",))
    status = agent.status()
    assert status.state is AgentState.UNLICENSED and status.failover_days_left == 30
    assert agent.check("basic") and not agent.check("uniplex")
    clock.advance(days=30)
    assert not agent.check("basic")
    assert agent.status().failover_days_left == 0
    agent.close()
    assert not open_agent(agent.state_dir, grace_features=("basic",)).check("basic")


def test_no_grace_features_means_plain_unlicensed(open_agent: Callable[..., Agent]) -> None:
    status = open_agent().status()
    assert status.state is AgentState.UNLICENSED and status.failover_days_left is None


def test_failover_since_is_the_first_failure(
    open_agent: Callable[..., Agent], server: FakeServer, vendor: SigningKey, clock: ManualClock
) -> None:
    import contextlib

    from tessera.agent import ConnectError

    agent = _activate(open_agent, server, vendor)
    server.mode = "down"
    clock.advance(days=2)
    first = clock.now().replace(microsecond=0)
    for _ in range(3):
        with contextlib.suppress(ConnectError):
            agent.connect()
        clock.advance(hours=5)
    assert agent.status().failover_since == first
    assert agent.status().to_json()["failover_since"] == first.strftime("%Y-%m-%dT%H:%M:%SZ")
    server.mode = "ok"
    assert agent.connect().failover_since is None
