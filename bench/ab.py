"""Did a change make check-ins faster or slower? ``python -m bench.ab OTHER [--sqlite]``.

Not a benchmark row: a diagnosis. This machine's speed drifts by a factor of two from one
minute to the next, so two separate runs of ``make bench`` cannot tell a 5 % change from
noise. Here two servers run at once, this checkout's (B) and another checkout's (A, e.g.
``git worktree add /tmp/base HEAD~3`` then ``make -C /tmp/base dev``), each on a database
of its own with the same data, and the load generator alternates between them in ABBA
slices (``bench.loadgen``), as the paired rows of ``make bench`` do. It prints B's and A's
rates and the median of the per-pair ratios B/A: about 1.00 means no change (an A/A run
of one checkout against itself shows the method's own spread).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import bench.tessera_server as servers
from bench.http_server import CONNECTIONS, PER_LICENSE
from bench.processes import Baseline, run_load
from bench.tessera_server import (
    Server,
    activation_bodies,
    checkin_bodies,
    installations,
    postgres_database,
    server_unavailable,
    tessera_server,
)

LICENSES = 12


def _database(postgres: bool) -> contextlib.AbstractContextManager[str | None]:
    return postgres_database() if postgres else contextlib.nullcontext(None)


@contextlib.contextmanager
def _server(tessera: str, database: str | None) -> Iterator[Server]:
    """A server of the checkout whose ``tessera`` command this is."""
    own = servers.TESSERA
    servers.TESSERA = tessera
    try:
        with tessera_server(database) as server:
            servers.TESSERA = own
            yield server
    finally:
        servers.TESSERA = own


def _checkins(server: Server, prefix: str, count: int) -> list[bytes]:
    """Bound installations on ``server`` and ``count`` check-ins of theirs."""
    keys = server.seed(LICENSES, PER_LICENSE)
    insts = installations(keys, PER_LICENSE, prefix=prefix)
    bound = run_load(server.port, "/api/v1/activate", activation_bodies(insts), duration=120, connections=4)
    if bound["ok"] != len(insts):
        raise RuntimeError(f"activating the installations failed: {bound['statuses']}")
    return checkin_bodies(insts, count, server.checkin_keys(insts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("other", type=Path, help="the other checkout (A), with its .venv made")
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per side")
    parser.add_argument("--slices", type=int, default=8, help="pairs of slices")
    args = parser.parse_args(argv)
    other = args.other / ".venv" / "bin" / "tessera"
    if not other.exists():
        print(f"{other} does not exist: run `make dev` in {args.other} first", file=sys.stderr)
        return 2
    reason = server_unavailable()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    os.environ.setdefault("TESSERA_KEY_PASSPHRASE", "bench passphrase")
    count = int(12_000 * args.duration)  # more than either side can send in its slices
    with (
        _database(not args.sqlite) as url_a,
        _database(not args.sqlite) as url_b,
        _server(str(other), url_a) as a,
        _server(servers.TESSERA, url_b) as b,
    ):
        bodies_a, bodies_b = _checkins(a, "a", count), _checkins(b, "b", count)
        for server, bodies in ((a, bodies_a), (b, bodies_b)):  # warm up both
            run_load(server.port, "/api/v1/checkin", bodies[:2000], duration=1)
        result = run_load(
            b.port,
            "/api/v1/checkin",
            bodies_b[2000:],
            duration=args.duration,
            connections=CONNECTIONS,
            baseline=Baseline(a.port, "/api/v1/checkin", bodies_a[2000:], pause=0.5),
            slices=args.slices,
        )
    pairs = ", ".join(f"{figure / base:.2f}" for figure, base in result["pairs"])
    print(
        f"check-ins/s ({'SQLite' if args.sqlite else 'PostgreSQL'}): B (this checkout) "
        f"{result['rps']:,.0f}, A ({args.other}) {result['baseline']['rps']:,.0f}; "
        f"B/A {result['ratio']:.2f} (pairs {pairs})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
