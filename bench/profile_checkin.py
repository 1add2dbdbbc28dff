"""Where a check-in's time goes: ``python -m bench.profile_checkin [--postgres] [--n N]``.

Not a benchmark row: a diagnosis for when the ``check-ins/s`` rows fall short. It starts a
real server (so the data is made the normal way), then replays check-ins *in this process*
through the same service function the endpoint calls (``tessera.server.activation.checkin``
inside ``Database.write()``), under cProfile, and prints the cost split into request
parsing, signature work, ORM/database and the rest. HTTP and FastAPI are left out on
purpose: the empty-endpoint baseline already measures them.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from contextlib import nullcontext
from datetime import UTC, datetime

from bench.processes import run_load
from bench.tessera_server import (
    activation_bodies,
    checkin_bodies,
    installations,
    postgres_database,
    server_unavailable,
    tessera_server,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_checkin", description=__doc__)
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--n", type=int, default=2000, help="check-ins to replay")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    reason = server_unavailable()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    os.environ["TESSERA_KEY_PASSPHRASE"] = "bench passphrase"
    from tessera.core.protocol import CheckinRequest
    from tessera.server import activation
    from tessera.server.runner import build_state

    db_cm = postgres_database() if args.postgres else nullcontext(None)
    with db_cm as url, tessera_server(url) as server:
        keys = server.seed(10, 10)
        insts = installations(keys, 10)
        run_load(server.port, "/api/v1/activate", activation_bodies(insts), duration=60, connections=4)
        bodies = checkin_bodies(insts, args.n)
        state = build_state(server.data_dir)

        def one(body: bytes) -> None:
            parsed = CheckinRequest.from_json(body)
            with state.db.write() as session:
                activation.checkin(
                    session, parsed, datetime.now(UTC).replace(microsecond=0), state.signing_key, state.pepper
                ).to_json()

        for body in bodies[:50]:
            one(body)  # warm up: pools, caches
        half = (len(bodies) - 50) // 2
        start = time.perf_counter()
        for body in bodies[50 : 50 + half]:
            one(body)
        plain = (time.perf_counter() - start) / half
        profiler = cProfile.Profile()
        profiler.enable()
        for body in bodies[50 + half :]:
            one(body)
        profiler.disable()
        backend = "PostgreSQL" if args.postgres else "SQLite"
        print(f"{backend}: {plain * 1e3:.2f} ms per check-in in process, one at a time ({half} replayed)")
        print("share of the time under cProfile:")
        stats = pstats.Stats(profiler)
        total = sum(v[3] for k, v in stats.stats.items() if k[2] == "one")  # type: ignore[attr-defined]
        groups = {
            "request parse (from_json)": ("protocol.py", "from_json"),
            "verify agent signature": ("protocol.py", "verify_with"),
            "sign response": ("protocol.py", "signed"),
            "license lookup (ORM + SQL)": ("activation.py", "_license_by_key"),
            "session commit": ("session.py", "commit"),
        }
        for label, (file, func) in groups.items():
            cum = sum(v[3] for k, v in stats.stats.items() if k[0].endswith(file) and k[2] == func)  # type: ignore[attr-defined]
            print(f"  {label:<30} {cum / total:6.1%}")
        stats.sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
