"""Real ``tessera`` subprocesses for the tests: init a data dir, run servers, stop them."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

TESSERA = str(Path(sys.executable).parent / "tessera")
PASSPHRASE = "server test passphrase"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env.update({"TESSERA_KEY_PASSPHRASE": PASSPHRASE, "COLUMNS": "200"})
    env.update(extra)
    return env


def tessera(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TESSERA, *args],
        env=env or clean_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def init_data_dir(data_dir: Path, db_url: str | None = None) -> dict[str, str]:
    args = ["server", "init", "--data-dir", str(data_dir), "--json"]
    if db_url:
        args += ["--db", db_url]
    result = tessera(*args)
    assert result.returncode == 0, result.stderr
    info: dict[str, str] = json.loads(result.stdout)
    return info


def free_port() -> int:
    """A free loopback port *below* the kernel's ephemeral range.

    Tests that stop a server and start it again on the same port (an agent keeps the
    address) lose that port if, in between, any outgoing connection on this machine (the
    other test worker's, say) is given it as its local port; ports below the ephemeral
    range are never handed out that way.
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randint(max(1024, low - 12_000), low - 1)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded machine: any free port, as before
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _start(
    data_dir: Path, tls: bool, extra: list[str], port: int | None, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = port or free_port()
    args = [TESSERA, "server", "run", "--data-dir", str(data_dir), "--host", "127.0.0.1"]
    args += ["--port", str(port), *([] if tls else ["--no-tls"]), *extra]
    log = data_dir / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env or clean_env(), stdout=out, stderr=subprocess.STDOUT)
    return proc, port, log


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextmanager
def running_server(
    data_dir: Path,
    *,
    tls: bool = True,
    ca: str | None = None,
    port: int | None = None,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """``tessera server run`` on a (free) loopback port; yields its URL once /health answers.

    A free port taken by someone else between choosing and binding it is retried with
    another; a port the caller names is used as is.
    """
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca) if (tls and ca) else True
    for attempt in range(3):
        proc, bound, log = _start(data_dir, tls, extra or [], port, env)
        url = f"{'https' if tls else 'http'}://127.0.0.1:{bound}"
        deadline = time.monotonic() + 30
        try:
            while True:
                if proc.poll() is not None:
                    text = log.read_text(errors="replace")
                    if "cannot listen" in text and attempt < 2 and port is None:
                        break
                    raise RuntimeError(f"server exited: {text}")
                try:
                    if httpx.get(f"{url}/api/v1/health", verify=verify, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {log.read_text(errors='replace')}")
                time.sleep(0.1)
        except BaseException:
            _stop(proc)
            raise
        if proc.poll() is not None:
            if port is not None:
                raise RuntimeError(f"server exited: {log.read_text(errors='replace')}")
            continue  # the port was taken: try another
        try:
            yield url
        finally:
            _stop(proc)
        return
    raise RuntimeError("no free port for the server")


def start_server(data_dir: Path, port: int, *, tls: bool = False) -> subprocess.Popen[bytes]:
    """A ``server run`` the caller owns (to SIGKILL it, say); returns once /health answers."""
    proc, _, log = _start(data_dir, tls, [], port)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{url}/api/v1/health", verify=False, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"server did not start: {log.read_text(errors='replace')}")
        time.sleep(0.05)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it does not go within 15 s."""
    if proc.poll() is None:
        _stop(proc)
