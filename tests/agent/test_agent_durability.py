"""State survives kill -9 mid-write (100 times, checked after each), a full disk and a
read-only state directory."""

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

from tessera.agent import Agent, AgentState, StateError
from tessera.core import Keyring, SigningKey

# 100 in the suite (issue 6); `make reliability` multiplies it.
KILLS = 100 * int(os.environ.get("TESSERA_RELIABILITY_SCALE", "1"))

# One process that has imported everything forks a fresh writer per round, so a round costs
# a fork and not a Python start-up: 100 kills fit in seconds. Protocol on stdout, one line
# per write(2) so lines never interleave: the child prints each acknowledged number, the
# parent "pid N" after forking and "done" once the killed child has been reaped (so all of
# the child's lines are in the pipe before it).
ZYGOTE = f"""
import os, sys
from tessera.agent import Agent
from tessera.core import Keyring, PublicKey
state_dir, pub, lid = sys.argv[1:4]
keyring = Keyring([PublicKey.from_base64(pub)])
for command in sys.stdin:
    start = int(command)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        agent = Agent(state_dir, keyring, {PRODUCT!r}, {VERSION!r}, locking_id=lid)
        i = start
        while True:
            agent.assign("uniplex", f"user-{{i}}")
            # acknowledged: must survive the kill. One write(2) below PIPE_BUF is atomic, so
            # a kill never leaves half a line (print() may split number and newline).
            os.write(1, f"{{i}}\\n".encode())
            i += 1
    print("pid", pid, flush=True)
    os.waitpid(pid, 0)
    print("done", flush=True)
"""


def _integrity(state_dir: Path) -> None:
    db = sqlite3.connect(state_dir / "state.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()


@pytest.mark.reliability
def test_kill_9_while_writing_never_corrupts(
    open_agent: Callable[..., Agent], vendor: SigningKey, keyring: Keyring
) -> None:
    agent = open_agent()
    agent.import_license(make_license(vendor, {"uniplex": (100_000, None)}, connect=False))
    state_dir = agent.state_dir
    agent.close()
    acknowledged: set[int] = set()
    start = 0
    rng = random.Random(6)
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE, str(state_dir), vendor.public.to_base64(), LOCKING_ID],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert zygote.stdin is not None and zygote.stdout is not None
    deadline = time.monotonic() + 1.2 * KILLS  # bounded: ~40 ms a round here
    try:
        for _round in range(KILLS):
            assert time.monotonic() < deadline, f"only {_round} kills in time"
            zygote.stdin.write(f"{start}\n")
            zygote.stdin.flush()
            pid = 0
            written = 0
            while not (pid and written):  # the child is writing now
                line = zygote.stdout.readline()
                assert line, "writer did not start"
                if line.startswith("pid "):
                    pid = int(line.split()[1])
                else:
                    acknowledged.add(int(line))
                    written += 1
            time.sleep(rng.uniform(0.0, 0.02))
            os.kill(pid, signal.SIGKILL)
            for line in iter(zygote.stdout.readline, "done\n"):
                assert line, "zygote died"
                acknowledged.add(int(line))
            start = max(acknowledged) + 2  # the one in flight may or may not have landed
            _integrity(state_dir)
            reopened = Agent(state_dir, keyring, PRODUCT, VERSION, locking_id=LOCKING_ID)
            try:  # every acknowledged write is there, after every single kill
                holders = set(reopened.seats()["uniplex"].subjects)
                assert {f"user-{i}" for i in acknowledged} <= holders
                assert reopened.check("uniplex")
            finally:
                reopened.close()
    finally:
        zygote.stdin.close()
        zygote.wait(10)
    assert len(acknowledged) >= KILLS


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


def test_read_only_state_dir(open_agent: Callable[..., Agent], vendor: SigningKey, small_fs: Path) -> None:
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


def test_full_disk_before_open_still_reads(
    open_agent: Callable[..., Agent], vendor: SigningKey, small_fs: Path
) -> None:
    agent = open_agent(small_fs / "state")
    agent.import_license(make_license(vendor, connect=False))
    agent.close()  # the last connection removes state.db-shm; a reader must make it again
    fd = os.open(small_fs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)
    frozen = open_agent(small_fs / "state")  # reads keep working
    assert frozen.status().state is AgentState.NORMAL and frozen.check("uniplex")
    with pytest.raises(StateError, match=r"disk holding .* is full"):
        frozen.assign("uniplex", "alice")
    frozen.close()
    (small_fs / "filler").unlink()
    again = open_agent(small_fs / "state")
    again.assign("uniplex", "alice")
    assert again.check("uniplex")
