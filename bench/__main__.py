"""``python -m bench [--quick] [--only NAME]...``: run, print the table, write results.md."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.harness import (
    BENCHMARKS,
    COLUMNS,
    Context,
    cells,
    machine_info,
    render_markdown,
    run,
    write_atomically,
)

#: Registration happens on import; the order here is the order of the table.
MODULES = (
    "bench.agent_check",
    "bench.verify_license",
    "bench.bulk_sign",
    "bench.http_server",
    "bench.bulk_issue",
    "bench.scale",
    "bench.seats",
    "bench.metrics_layer",
)
DEFAULT_OUTPUT = Path(__file__).with_name("results.md")


def load_modules() -> None:
    for module in MODULES:
        importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short budgets, skip the slow benchmarks")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only NAME (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the Markdown table"
    )
    args = parser.parse_args(argv)

    load_modules()
    # A log or CI never has a terminal: keep the table readable there instead of 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 180)
    err = Console(stderr=True)
    if args.list:
        for b in BENCHMARKS.values():
            console.print(f"{b.name:<16} {'quick' if b.quick else 'full only':<10} {b.doc}")
        return 0
    if args.only:
        unknown = [n for n in args.only if n not in BENCHMARKS]
        if unknown:
            err.print(f"unknown benchmark {unknown[0]!r}; known: {', '.join(BENCHMARKS)}")
            return 2
        names = args.only
    else:
        names = [b.name for b in BENCHMARKS.values() if b.quick or not args.quick]

    ctx = Context(quick=args.quick, log=lambda msg: err.print(f"[dim]{msg}[/dim]"))
    rows, errors = run(names, ctx)
    info = machine_info(args.quick)

    table = Table(
        title=f"Tessera benchmarks: {info['cpu']}, {info['cores']} cores, {info['date']}, {info['mode']}"
    )
    for col in COLUMNS:
        table.add_column(col, justify="right" if col in ("figure", "baseline figure", "ratio") else "left")
    for row in rows:
        style = "red" if row.passed is False else ("green" if row.passed else "yellow")
        table.add_row(*cells(row), style=style)
    console.print(table)
    write_atomically(args.output, render_markdown(rows, info))
    console.print(f"written to {args.output}")
    for text in errors:
        err.print(text)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
