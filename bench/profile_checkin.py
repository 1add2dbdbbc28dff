"""Where a check-in's time goes: ``python -m bench.profile_checkin [--postgres] [--n N]``.

Not a benchmark row: a diagnosis for when the ``check-ins/s`` rows fall short. It starts a
real server (so the data is made the normal way), then replays MACed check-ins *in this
process* through what the endpoint runs: ``CheckinRequest.from_json``, the check-in
writer's batch (``tessera.server.checkins``, batches of 16, lookup, MAC, rules, writes,
commit, the responses signed together) under cProfile, and prints the cost split. HTTP
and FastAPI are left out on purpose: the empty-endpoint baseline already measures them.
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
    import asyncio

    from tessera.core.protocol import CheckinRequest
    from tessera.server.checkins import CheckinWriter, _Job
    from tessera.server.runner import build_state

    db_cm = postgres_database() if args.postgres else nullcontext(None)
    with db_cm as url, tessera_server(url) as server:
        keys = server.seed(10, 10)
        insts = installations(keys, 10)
        run_load(server.port, "/api/v1/activate", activation_bodies(insts), duration=60, connections=4)
        bodies = checkin_bodies(insts, args.n, server.checkin_keys(insts))
        state = build_state(server.data_dir)
        writer = CheckinWriter(state.db, state.pepper, state.signing_key)
        loop = asyncio.new_event_loop()
        pg = writer._pg_loop(loop)  # this loop's connections, kept from batch to batch

        def batch(chunk: list[bytes]) -> None:
            now = datetime.now(UTC).replace(microsecond=0)
            parsed = [CheckinRequest.from_json(body) for body in chunk]
            jobs = [_Job(p, now, loop.create_future(), loop) for p in parsed]
            if args.postgres:  # as the server runs it: on the event loop, asynchronously
                loop.run_until_complete(writer._run_pg_batch(jobs, pg))
            else:
                writer._run_batch(jobs)
            loop.run_until_complete(asyncio.sleep(0))  # let the writer's results land
            for job in jobs:
                answer = job.future.result()
                assert isinstance(answer, bytes), answer  # signed in the batch

        def replay(some: list[bytes]) -> None:
            for i in range(0, len(some), 16):
                batch(some[i : i + 16])

        replay(bodies[:64])  # warm up: pools, caches, prepared statements
        half = (len(bodies) - 64) // 2
        start, cpu = time.perf_counter(), time.process_time()
        replay(bodies[64 : 64 + half])
        plain = (time.perf_counter() - start) / half
        cpu = (time.process_time() - cpu) / half
        profiler = cProfile.Profile()
        profiler.enable()
        replay(bodies[64 + half :])
        profiler.disable()
        writer.stop()  # its connections, before the scratch database goes
        backend = "PostgreSQL" if args.postgres else "SQLite"
        print(
            f"{backend}: {plain * 1e6:.0f} us per check-in in process ({cpu * 1e6:.0f} us of this"
            f" process's CPU), batches of 16 ({half} replayed)"
        )
        print("share of the time under cProfile:")
        stats = pstats.Stats(profiler)
        total = sum(v[3] for k, v in stats.stats.items() if k[2] == "replay")  # type: ignore[attr-defined]
        groups = {
            "request parse (from_json)": ("protocol.py", "from_json"),
            "MAC check": ("protocol.py", "authenticate"),
            "database lookups": ("checkins.py", "_pg_look_up" if args.postgres else "_look_up"),
            "database writes": ("checkins.py", "_pg_record" if args.postgres else "_record"),
            "commit": ("checkins.py", "__exit__"),
            "sign responses (one per batch)": ("protocol.py", "sign_batch"),
        }
        if args.postgres:  # the writes are one statement that commits by itself (migration 0005)
            groups["database writes and commit"] = groups.pop("database writes")
            del groups["commit"]
        for label, (file, func) in groups.items():
            cum = sum(v[3] for k, v in stats.stats.items() if k[0].endswith(file) and k[2] == func)  # type: ignore[attr-defined]
            print(f"  {label:<30} {cum / total:6.1%}")
        stats.sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
