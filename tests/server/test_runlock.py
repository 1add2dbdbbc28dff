"""``server run`` holds the data directory's run lock; ``server hsm-import`` refuses beside it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tessera.server.runlock import hold_run_lock, server_running

from .processes import init_data_dir, running_server, tessera

HOLD = (
    "import sys, time, pathlib; from tessera.server.runlock import hold_run_lock; "
    "lock = hold_run_lock(pathlib.Path(sys.argv[1])); print(lock is not None, flush=True); time.sleep(60)"
)


def test_the_lock_is_seen_across_processes_and_gone_with_its_holder(tmp_path: Path) -> None:
    assert not server_running(tmp_path)  # never served
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
        assert server_running(tmp_path)
        second = hold_run_lock(tmp_path)  # several servers may share a data directory
        assert second is not None
        second.close()
    finally:
        holder.kill()
        holder.wait()
    assert not server_running(tmp_path)  # a killed server leaves nothing stale


def test_hsm_import_refuses_while_the_server_runs(tmp_path: Path) -> None:
    data_dir = tmp_path / "srv"
    init_data_dir(data_dir)
    args = ["server", "hsm-import", "--data-dir", str(data_dir), "--hsm-module", str(tmp_path / "none.so")]
    args += ["--hsm-token", "t"]
    with running_server(data_dir, tls=False):
        result = tessera(*args)
        assert result.returncode == 2
        expected = (
            f"the server of {data_dir.resolve()} is running: stop it first, then run `server hsm-import`"
        )
        assert result.stderr.strip() == f"error: {expected}"
    result = tessera(*args)  # stopped: on to the HSM, which does not exist here
    assert result.returncode == 2 and "is running" not in result.stderr, result.stderr
    assert "[hsm]" not in (data_dir / "tessera.toml").read_text()
