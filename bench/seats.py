"""Online activation on a site license with thousands of bound machines (full run only).

An activation compares the new machine with every machine already bound to its license (is
it one of them, with a part replaced?), so on a site license that scan, not the crypto,
sets what an activation costs, and it runs under the license's lock: a roll-out onto one
license is serialized on it. The worst realistic case is measured: every machine shares a
component (one CPU model across a company's fleet), so no bound machine can be passed over
without weighing its components. One real server (SQLite), one license; activations one at
a time (their latency is their cost) when 50 and when 3,000 machines are bound.
"""

from __future__ import annotations

from bench.harness import Context, Row, benchmark, skipped
from bench.http_server import latency_note
from bench.processes import run_load
from bench.tessera_server import activation_bodies, installations, server_unavailable, tessera_server

FEW, MANY = 50, 3_000
PROBES = 40  # activations measured at each size
FLEET_CPU = (("c", "Intel(R) Core(TM) i7-1365U"),)


@benchmark("seats", quick=False)
def seats(ctx: Context) -> list[Row]:
    """activation latency on a license with 3,000 bound machines vs 50 (SQLite, one CPU model)"""
    name = f"activation p50 @ {MANY:,} bound machines (SQLite)"
    reason = server_unavailable()
    if reason is not None:
        return [skipped(name, "ms", reason, f"p50 @ {FEW} bound machines")]
    with tessera_server(None) as server:
        (key,) = server.seed(1, MANY + 2 * PROBES)
        fleet = installations([key], MANY + 2 * PROBES, prefix="fleet", shared=FLEET_CPU)
        bound, few_probes, many_probes = fleet[:MANY], fleet[MANY : MANY + PROBES], fleet[MANY + PROBES :]
        notes: list[str] = []  # each probe's latencies

        def fill(machines: list[bytes]) -> None:
            r = run_load(server.port, "/api/v1/activate", machines, duration=300, connections=4)
            if r["ok"] != len(machines):
                raise RuntimeError(f"filling the license failed: {r['statuses']}")

        def probe(machines: list[bytes]) -> float:
            r = run_load(server.port, "/api/v1/activate", machines, duration=60, connections=1)
            if r["ok"] != len(machines):
                raise RuntimeError(f"probe activations failed: {r['statuses']}")
            notes.append(latency_note(r))
            return float(r["p50_ms"])

        fill(activation_bodies(bound[:FEW]))
        few = probe(activation_bodies(few_probes))
        ctx.log(f"  seats: binding {MANY - FEW:,} more machines")
        fill(activation_bodies(bound[FEW:]))
        many = probe(activation_bodies(many_probes))
    return [
        Row(f"activation p50 @ {FEW} bound machines (SQLite)", few, "ms", note=f"info: {notes[0]}"),
        Row(
            name,
            many,
            "ms",
            f"p50 @ {FEW} bound machines",
            few,
            note=f"info: the slot scan grows with the seats; {notes[1]}",
        ),
    ]
