"""State survives kill -9 mid-write, a full disk and a read-only state directory."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_support import LOCKING_ID, PRODUCT, VERSION, make_license

from tessera.agent import Agent, StateError
from tessera.core import SigningKey

WRITER = f"""
import sys
from tessera.agent import Agent
from tessera.core import Keyring, PublicKey
state_dir, pub, lid, start = sys.argv[1:5]
agent = Agent(state_dir, Keyring([PublicKey.from_base64(pub)]), {PRODUCT!r}, {VERSION!r},
              locking_id=lid)
i = int(start)
while True:
    agent.assign("uniplex", f"user-{{i}}")
    print(i, flush=True)   # acknowledged: must survive the kill
    i += 1
"""


def _integrity(state_dir: Path) -> None:
    db = sqlite3.connect(state_dir / "state.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()


def test_kill_9_while_writing_never_corrupts(
    open_agent: Callable[..., Agent], vendor: SigningKey
) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, {"uniplex": (100_000, None)}, connect=False))
    state_dir = agent.state_dir
    agent.close()
    acknowledged: set[int] = set()
    start = 0
    for _round in range(20):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                str(state_dir),
                vendor.public.to_base64(),
                LOCKING_ID,
                str(start),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()  # it is writing now
        assert first.strip(), "writer did not start"
        acknowledged.add(int(first))
        time.sleep(random.uniform(0.0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate()
        acknowledged.update(int(line) for line in rest.split())
        start = max(acknowledged) + 2  # the one in flight may or may not have landed
        _integrity(state_dir)
    reopened = open_agent(state_dir)
    holders = set(reopened.seats()["uniplex"].subjects)
    assert {f"user-{i}" for i in acknowledged} <= holders
    assert reopened.check("uniplex")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, so a test can fill the disk or make it read-only for real."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_loses_nothing(
    open_agent: Callable[..., Agent], vendor: SigningKey, small_fs: Path
) -> None:
    agent = open_agent(small_fs / "state")
    agent.import_license(make_license(vendor, {"uniplex": (100_000, None)}, connect=False))
    agent.assign("uniplex", "alice")
    filler = small_fs / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    assigned = ["alice"]
    with pytest.raises(StateError, match="full"):
        for i in range(100_000):
            agent.assign("uniplex", f"user-{i:06d}-" + "x" * 150)
            assigned.append(f"user-{i:06d}-" + "x" * 150)
    assert agent.check("uniplex")
    filler.unlink()
    _integrity(small_fs / "state")
    agent.close()
    again = open_agent(small_fs / "state")
    assert list(again.seats()["uniplex"].subjects) == assigned
    again.assign("uniplex", "bob")


def test_read_only_state_dir(
    open_agent: Callable[..., Agent], vendor: SigningKey, small_fs: Path
) -> None:
    agent = open_agent(small_fs / "state")
    agent.import_license(make_license(vendor, connect=False))
    agent.assign("uniplex", "alice")
    agent.close()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        with pytest.raises(StateError, match="read-only"):
            open_agent(small_fs / "state")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    again = open_agent(small_fs / "state")
    assert again.seats()["uniplex"].subjects == ("alice",)
    assert again.check("uniplex")
