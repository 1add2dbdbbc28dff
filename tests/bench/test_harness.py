"""The benchmark harness cannot rot: run it for real, check the shape of what it prints.

These tests assert structure (columns, rows, the machine header, skip rows), never timing:
figures from a shared CI machine prove nothing in a unit test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from bench.harness import COLUMNS, Context, Row, machine_info, render_markdown, run, skipped

ROOT = Path(__file__).resolve().parents[2]


def _table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def test_quick_run_of_one_benchmark_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "bulk-sign", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "bulk sign" in result.stdout  # the Rich table went to stdout
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# Tessera benchmark results\n")
    assert re.search(r"^- date: \d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC$", text, re.M)
    assert re.search(r"^- CPU: .+, \d+ cores$", text, re.M)
    assert "- mode: quick" in text
    rows = _table_rows(text)
    assert rows[0] == list(COLUMNS)
    assert set("".join(rows[1])) <= set("|-")  # the separator row
    body = rows[2:]
    assert len(body) >= 2
    assert all(len(r) == len(COLUMNS) for r in body)
    names = [r[0] for r in body]
    assert any(n.startswith("bulk sign") for n in names)
    for r in body:
        assert re.fullmatch(r"—|[0-9][0-9,]*(\.[0-9]+)?", r[1]), r  # figure
        assert re.fullmatch(r"—|[0-9]+\.[0-9]{2}x", r[5]), r  # ratio
        assert r[7], r  # every row says something in "result"


def test_unknown_benchmark_is_bad_usage(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "no-such", "--output", str(tmp_path / "r.md")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "unknown benchmark" in result.stdout + result.stderr
    assert not (tmp_path / "r.md").exists()


def test_rows_render_verdicts_ratios_and_skips() -> None:
    rows = [
        Row("fast thing", 2000.0, "ops/s", "floor", 4000.0, ">= 0.5x", True),
        Row("slow thing", 1000.0, "ops/s", "floor", 4000.0, ">= 0.5x", False, "p99 3 ms"),
        Row("paired", 10.0, "ops/s", "floor", 20.0, paired_ratio=0.55),
        skipped("server thing", "req/s", "server not available", "empty endpoint", ">= 0.5x"),
    ]
    text = render_markdown(rows, machine_info(quick=True))
    body = _table_rows(text)[2:]
    assert [r[0] for r in body] == ["fast thing", "slow thing", "paired", "server thing"]
    assert body[0][5:] == ["0.50x", ">= 0.5x", "pass"]
    assert body[1][7] == "FAIL (p99 3 ms)"
    assert body[2][5] == "0.55x"  # the paired ratio wins over figure / baseline
    assert body[3][1] == "—" and body[3][5] == "—" and body[3][7] == "server not available"


def test_a_benchmark_that_raises_becomes_an_error_row() -> None:
    from bench import harness

    def broken(_ctx: Context) -> list[Row]:
        raise RuntimeError("boom")

    harness.BENCHMARKS["test-broken"] = harness.Benchmark("test-broken", broken, True, "raises")
    try:
        rows, errors = run(["test-broken"], Context(quick=True))
    finally:
        del harness.BENCHMARKS["test-broken"]
    assert len(rows) == 1 and rows[0].passed is False
    assert "RuntimeError: boom" in rows[0].note
    assert errors and "boom" in errors[0]


@pytest.mark.parametrize(
    "name", ["agent-check", "verify", "bulk-sign", "http", "bulk-issue", "tls", "scale", "seats"]
)
def test_every_benchmark_is_registered(name: str) -> None:
    from bench.__main__ import load_modules
    from bench.harness import BENCHMARKS

    load_modules()
    assert name in BENCHMARKS
    assert BENCHMARKS["scale"].quick is False  # the 1M-license fill never runs in --quick
    assert BENCHMARKS["seats"].quick is False  # nor the 3,000-machine one
