"""Server throughput over loopback HTTP: the empty-endpoint baseline, activations, check-ins.

SPEC section 7: activations and check-ins per second on 2 cores at least half of what the
same web stack (FastAPI, one uvicorn worker) serves for an empty endpoint, on SQLite and on
PostgreSQL, with p99 latency. The load generator runs in its own process (one core), the
server in another (one worker, so one core plus its database). A first row measures the
generator against a server that does nothing, to show it is not what limits the figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from bench.harness import Context, Row, benchmark, skipped
from bench.processes import PYTHON, LoadResult, free_port, run_load, serving
from bench.tessera_server import (
    activation_bodies,
    checkin_bodies,
    installations,
    postgres_database,
    server_unavailable,
    tessera_server,
)
from tessera.core.protocol import CheckinRequest
from tessera.core.signing import SigningKey

TARGET_RATIO = 0.5
CONNECTIONS = 16
PER_LICENSE = 50  # machines per license: a site license, and a short slot scan per activation
BACKENDS = ("SQLite", "PostgreSQL")


def latency_note(r: LoadResult) -> str:
    note = f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms"
    bad = {code: n for code, n in r["statuses"].items() if not code.startswith("2")}
    if bad:
        note += ", errors " + ", ".join(f"{n}x HTTP {code}" for code, n in bad.items())
    return note


def sample_body() -> bytes:
    """A check-in request: the baseline receives the same bytes a real endpoint does."""
    return CheckinRequest.create(
        "K7QXM-2VDRT-9HFNA-PC4WE-8BZJY", "TL1-MP5UNZP2ZRSFQMXIPVBGRKZMPWZZK3IG57Y7CM3V5T6EEOS5",
        "bench-system-0001", SigningKey.generate(),
    ).to_json()  # fmt: skip


def measure_baselines(ctx: Context, duration: float) -> tuple[list[Row], LoadResult]:
    body = sample_body()
    port = free_port()
    with serving([PYTHON, "-m", "bench.emptyapp", "--null", str(port)], port=port):
        capacity = run_load(port, "/null", [body], duration=min(duration, 2.0), repeat=True)
        httpx_capacity = None
        if not ctx.quick:
            httpx_capacity = run_load(port, "/null", [body], duration=2.0, repeat=True, client="httpx")
    port = free_port()
    uvicorn = [PYTHON, "-m", "uvicorn", "bench.emptyapp:app", "--host", "127.0.0.1", "--port", str(port)]
    with serving([*uvicorn, "--log-level", "warning", "--no-access-log"], port=port):
        run_load(port, "/empty", [body], duration=0.5, repeat=True)  # warm up
        empty = run_load(port, "/empty", [body], duration=duration, repeat=True, connections=CONNECTIONS)
    rows = [
        Row(
            "loadgen capacity (raw asyncio)",
            capacity["rps"],
            "req/s",
            "empty FastAPI POST",
            empty["rps"],
            ">= 3x",
            capacity["rps"] >= 3 * empty["rps"],
            "generator is not the bottleneck" if capacity["rps"] >= 3 * empty["rps"] else "generator-bound",
        ),
    ]
    if httpx_capacity is not None:
        rows.append(
            Row(
                "loadgen capacity (httpx, not used)",
                httpx_capacity["rps"],
                "req/s",
                "empty FastAPI POST",
                empty["rps"],
                note="info: too slow to drive the server",
            )
        )
    rows.append(Row("empty FastAPI POST (1 uvicorn worker)", empty["rps"], "req/s", note=latency_note(empty)))
    return rows, empty


@contextmanager
def backend(name: str) -> Iterator[str | None]:
    if name == "SQLite":
        yield None
    else:
        with postgres_database() as url:
            yield url


def measure_server(ctx: Context, name: str, duration: float, empty: LoadResult) -> list[Row]:
    expected_rate = 2000  # generous: bodies run out rather than the clock
    count = int(expected_rate * duration)
    licenses = max(2, count // PER_LICENSE + 1)
    rows: list[Row] = []
    with backend(name) as url, tessera_server(url) as server:
        ctx.log(f"  {name}: issuing {licenses} licenses x {PER_LICENSE} machines")
        keys = server.seed(licenses, PER_LICENSE)
        insts = installations(keys, PER_LICENSE)
        warm, insts = insts[:64], insts[64:]
        run_load(server.port, "/api/v1/activate", activation_bodies(warm), duration=5, connections=4)
        ctx.log(f"  {name}: activations for {duration:.0f} s")
        act = run_load(
            server.port,
            "/api/v1/activate",
            activation_bodies(insts),
            duration=duration,
            connections=CONNECTIONS,
        )
        # The generator takes bodies in order: the first ``requests`` were sent. Check in with
        # those only if every one was bound (else fall back to the warm-up machines).
        ok = insts[: act["requests"]] if act["ok"] == act["requests"] else warm
        ctx.log(f"  {name}: check-ins for {duration:.0f} s over {len(ok)} installations")
        chk = run_load(
            server.port,
            "/api/v1/checkin",
            checkin_bodies(ok, count),
            duration=duration,
            connections=CONNECTIONS,
        )
    for what, r in (("activations", act), ("check-ins", chk)):
        ratio = r["rps"] / empty["rps"]
        clean = r["ok"] == r["requests"]
        rows.append(
            Row(
                f"{what}/s ({name})",
                r["rps"],
                "req/s",
                "empty FastAPI POST",
                empty["rps"],
                f">= {TARGET_RATIO}x",
                ratio >= TARGET_RATIO and clean,
                latency_note(r),
            )
        )
    return rows


@benchmark("http")
def http(ctx: Context) -> list[Row]:
    """empty FastAPI baseline, activations and check-ins/s over loopback (SQLite, PostgreSQL)"""
    duration = ctx.budget(3.0, 10.0)
    rows, empty = measure_baselines(ctx, duration)
    reason = server_unavailable()
    for name in BACKENDS:
        if reason is not None:
            rows += [
                skipped(f"{what}/s ({name})", "req/s", reason, "empty FastAPI POST", f">= {TARGET_RATIO}x")
                for what in ("activations", "check-ins")
            ]
            continue
        try:
            rows += measure_server(ctx, name, duration, empty)
        except Exception as exc:
            ctx.log(f"  {name}: {type(exc).__name__}: {exc}")
            rows.append(
                Row(
                    f"server ({name})",
                    None,
                    "req/s",
                    passed=False,
                    note=f"error: {type(exc).__name__}: {str(exc)[:120]}",
                )
            )
    return rows
