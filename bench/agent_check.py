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


def median_ns(func: Callable[[str], object], arg: str, batches: int, per_batch: int = 10_000) -> float:
    """Median over ``batches`` of the time per call of ``func(arg)``, loop included."""
    times: list[float] = []
    r = range(per_batch)
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in r:
            func(arg)
        times.append((time.perf_counter_ns() - start) / per_batch)
    return statistics.median(times)


def loop_ns(batches: int, per_batch: int = 10_000) -> float:
    """The bare loop's cost per iteration, which both figures would otherwise include."""
    times: list[float] = []
    r = range(per_batch)
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in r:
            pass
        times.append((time.perf_counter_ns() - start) / per_batch)
    return statistics.median(times)


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
            batches = 30 if ctx.quick else 200
            empty = loop_ns(batches)
            check = median_ns(agent.check, FEATURE, batches) - empty
            lookup = median_ns(table.get, FEATURE, batches) - empty
            denied = median_ns(agent.check, "nonexistent", batches) - empty
        finally:
            close = getattr(agent, "close", None)
            if close is not None:
                close()
    return [
        Row(NAME, check, "ns/call", "dict lookup", lookup, f"<= {TARGET_NS:.0f} ns", check <= TARGET_NS),
        Row("agent check, denied feature", denied, "ns/call", "dict lookup", lookup, note="info"),
    ]
