"""The harness: a registry of benchmarks, their result rows, the table and ``results.md``.

A benchmark is a function that takes a :class:`Context` and returns rows. It never decides
how the table looks and never writes files: that keeps each benchmark module small and lets
the test suite run the harness on one cheap benchmark to check the format without timing.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "Context",
    "Row",
    "benchmark",
    "compare",
    "machine_info",
    "render_markdown",
    "run",
    "skipped",
]

COLUMNS = ("benchmark", "figure", "unit", "baseline", "baseline figure", "ratio", "target", "result")


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: a figure, the baseline it is compared with, and a verdict.

    ``passed`` is None when there is no verdict (the row is informative, or the thing it
    measures is not available yet); ``note`` then says why.
    """

    name: str
    figure: float | None
    unit: str
    baseline_name: str = ""
    baseline: float | None = None
    target: str = ""
    passed: bool | None = None
    note: str = ""
    paired_ratio: float | None = None  # from :func:`compare`; else figure / baseline

    @property
    def ratio(self) -> float | None:
        if self.paired_ratio is not None:
            return self.paired_ratio
        if self.figure is None or not self.baseline:
            return None
        return self.figure / self.baseline

    @property
    def result(self) -> str:
        if self.passed is None:
            return self.note or "info"
        verdict = "pass" if self.passed else "FAIL"
        return f"{verdict} ({self.note})" if self.note else verdict


def skipped(name: str, unit: str, why: str, baseline_name: str = "", target: str = "") -> Row:
    """A row for something that cannot be measured here (yet): reported, never hidden."""
    return Row(name, None, unit, baseline_name, None, target, None, why)


@dataclass(slots=True)
class Context:
    """What a benchmark may ask of the run: quick or full, and bounded time budgets."""

    quick: bool = False
    log: Callable[[str], None] = field(default=lambda _msg: None)

    def budget(self, quick: float, full: float) -> float:
        """Seconds to spend on one measurement (short in ``--quick``)."""
        return quick if self.quick else full


@dataclass(frozen=True, slots=True)
class Benchmark:
    name: str
    func: Callable[[Context], list[Row]]
    quick: bool  # part of a --quick run
    doc: str


BENCHMARKS: dict[str, Benchmark] = {}
BenchFunc = Callable[[Context], list[Row]]


def benchmark(name: str, *, quick: bool = True) -> Callable[[BenchFunc], BenchFunc]:
    """Register ``func`` under ``name``; ``quick=False`` keeps it out of ``--quick`` runs."""

    def register(func: BenchFunc) -> BenchFunc:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} registered twice")
        doc = (func.__doc__ or "").strip().splitlines()
        BENCHMARKS[name] = Benchmark(name, func, quick, doc[0] if doc else "")
        return func

    return register


def _slice(func: Callable[[], object], seconds: float, batch: int) -> float:
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            func()
        n += batch
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def rate(func: Callable[[], object], seconds: float, *, batch: int = 50, repeats: int = 5) -> float:
    """Calls per second of ``func``: the median of ``repeats`` timed slices of ``seconds``."""
    return statistics.median(_slice(func, seconds / repeats, batch) for _ in range(repeats))


def compare(
    figure: Callable[[], object],
    baseline: Callable[[], object],
    seconds: float,
    *,
    batch: int = 50,
    repeats: int = 10,
) -> tuple[float, float, float]:
    """Rates of ``figure`` and ``baseline`` and their ratio, measured in alternating slices.

    This machine is shared (other test runs, servers): measuring one thing after the other
    lets a burst of foreign load land on one side only. Alternating short slices puts both
    under the same conditions; the ratio is the median of the per-pair ratios.
    """
    slice_s = seconds / (2 * repeats)
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        a.append(_slice(figure, slice_s, batch))
        b.append(_slice(baseline, slice_s, batch))
    ratio = statistics.median(x / y for x, y in zip(a, b, strict=True))
    return statistics.median(a), statistics.median(b), ratio


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_version() -> str:
    """Which tessera was measured: the package's directory and its git commit."""
    import subprocess

    import tessera

    where = Path(tessera.__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(where), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{where} ({sha or 'no git'})"


def machine_info(quick: bool) -> dict[str, str]:
    return {
        "code": code_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count() or 1),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "mode": "quick" if quick else "full",
    }


def format_figure(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def cells(row: Row) -> tuple[str, ...]:
    return (
        row.name,
        format_figure(row.figure),
        row.unit,
        row.baseline_name or "—",
        format_figure(row.baseline),
        format_ratio(row.ratio),
        row.target or "—",
        row.result,
    )


def render_markdown(rows: Iterable[Row], info: dict[str, str]) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    out = [
        "# Tessera benchmark results",
        "",
        f"- date: {info['date']}",
        f"- CPU: {info['cpu']}, {info['cores']} cores",
        f"- Python {info['python']} on {info['system']}",
        f"- tessera: {info['code']}",
        f"- mode: {info['mode']} (`make bench{' QUICK=1' if info['mode'] == 'quick' else ''}`)",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    out.extend("| " + " | ".join(esc(c) for c in cells(row)) + " |" for row in rows)
    out.append("")
    out.append("What each figure means and what limits it: `docs/performance.md`.")
    return "\n".join(out) + "\n"


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run(names: Iterable[str], ctx: Context) -> tuple[list[Row], list[str]]:
    """Run the benchmarks in order; one that raises becomes an error row, the rest go on."""
    rows: list[Row] = []
    errors: list[str] = []
    for name in names:
        bench = BENCHMARKS[name]
        ctx.log(f"running {name}: {bench.doc}")
        start = time.perf_counter()
        try:
            rows.extend(bench.func(ctx))
        except Exception as exc:
            errors.append(f"{name}: {traceback.format_exc()}")
            rows.append(Row(name, None, "", passed=False, note=f"error: {type(exc).__name__}: {exc}"[:200]))
        ctx.log(f"  {name} took {time.perf_counter() - start:.1f} s")
    return rows, errors
