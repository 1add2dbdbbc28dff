"""Seats: never beyond the licensed count; a reduced count is reported, nobody is dropped."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from agent_support import make_license

from tessera.agent import Agent, SeatError
from tessera.core import FormatError, SigningKey


def test_assign_up_to_the_count(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, {"uniplex": (2, None)}, connect=False))
    assert agent.assign("uniplex", "alice")
    assert not agent.assign("uniplex", "alice")  # idempotent
    assert agent.assign("uniplex", "bob")
    with pytest.raises(SeatError, match="all 2 seat"):
        agent.assign("uniplex", "carol")
    seats = agent.seats()["uniplex"]
    assert seats.subjects == ("alice", "bob") and seats.free == 0
    agent.unassign("uniplex", "alice")
    assert agent.assign("uniplex", "carol")
    assert agent.seats()["uniplex"].subjects == ("bob", "carol")
    assert agent.holds("uniplex", "bob") and not agent.holds("uniplex", "alice")
    assert not agent.holds("uniplex", "nobody")


def test_unlicensed_feature_and_bad_subject(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, {"uniplex": (2, None)}, connect=False))
    with pytest.raises(SeatError, match="not licensed"):
        agent.assign("other", "alice")
    with pytest.raises(FormatError, match="invalid subject"):
        agent.assign("uniplex", "bad\nname")
    with pytest.raises(SeatError, match="holds no seat"):
        agent.unassign("uniplex", "nobody")


def test_reduced_count_is_reported_not_enforced(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, {"uniplex": (3, None)}, connect=False))
    for who in ("alice", "bob", "carol"):
        agent.assign("uniplex", who)
    status = agent.import_license(make_license(vendor, {"uniplex": (1, None)}, revision=2, connect=False))
    assert status.over_assigned == {"uniplex": 2}
    seats = agent.seats()["uniplex"]
    assert seats.subjects == ("alice", "bob", "carol") and seats.over_assigned == 2
    assert agent.holds("uniplex", "carol")  # nobody is dropped; the admin decides
    with pytest.raises(SeatError):
        agent.assign("uniplex", "dave")


def test_two_agents_on_one_state_never_oversell(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    first = open_agent()
    first.import_license(make_license(vendor, {"uniplex": (1, None)}, connect=False))
    second = open_agent()
    assert first.assign("uniplex", "alice")
    with pytest.raises(SeatError):
        second.assign("uniplex", "bob")


def test_concurrent_assigns_from_threads(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    import threading

    agent = open_agent()
    agent.import_license(make_license(vendor, {"uniplex": (5, None)}, connect=False))
    results: list[bool] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            agent.assign("uniplex", f"user-{i}")
            ok = True
        except SeatError:
            ok = False
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 5
    assert len(agent.seats()["uniplex"].subjects) == 5
