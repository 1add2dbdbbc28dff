"""Bulk issue through the real server: licenses signed and stored per second.

SPEC section 7: 100,000 licenses issued in one bulk run in under a minute. The run goes
through ``tessera server run`` (one uvicorn worker) and its admin API,
``POST /api/v1/licenses/bulk`` in chunks of 10,000 (the server's cap), exactly as
``tessera license issue-bulk`` does it. The headline is the **pre-bound** variant: one license
per Locking ID, each with its license file signed at issue and its machine row stored, so
every license is both signed and stored. The clock runs from the first request to the last
response; the Locking IDs are made before it starts. The full run issues all 100,000 on
each backend; ``--quick`` issues 5,000 and projects (a few seconds per backend, most of it
the server's start).
"""

from __future__ import annotations

import functools
import time

from bench.harness import Context, Row, benchmark, skipped
from bench.http_server import BACKENDS, backend, guarded
from bench.tessera_server import FEATURES, PRODUCT, server_unavailable, tessera_server
from tessera.core.fingerprint import locking_id_for

BULK, BULK_SECONDS = 100_000, 60.0
CHUNK = 10_000  # MAX_BULK of the server
QUICK_COUNT = 5_000


def locking_ids(n: int) -> list[str]:
    return [
        str(locking_id_for([("m", f"bulk-{i}"), ("u", f"uuid-{i}"), ("n", f"nic-{i}")], PRODUCT))
        for i in range(n)
    ]


def measure(ctx: Context, name: str, ids: list[str]) -> list[Row]:
    with backend(name) as url, tessera_server(url) as server, server.admin() as client:
        r = client.post(
            "/api/v1/products",
            json={"code": PRODUCT, "name": "Cortex", "features": [{"code": f} for f in FEATURES]},
        )
        r.raise_for_status()
        r = client.post("/api/v1/customers", json={"name": "Factory Corp", "city": "Loopback"})
        r.raise_for_status()
        template = {
            "customer_id": r.json()["id"],
            "product": PRODUCT,
            "entitlements": [{"feature": f, "count": 10} for f in FEATURES],
            "emergency": ["ctxjs"],
        }
        ctx.log(f"  {name}: issuing {len(ids):,} pre-bound licenses in chunks of {CHUNK:,}")
        issued = 0
        start = time.perf_counter()
        for i in range(0, len(ids), CHUNK):
            resp = client.post("/api/v1/licenses/bulk", json={**template, "locking_ids": ids[i : i + CHUNK]})
            resp.raise_for_status()
            body = resp.json()
            if len(body["licenses"]) != len(ids[i : i + CHUNK]) or "license" not in body["licenses"][-1]:
                raise RuntimeError("a bulk response is missing licenses or their files")
            issued += body["count"]
        seconds = time.perf_counter() - start
        verified = client.get("/api/v1/audit/verify").json()
        if not verified["ok"]:
            raise RuntimeError(f"the audit chain does not verify: {verified['problems'][:1]}")
    rate = issued / seconds
    full = BULK / rate if issued < BULK else seconds
    how = "measured" if issued >= BULK else f"projected from {issued:,}"
    return [
        Row(
            f"bulk issue ({name})",
            rate,
            "licenses/s",
            target=f"{BULK:,} < {BULK_SECONDS:.0f} s",
            passed=full < BULK_SECONDS,
            note=f"{BULK:,} in {full:.1f} s ({how}); pre-bound: signed and stored, chunks of {CHUNK:,}",
        )
    ]


@benchmark("bulk-issue")
def bulk_issue(ctx: Context) -> list[Row]:
    """pre-bound licenses signed and stored per second via POST /api/v1/licenses/bulk"""
    reason = server_unavailable()
    if reason is not None:
        return [
            skipped(f"bulk issue ({name})", "licenses/s", reason, target=f"{BULK:,} < {BULK_SECONDS:.0f} s")
            for name in BACKENDS
        ]
    ids = locking_ids(QUICK_COUNT if ctx.quick else BULK)
    rows: list[Row] = []
    for name in BACKENDS:
        rows += guarded(ctx, f"bulk issue ({name})", functools.partial(measure, ctx, name, ids))
    return rows
