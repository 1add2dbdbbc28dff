"""Whether a ``server run`` is serving a data directory: a lock it holds while it runs.

Every ``server run`` holds a shared ``flock`` on ``DATA_DIR/run/server.lock`` (several
servers may share one data directory). A verb that must not run beside a server
(``server hsm-import``: it rewrites tessera.toml and may remove ``vendor.key``) asks for
the lock exclusively without waiting: refused means a server is running. The kernel drops
the lock when the process ends however it ends, so a killed server leaves no stale "running"
behind, unlike a pid file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # not POSIX: no lock, nothing is ever reported running
    fcntl = None  # type: ignore[assignment]

__all__ = ["hold_run_lock", "server_running"]


def _lock_path(data_dir: Path) -> Path:
    return data_dir / "run" / "server.lock"


def hold_run_lock(data_dir: Path) -> IO[bytes] | None:
    """Take the shared lock for this process's lifetime (keep the returned file open);
    None when it cannot be made (a read-only data directory): serving goes on."""
    if fcntl is None:
        return None
    path = _lock_path(data_dir)
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        handle = open(path, "ab")  # noqa: SIM115 (held open on purpose)
    except OSError:
        return None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # held exclusively by a verb that runs right now
        handle.close()
        return None
    os.set_inheritable(handle.fileno(), False)
    return handle


def server_running(data_dir: Path) -> bool:
    """Whether a ``server run`` holds the data directory's lock this instant."""
    if fcntl is None:
        return False
    path = _lock_path(data_dir)
    try:
        handle = open(path, "rb")  # noqa: SIM115
    except OSError:
        return False  # never served since this version, or unreadable: nothing to see
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False
