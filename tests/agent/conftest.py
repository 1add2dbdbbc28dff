"""Fixtures for the agent tests (helpers live in agent_support.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import LICENSE_KEY, LOCKING_ID, PRODUCT, START, VERSION, FakeServer, make_license

from tessera.agent import Agent
from tessera.core import Keyring, ManualClock, SigningKey


@pytest.fixture(scope="session")
def vendor() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="session")
def keyring(vendor: SigningKey) -> Keyring:
    return Keyring([vendor.public])


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def server(vendor: SigningKey, clock: ManualClock) -> FakeServer:
    return FakeServer(vendor, clock, lambda agent_key: make_license(vendor, agent_key=agent_key))


@pytest.fixture
def open_agent(
    tmp_path: Path, keyring: Keyring, clock: ManualClock, server: FakeServer
) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def factory(state_dir: Path | None = None, **kwargs: Any) -> Agent:
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("locking_id", LOCKING_ID)
        kwargs.setdefault("transport", server.transport())
        agent = Agent(state_dir or tmp_path / "state", keyring, PRODUCT, VERSION, **kwargs)
        agents.append(agent)
        return agent

    yield factory
    for agent in agents:
        agent.close()


@pytest.fixture
def activated(open_agent: Callable[..., Agent]) -> Agent:
    agent = open_agent()
    agent.activate("https://license.example", LICENSE_KEY)
    return agent
