"""Check-in latency with 10,000 and with 1,000,000 licenses in PostgreSQL (full run only).

SPEC section 7: check-in cost flat from 10,000 to 1,000,000 licenses (within 1.3x). A
check-in finds the license by its key digest and the machine by license and system id: if
each is an index lookup, the size of the tables must not show. The same probe machines
(activated through the API) check in at both sizes; everything else is filler inserted
straight into the server's tables with ``INSERT ... SELECT generate_series`` (one
statement per 100,000 rows instead of a million API calls: minutes, not hours).

Both sizes are served at once, each by its own server on its own database, and measured
in alternating slices (``bench.loadgen``, paired): the ratio is the median of the per-pair
ratios of the median latencies. Measured one after the other, a minute apart (the fill
between them), the machine's drift went into the ratio: 0.72-1.24x over earlier runs of
the same code, 1.58x in one run of session 13 whose machine slowed down during the fill.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack

from bench.harness import Context, Row, benchmark, skipped
from bench.http_server import latency_note
from bench.processes import Baseline, run_load
from bench.tessera_server import (
    Installation,
    Server,
    activation_bodies,
    checkin_bodies,
    installations,
    postgres_database,
    server_unavailable,
    tessera_server,
)

SIZES = (10_000, 1_000_000)
TARGET = 1.3
PROBE_LICENSES = 20
PROBE_MACHINES = 10
CHUNK = 100_000
CONNECTIONS = 4
PAIRS = 10

# Filler rows, shaped like issued and activated licenses: one entitlement and one bound
# machine each. Digests are unique hex strings no license key can produce (md5, not HMAC).
_FILL = (
    """
    INSERT INTO licenses (serial, key_digest, customer_id, product_id, status, revision,
        version_range, binding, match_level, machines_allowed, connect, validation_hours,
        failover_days, emergency, sealed, recoveries_authorized, created_at, updated_at)
    SELECT 'F-' || g, md5('a' || g) || md5('b' || g), %(customer)s::integer,
        %(product)s::integer, 'active', 1, '*', 'machine', 'medium', 1, true, 24, 30, '', false, 0,
        now(), now()
    FROM generate_series(%(first)s::integer, %(last)s::integer) AS g
    """,
    """
    INSERT INTO entitlements (license_id, location, feature, count, expiry)
    SELECT id, 'main', 'uniplex', 5, NULL FROM licenses WHERE id > %(max_id)s::integer
    """,
    """
    INSERT INTO machines (license_id, slot, locking_id, system_id, agent_key, activated_at,
        last_checkin_at, delivered_revision, offline)
    SELECT id, 0, 'TL1-AAAAAAAAAAAAAAAA', 'filler-' || id, 'AAAA', now(), now(), 1, false
    FROM licenses WHERE id > %(max_id)s::integer
    """,
)


def fill(url: str, total: int, log: Callable[[str], None]) -> None:
    """Add filler licenses until the table holds ``total``."""
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        customer = conn.execute("SELECT min(id) FROM customers").fetchone()[0]  # type: ignore[index]
        product = conn.execute("SELECT min(id) FROM products").fetchone()[0]  # type: ignore[index]
        have = conn.execute("SELECT count(*) FROM licenses").fetchone()[0]  # type: ignore[index]
        while have < total:
            n = min(CHUNK, total - have)
            max_id = conn.execute("SELECT coalesce(max(id), 0) FROM licenses").fetchone()[0]  # type: ignore[index]
            params = {
                "customer": customer,
                "product": product,
                "first": have + 1,
                "last": have + n,
                "max_id": max_id,
            }
            with conn.transaction():
                for statement in _FILL:
                    conn.execute(statement, params)
            have += n
            if have % 200_000 == 0:
                log(f"  ... {have:,} licenses")
        conn.execute("VACUUM ANALYZE")


@benchmark("scale", quick=False)
def scale(ctx: Context) -> list[Row]:
    """check-in latency at 10,000 vs 1,000,000 licenses in PostgreSQL"""
    name = f"check-in p50 @ {SIZES[1]:,} licenses (PG)"
    reason = server_unavailable()
    if reason is not None:
        return [skipped(name, "ms", reason, f"p50 @ {SIZES[0]:,}", f"<= {TARGET}x")]
    duration = ctx.budget(3.0, 9.0)
    with ExitStack() as stack:
        servers: list[tuple[Server, list[Installation]]] = []
        for size in SIZES:
            url = stack.enter_context(postgres_database())
            server = stack.enter_context(tessera_server(url))
            keys = server.seed(PROBE_LICENSES, PROBE_MACHINES)
            probes = installations(keys, PROBE_MACHINES, prefix="probe")
            act = run_load(
                server.port, "/api/v1/activate", activation_bodies(probes), duration=60, connections=4
            )
            if act["ok"] != len(probes):
                raise RuntimeError(f"probe activations failed: {act['statuses']}")
            start = time.perf_counter()
            fill(url, size, ctx.log)
            ctx.log(f"  filled to {size:,} licenses in {time.perf_counter() - start:.0f} s")
            run_load(
                server.port,
                "/api/v1/checkin",
                checkin_bodies(probes, 200),
                duration=2,
                connections=CONNECTIONS,
            )  # warm up
            servers.append((server, probes))
        (small_server, small_probes), (large_server, large_probes) = servers
        count = int(duration * 3000)  # more than 4 connections check in: no body is sent twice
        r = run_load(
            large_server.port,
            "/api/v1/checkin",
            checkin_bodies(large_probes, count),
            duration=duration,
            connections=CONNECTIONS,
            baseline=Baseline(small_server.port, "/api/v1/checkin", checkin_bodies(small_probes, count)),
            slices=PAIRS,
        )
    small = r["baseline"]
    ratios = sorted(a / b for a, b in r["pair_p50_ms"] if b)
    ratio = statistics.median(ratios)
    clean = r["ok"] == r["requests"] and small["ok"] == small["requests"]
    return [
        Row(
            f"check-in p50 @ {SIZES[0]:,} licenses (PG)",
            small["p50_ms"],
            "ms",
            note=f"{small['rps']:.0f} req/s at {CONNECTIONS} connections, {latency_note(small)}",
        ),
        Row(
            name,
            r["p50_ms"],
            "ms",
            f"p50 @ {SIZES[0]:,} (paired)",
            small["p50_ms"],
            f"<= {TARGET}x",
            ratio <= TARGET and clean,
            f"{r['rps']:.0f} req/s, {latency_note(r)}; median of {len(ratios)} paired slices, "
            f"{ratios[0]:.2f}-{ratios[-1]:.2f}x",
            paired_ratio=ratio,
        ),
    ]
