"""The agent's ``check(feature)``: median ns per call against a plain dict lookup.

SPEC section 7 puts ``check`` at about a microsecond: the product may ask thousands of times
a second, so it must be an in-memory lookup, not I/O or signature work. A dict lookup in
the same process is the floor any Python implementation can reach; the loop's own cost is
measured and subtracted from both, so the figures are the calls themselves.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.harness import Context, Row, benchmark, skipped
from bench.samples import LOCKING_ID, signed_sample
from tessera.core import Keyring, SigningKey

TARGET_NS = 1000.0
NAME = "agent check(feature)"
FEATURE = "uniplex"


def _batch_ns(func: Callable[[str], object] | None, arg: str, per_batch: int) -> float:
    """ns per iteration of one batch of ``func(arg)`` calls (of the bare loop if None)."""
    r = range(per_batch)
    if func is None:
        start = time.perf_counter_ns()
        for _ in r:
            pass
    else:
        start = time.perf_counter_ns()
        for _ in r:
            func(arg)
    return (time.perf_counter_ns() - start) / per_batch


def medians_ns(
    calls: dict[str, tuple[Callable[[str], object], str]], batches: int, per_batch: int = 10_000
) -> dict[str, float]:
    """Median ns per call of each of ``calls``, the loop's own cost taken off.

    Measured in rounds: the bare loop, then one batch of each call, so a change of the
    CPU's speed or foreign load lands on every figure of a round alike, and each batch
    is taken against the loop measured next to it. (Medians of separately measured series
    once put a dict lookup at 2 ns.)
    """
    rounds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(batches):
        empty = _batch_ns(None, "", per_batch)
        for name, (func, arg) in calls.items():
            rounds[name].append(_batch_ns(func, arg, per_batch) - empty)
    return {name: statistics.median(values) for name, values in rounds.items()}


@benchmark("agent-check")
def agent_check(ctx: Context) -> list[Row]:
    """Agent.check("feature") median ns/call vs dict lookup"""
    try:
        from tessera.agent import Agent  # the agent is built in parallel; report, don't fail
    except ImportError as exc:
        ctx.log(f"  tessera.agent.Agent cannot be imported: {exc}")
        return [skipped(NAME, "ns/call", "agent not available", "dict lookup", f"<= {TARGET_NS:.0f} ns")]

    key = SigningKey.generate()
    with tempfile.TemporaryDirectory(prefix="tessera-bench-agent-") as tmp:
        try:
            agent = Agent(Path(tmp), Keyring([key.public]), "cortex", "4.2", locking_id=LOCKING_ID)
            agent.import_license(signed_sample(key))
        except Exception as exc:  # an API still in flux: say what failed
            ctx.log(f"  the agent API did not work as expected: {type(exc).__name__}: {exc}")
            why = f"agent not available ({type(exc).__name__})"
            return [skipped(NAME, "ns/call", why, "dict lookup", f"<= {TARGET_NS:.0f} ns")]
        try:
            if not agent.check(FEATURE):
                return [skipped(NAME, "ns/call", f"sample license does not grant {FEATURE}")]
            table = {FEATURE: True, "backup": True, "ctxjs": True}
            figures = medians_ns(
                {
                    "check": (agent.check, FEATURE),
                    "lookup": (table.get, FEATURE),
                    "denied": (agent.check, "nonexistent"),
                },
                30 if ctx.quick else 200,
            )
            check, lookup, denied = figures["check"], figures["lookup"], figures["denied"]
        finally:
            close = getattr(agent, "close", None)
            if close is not None:
                close()
    return [
        Row(NAME, check, "ns/call", "dict lookup", lookup, f"<= {TARGET_NS:.0f} ns", check <= TARGET_NS),
        Row("agent check, denied feature", denied, "ns/call", "dict lookup", lookup, note="info"),
    ]
