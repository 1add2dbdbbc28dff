"""check / require / status, and hot update of the license in a running agent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import date

import pytest
from agent_support import OTHER_LOCKING_ID, make_license

from tessera.agent import Agent, AgentState, FeatureDenied
from tessera.core import SigningKey, VerificationError


def test_fresh_agent_is_unlicensed(open_agent: Callable[..., Agent]) -> None:
    agent = open_agent()
    status = agent.status()
    assert status.state is AgentState.UNLICENSED
    assert status.failover_days_left is None
    assert not agent.check("uniplex")
    with pytest.raises(FeatureDenied, match="no license"):
        agent.require("uniplex")


def test_import_grants_features(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    agent = open_agent()
    status = agent.import_license(make_license(vendor, connect=False))
    assert status.state is AgentState.NORMAL
    assert agent.check("uniplex") and agent.check("backup")
    assert not agent.check("nothing")
    agent.require("uniplex")
    with pytest.raises(FeatureDenied, match="not licensed here"):
        agent.require("nothing")
    assert status.to_json()["features"] == {
        "backup": {"count": 1, "expiry": "permanent"},
        "uniplex": {"count": 5, "expiry": "permanent"},
    }


def test_expired_entitlement_is_not_granted(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, {"old": (1, date(2026, 1, 1)), "new": (1, date(2027, 1, 1))}))
    assert agent.check("new") and not agent.check("old")
    with pytest.raises(FeatureDenied, match="expired on 2026-01-01"):
        agent.require("old")


def test_state_survives_reopen(
    open_agent: Callable[..., Agent], vendor: SigningKey, tmp_path: object
) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, connect=False))
    agent.close()
    again = open_agent()
    assert again.check("uniplex")


def test_failed_import_keeps_old_license(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, {"uniplex": (5, None)}, connect=False))
    forged = make_license(SigningKey.generate(), {"uniplex": (500, None), "extra": (1, None)})
    with pytest.raises(VerificationError):
        agent.import_license(forged)
    elsewhere = make_license(vendor, {"extra": (1, None)}, locking_id=OTHER_LOCKING_ID)
    with pytest.raises(VerificationError, match="another machine"):
        agent.import_license(elsewhere)
    wrong_version = make_license(vendor, {"extra": (1, None)}, version="5.*")
    with pytest.raises(VerificationError, match="version"):
        agent.import_license(wrong_version)
    assert agent.check("uniplex") and not agent.check("extra")
    assert agent.status().features["uniplex"].count == 5


def test_hot_update_while_readers_run(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, {"uniplex": (5, None)}, connect=False))
    seen: set[bool] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(agent.check("uniplex"))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    agent.import_license(
        make_license(vendor, {"uniplex": (5, None), "ctxjs": (1, None)}, revision=2, connect=False)
    )
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert seen == {True}
    assert agent.check("ctxjs")


def test_older_revision_is_refused(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, {"a": (1, None)}, revision=3, connect=False))
    with pytest.raises(VerificationError, match="older"):
        agent.import_license(make_license(vendor, {"b": (1, None)}, revision=2, connect=False))
    assert agent.check("a")


def test_check_is_fast(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    agent = open_agent(clock=None)  # the real SystemClock fast path
    agent.import_license(make_license(vendor, connect=False))
    n = 100_000
    start = time.perf_counter()
    for _ in range(n):
        agent.check("uniplex")
    per_call = (time.perf_counter() - start) / n
    assert per_call < 5e-6  # ~0.2 µs here; generous for a loaded CI machine


def test_hot_update_from_another_process(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    running = open_agent()
    running.import_license(make_license(vendor, {"uniplex": (5, None)}, connect=False))
    running.start()
    try:
        admin = open_agent(running.state_dir)  # another connection, like `tessera agent import`
        admin.import_license(
            make_license(vendor, {"uniplex": (5, None), "ctxjs": (1, None)}, revision=2, connect=False)
        )
        deadline = time.monotonic() + 5
        while not running.check("ctxjs") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.check("ctxjs")
    finally:
        running.stop()


def test_reload_without_threads(open_agent: Callable[..., Agent], vendor: SigningKey) -> None:
    running = open_agent()
    other = open_agent(running.state_dir)
    other.import_license(make_license(vendor, connect=False))
    assert not running.check("uniplex")  # not yet: check() never touches the disk
    assert running.reload().state is AgentState.NORMAL
    assert running.check("uniplex")


def test_binary_garbage_is_a_format_error(open_agent: Callable[..., Agent]) -> None:
    from tessera.core import FormatError

    with pytest.raises(FormatError):
        open_agent().import_license(b"\xff\xfe\x00garbage")
