"""Child processes of a benchmark run: servers on loopback and the load generator.

Every process started here is stopped by its own handle (never by name), and every wait
is bounded, so a hung server cannot hang ``make bench``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = ["LoadResult", "free_port", "run_load", "serving", "wait_http"]

LOOPBACK = "127.0.0.1"
PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, verify: str | bool = True
) -> None:
    """Until ``url`` answers at all (any status), or raise naming what went wrong."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering")
        try:
            httpx.get(url, timeout=1.0, trust_env=False, verify=verify)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not listening within {timeout:.0f} s")


@contextmanager
def serving(
    args: Sequence[str],
    *,
    port: int,
    health: str | None = None,
    env: dict[str, str] | None = None,
    verify: str | bool = True,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process for the duration of the block; stop it by its pid afterwards."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen(
        list(args),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env={**os.environ, **(env or {})},
        cwd=ROOT,  # so ``-m bench...`` resolves wherever the caller runs from
    )
    try:
        try:
            if health is not None:
                wait_http(health, 60, proc, verify)
            else:
                wait_port(port, 30, proc)
        except RuntimeError as exc:
            log.seek(0)
            tail = log.read()[-2000:].decode("utf-8", "replace")
            raise RuntimeError(f"{exc}: {tail}") from None
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


LoadResult = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Baseline:
    """A server the load generator alternates with (``run_load(..., baseline=)``): its port,
    path and request bodies (cycled)."""

    port: int
    path: str
    bodies: Sequence[bytes]
    tls_ca: Path | None = None  # TLS, trusting this CA (new connections each if the figure's are)
    #: Seconds before each of its slices (``bench.loadgen``); None: the generator's default,
    #: for a figure whose server (or database) may still be writing after its slice.
    pause: float | None = None


def run_load(
    port: int,
    path: str,
    bodies: Sequence[bytes],
    *,
    duration: float,
    connections: int = 16,
    repeat: bool = False,
    client: str = "raw",
    max_requests: int | None = None,
    headers: Sequence[str] = (),
    tls_ca: Path | None = None,
    new_connection: bool = False,
    baseline: Baseline | None = None,
    slices: int = 1,
) -> LoadResult:
    """Run ``bench.loadgen`` in its own process against ``127.0.0.1:port``; its JSON result.

    With ``baseline``, ``slices`` pairs of slices alternate between the two servers
    (``bench.loadgen``: ABBA ...); the result then holds ``baseline``, ``pairs`` and
    ``ratio`` (the median of the per-pair ratios) too, and the run takes twice ``duration``.
    """
    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as f:
        f.write(b"\n".join(bodies) + b"\n")
        body_file = f.name
    baseline_file = None
    if baseline is not None:
        with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as f:
            f.write(b"\n".join(baseline.bodies) + b"\n")
            baseline_file = f.name
    try:
        cmd = [
            PYTHON, "-m", "bench.loadgen",
            "--port", str(port), "--path", path, "--bodies", body_file,
            "--duration", str(duration), "--connections", str(connections), "--client", client,
        ]  # fmt: skip
        if repeat:
            cmd.append("--repeat")
        if max_requests is not None:
            cmd += ["--max-requests", str(max_requests)]
        for h in headers:
            cmd += ["--header", h]
        if tls_ca is not None:
            cmd += ["--tls-ca", str(tls_ca)]
        if new_connection:
            cmd.append("--new-connection")
        if baseline is not None:
            assert baseline_file is not None
            cmd += ["--baseline-port", str(baseline.port), "--baseline-path", baseline.path]
            cmd += ["--baseline-bodies", baseline_file, "--slices", str(slices)]
            if baseline.pause is not None:
                cmd += ["--pause", str(baseline.pause)]
            if baseline.tls_ca is not None:
                cmd += ["--baseline-tls-ca", str(baseline.tls_ca)]
        out = subprocess.run(
            cmd,
            capture_output=True,
            timeout=2 * duration + 60,
            cwd=ROOT,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"load generator failed: {out.stderr.decode()[-500:]}")
        result: LoadResult = json.loads(out.stdout)
        return result
    finally:
        os.unlink(body_file)
        if baseline_file is not None:
            os.unlink(baseline_file)
