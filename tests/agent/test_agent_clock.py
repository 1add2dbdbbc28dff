"""Secure clock: a clock set back beyond the tolerance is detected until a check-in."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta

import pytest
from agent_support import FakeServer, make_license

from tessera.agent import Agent, AgentState, ServerUnreachable
from tessera.core import ManualClock, SigningKey


def test_clock_set_back_a_year(
    open_agent: Callable[..., Agent], server: FakeServer, vendor: SigningKey, clock: ManualClock
) -> None:
    server.license_text = lambda key: make_license(
        vendor, {"trial": (1, date(2027, 1, 31)), "base": (1, None)}, agent_key=key, connect=False
    )
    agent = open_agent()
    agent.activate("https://license.example", "K7QXM-2VDRT-9HFNA-PC4WE-8BZJY")
    clock.advance(days=30)
    assert agent.check("trial")
    agent.close()
    clock.advance(days=-365)  # set back a year to revive the trial
    agent = open_agent()
    status = agent.status()
    assert status.state is AgentState.CLOCK_TAMPERED
    assert not agent.check("trial") and agent.check("base")
    assert "clock" in status.denied["trial"]
    # the administrator sets the clock right; the server's signed time restores trust
    clock.advance(days=365)
    assert agent.connect().state is AgentState.NORMAL
    clock.advance(days=100)  # past the trial's expiry; setting the clock back cannot revive it
    assert not agent.check("trial")
    clock.advance(days=-365)
    assert agent.status().state is AgentState.CLOCK_TAMPERED
    assert not agent.check("trial") and agent.check("base")
    clock.advance(days=365)
    assert agent.connect().state is AgentState.NORMAL


def test_small_skew_is_tolerated(
    open_agent: Callable[..., Agent], vendor: SigningKey, clock: ManualClock
) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, {"trial": (1, date(2027, 1, 31))}, connect=False))
    clock.advance(hours=5)
    agent.status()
    clock.advance(hours=-8)
    assert agent.status().state is AgentState.NORMAL
    clock.advance(-timedelta(days=2))
    assert agent.status().state is AgentState.CLOCK_TAMPERED
    assert not agent.check("trial")


def test_server_time_corrects_a_clock_that_ran_ahead(
    activated: Agent, server: FakeServer, clock: ManualClock
) -> None:
    clock.advance(days=3650)  # local clock jumps years ahead by mistake, agent records it
    activated.status()
    clock.advance(days=-3650)
    assert activated.status().state is AgentState.CLOCK_TAMPERED
    assert activated.connect().state is AgentState.NORMAL


def test_a_failed_checkin_under_a_clock_set_back_is_dated_in_trusted_time(
    activated: Agent, server: FakeServer, clock: ManualClock
) -> None:
    last = activated.status().last_checkin
    assert last is not None
    clock.advance(days=-2)
    server.mode = "down"
    with pytest.raises(ServerUnreachable):
        activated.connect()
    since = activated.status().failover_since
    assert since is not None and since >= last
