"""The load generator against the do-nothing server: it parses responses and stops on time.

Structure only (every request answered, counts bounded, the JSON it prints has its keys),
never a rate: the rate is the benchmark's business, not the suite's.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from bench.processes import Baseline, free_port, run_load, serving
from bench.tlsfiles import make_tls_files

BODY = b'{"protocol":"tessera-connect/1","type":"checkin"}'
KEYS = {
    "requests",
    "ok",
    "statuses",
    "seconds",
    "rps",
    "p50_ms",
    "p99_ms",
    "mean_ms",
    "client",
    "connections",
}


@pytest.mark.parametrize("new_connection", [False, True])
def test_raw_generator_counts_every_response(new_connection: bool) -> None:
    port = free_port()
    with serving([sys.executable, "-m", "bench.emptyapp", "--null", str(port)], port=port):
        result = run_load(
            port,
            "/x",
            [BODY],
            duration=5,
            repeat=True,
            max_requests=200,
            connections=4,
            new_connection=new_connection,
        )
    assert result.keys() >= KEYS
    assert result["requests"] == result["ok"] == 200
    assert result["statuses"] == {"200": 200}
    assert result["p50_ms"] <= result["p99_ms"]


def test_bodies_are_used_once_unless_repeat() -> None:
    port = free_port()
    with serving([sys.executable, "-m", "bench.emptyapp", "--null", str(port)], port=port):
        result = run_load(port, "/x", [BODY] * 7, duration=5, connections=3)
    assert result["requests"] == 7


def test_tls_with_a_pinned_ca(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path)
    port = free_port()
    args = [sys.executable, "-m", "bench.emptyapp", "--null", str(port), str(files.cert), str(files.key)]
    with serving(args, port=port):
        result = run_load(
            port,
            "/x",
            [BODY],
            duration=5,
            repeat=True,
            max_requests=20,
            connections=2,
            tls_ca=files.ca,
            new_connection=True,
        )
    assert result["tls"] is True and result["new_connection"] is True
    assert result["ok"] == 20


def test_refuses_targets_off_loopback(tmp_path: Path) -> None:
    import subprocess

    bodies = tmp_path / "b.jsonl"
    bodies.write_bytes(BODY + b"\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--host",
            "192.0.2.1",
            "--port",
            "80",
            "--path",
            "/",
            "--bodies",
            str(bodies),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert out.returncode == 2
    assert "loopback" in out.stderr


@contextmanager
def two_null_servers() -> Iterator[tuple[int, int]]:
    """Two do-nothing servers: a figure's and a baseline's port."""
    figure_port, baseline_port = free_port(), free_port()
    null = [sys.executable, "-m", "bench.emptyapp", "--null"]
    with (
        serving([*null, str(figure_port)], port=figure_port),
        serving([*null, str(baseline_port)], port=baseline_port),
    ):
        yield figure_port, baseline_port


def test_a_paired_run_alternates_with_its_baseline() -> None:
    with two_null_servers() as (figure_port, baseline_port):
        result = run_load(
            figure_port,
            "/x",
            [BODY] * 50_000,
            duration=1.2,
            connections=2,
            baseline=Baseline(baseline_port, "/y", [BODY]),
            slices=3,
        )
    assert result.keys() >= KEYS | {"baseline", "pairs", "pair_p50_ms", "ratio"}
    assert len(result["pair_p50_ms"]) == 3 and all(a > 0 and b > 0 for a, b in result["pair_p50_ms"])
    assert result["baseline"].keys() >= KEYS
    assert len(result["pairs"]) == 3
    assert all(a > 0 and b > 0 for a, b in result["pairs"])
    ratios = sorted(a / b for a, b in result["pairs"])
    assert result["ratio"] == ratios[1]  # the median pair's
    assert result["ok"] == result["requests"] and result["baseline"]["ok"] == result["baseline"]["requests"]


def test_a_paired_run_ends_when_the_figure_runs_out_of_bodies() -> None:
    with two_null_servers() as (figure_port, baseline_port):
        result = run_load(
            figure_port,
            "/x",
            [BODY] * 7,
            duration=4,
            connections=2,
            baseline=Baseline(baseline_port, "/y", [BODY], pause=0.0),
            slices=4,
        )
    assert result["requests"] == 7  # each body once, across the slices
    assert len(result["pairs"]) == 1  # the first slice took them all
