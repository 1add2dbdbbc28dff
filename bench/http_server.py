"""Server throughput over loopback HTTP: the empty-endpoint baseline, activations, check-ins.

SPEC section 7: activations and check-ins per second on 2 cores at least half of what the
same web stack (FastAPI, one uvicorn worker) serves for an empty endpoint, on SQLite and on
PostgreSQL, with p99 latency. The load generator runs in its own process (one core), the
server in another (one worker, so one core plus its database). A first row measures the
generator against a server that does nothing, to show it is not what limits the figures.
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from bench.emptyapp import AGENT_KEY, CHECKIN_KEY
from bench.harness import Context, Row, benchmark, skipped
from bench.processes import LOOPBACK, PYTHON, Baseline, LoadResult, free_port, run_load, serving
from bench.tessera_server import (
    TESSERA,
    Installation,
    Server,
    activation_bodies,
    checkin_bodies,
    installations,
    postgres_database,
    server_unavailable,
    tessera_server,
)
from bench.tlsfiles import TlsFiles, make_tls_files
from tessera.core.protocol import AGENT_KEY_CACHE_SIZE, CheckinRequest

TARGET_RATIO = 0.5
CONNECTIONS = 16
#: Full run only, info rows: more agents at once than the rows above. With 16 connections
#: in a closed loop a request waits for the batch in flight and then its own, so a backend
#: whose batch waits for database round trips (PostgreSQL) is measured by its latency as
#: much as by its capacity; the empty endpoint is CPU-bound either way.
CROWD = 64
PER_LICENSE = 50  # machines per license: a site license, and a short slot scan per activation
BACKENDS = ("SQLite", "PostgreSQL")
BULK = 100_000
SAMPLE_KEY = "K7QXM-2VDRT-9HFNA-PC4WE-8BZJY"


def latency_note(r: LoadResult) -> str:
    note = f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms"
    bad = {code: n for code, n in r["statuses"].items() if not code.startswith("2")}
    if bad:
        note += ", errors " + ", ".join(f"{n}x HTTP {code}" for code, n in bad.items())
    return note


def pair_note(r: LoadResult) -> str:
    """How many pairs of slices a paired row's ratio is the median of, and their spread."""
    ratios = sorted(a / b for a, b in r["pairs"] if b)
    if not ratios:
        return "no pairs"
    return f"median of {len(ratios)} paired slices, {ratios[0]:.2f}-{ratios[-1]:.2f}x"


def sample_body() -> bytes:
    """A check-in request: the baseline receives the same bytes a real endpoint does."""
    return CheckinRequest.create(
        SAMPLE_KEY, "TL1-MP5UNZP2ZRSFQMXIPVBGRKZMPWZZK3IG57Y7CM3V5T6EEOS5",
        "bench-system-0001", AGENT_KEY, CHECKIN_KEY,
    ).to_json()  # fmt: skip


class Baselines(NamedTuple):
    """What the server rows are compared with, measured in the same run."""

    empty: LoadResult
    crowd: LoadResult | None  # the empty endpoint at CROWD connections (full run only)
    activation_floor: LoadResult
    port: int  # the empty endpoint's server, still running: the server rows pair with it


def pairs(duration: float) -> int:
    """Pairs of slices for a server row of ``duration`` seconds: half a second or more each."""
    return max(4, min(10, round(duration / 0.5)))


def paired(baselines: Baselines) -> Baseline:
    """The empty endpoint as the load generator's other side (``bench.loadgen``, paired)."""
    return Baseline(baselines.port, "/empty", [sample_body()])


@contextmanager
def empty_endpoint() -> Iterator[int]:
    """The baseline server (FastAPI, one uvicorn worker), warmed up; its port."""
    port = free_port()
    with serving([*uvicorn_args(port), "--log-level", "warning", "--no-access-log"], port=port):
        run_load(port, "/empty", [sample_body()], duration=0.5, repeat=True)
        yield port


def measure_baselines(ctx: Context, duration: float, port: int) -> tuple[list[Row], Baselines]:
    """The baselines' own rows, on the empty endpoint's server at ``port`` (and the
    generator's capacity against a server that does nothing)."""
    body = sample_body()
    null_port = free_port()
    with serving([PYTHON, "-m", "bench.emptyapp", "--null", str(null_port)], port=null_port):
        capacity = run_load(null_port, "/null", [body], duration=min(duration, 2.0), repeat=True)
        httpx_capacity = None
        if not ctx.quick:
            httpx_capacity = run_load(null_port, "/null", [body], duration=2.0, repeat=True, client="httpx")
    empty = run_load(port, "/empty", [body], duration=duration, repeat=True, connections=CONNECTIONS)
    crowd = None
    if not ctx.quick:
        crowd = run_load(port, "/empty", [body], duration=duration, repeat=True, connections=CROWD)
    bodies = [sample_body() for _ in range(200)]  # own nonces, as real requests
    # The floors and the twin are empty apps: nothing of theirs runs on after a slice.
    empty_side = Baseline(port, "/empty", [body], pause=0.0)
    # The method's own noise: the empty endpoint paired with a second server of itself. Its
    # ratio should be 1.00; how far it strays is how far any paired row's may.
    twin_port = free_port()
    with serving([*uvicorn_args(twin_port), "--log-level", "warning", "--no-access-log"], port=twin_port):
        run_load(twin_port, "/empty", [body], duration=0.5, repeat=True)
        twin = run_load(
            twin_port,
            "/empty",
            [body],
            duration=duration,
            repeat=True,
            baseline=empty_side,
            slices=pairs(duration),
        )
    run_load(port, "/floor", bodies, duration=0.5, repeat=True)
    floor = run_load(
        port, "/floor", bodies, duration=duration, repeat=True, baseline=empty_side, slices=pairs(duration)
    )
    # Own agent keys, more than the server caches the X25519 form of (tessera.core.protocol):
    # going round them in order, every request converts its key once, as a new
    # installation's activation does.
    floor_keys = 2 * AGENT_KEY_CACHE_SIZE
    bodies = activation_bodies(installations([SAMPLE_KEY], floor_keys, prefix="floor"))
    run_load(port, "/activation-floor", bodies, duration=0.5, repeat=True)
    activation_floor = run_load(
        port,
        "/activation-floor",
        bodies,
        duration=duration,
        repeat=True,
        baseline=empty_side,
        slices=pairs(duration),
    )
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
    rows.append(
        Row(
            "empty FastAPI POST, a second server (paired)",
            twin["rps"],
            "req/s",
            "empty FastAPI POST (paired)",
            twin["baseline"]["rps"],
            note=f"info: the pairing's own noise, ideally 1.00x; {pair_note(twin)}",
            paired_ratio=twin["ratio"],
        )
    )
    if crowd is not None:
        rows.append(
            Row(f"empty FastAPI POST, {CROWD} connections", crowd["rps"], "req/s", note=latency_note(crowd))
        )
    rows.append(
        Row(
            "crypto floor POST (MAC check + sign, no DB)",
            floor["rps"],
            "req/s",
            "empty FastAPI POST (paired)",
            floor["baseline"]["rps"],
            note=f"info: one signature per answer (check-ins sign one per batch); {latency_note(floor)}",
            paired_ratio=floor["ratio"],
        )
    )
    rows.append(
        Row(
            "activation floor POST (verify + sign + seal, no DB)",
            activation_floor["rps"],
            "req/s",
            "empty FastAPI POST (paired)",
            activation_floor["baseline"]["rps"],
            note="info: the most any correct online activation can reach on this stack; "
            f"{latency_note(activation_floor)}",
            paired_ratio=activation_floor["ratio"],
        )
    )
    return rows, Baselines(empty, crowd, activation_floor, port)


def uvicorn_args(port: int) -> list[str]:
    return [PYTHON, "-m", "uvicorn", "bench.emptyapp:app", "--host", "127.0.0.1", "--port", str(port)]


@contextmanager
def tls_empty_endpoint() -> Iterator[tuple[Baseline, TlsFiles]]:
    """The baseline server over TLS (a certificate of its own CA), warmed up; its files."""
    body = sample_body()
    with tempfile.TemporaryDirectory(prefix="tessera-bench-tls-") as tmp:
        files = make_tls_files(Path(tmp))
        port = free_port()
        tls_args = ["--ssl-certfile", str(files.cert), "--ssl-keyfile", str(files.key)]
        with serving(
            [*uvicorn_args(port), *tls_args, "--log-level", "warning", "--no-access-log"], port=port
        ):
            run_load(port, "/empty", [body], duration=0.5, repeat=True, tls_ca=files.ca)  # warm up
            yield Baseline(port, "/empty", [body], tls_ca=files.ca), files


def measure_tls_baselines(duration: float, empty: LoadResult, tls: Baseline, files: TlsFiles) -> list[Row]:
    """The same endpoint over TLS (``tls``): kept-alive connections, and one new connection
    per request; the generator's capacity against a do-nothing server with ``files``.

    An agent checks in once per validation interval (a day by default), so in production
    every check-in opens a new TLS connection: the handshake is part of its cost.
    """
    body = sample_body()
    port = free_port()
    with serving(
        [PYTHON, "-m", "bench.emptyapp", "--null", str(port), str(files.cert), str(files.key)], port=port
    ):
        capacity = run_load(
            port, "/null", [body], duration=2.0, repeat=True, tls_ca=files.ca, new_connection=True
        )
    kept = run_load(tls.port, "/empty", [body], duration=duration, repeat=True, tls_ca=tls.tls_ca)
    fresh = run_load(
        tls.port, "/empty", [body], duration=duration, repeat=True, tls_ca=tls.tls_ca, new_connection=True
    )
    headroom = capacity["rps"] / fresh["rps"]
    return [
        Row(
            "loadgen capacity (TLS, new connection each)",
            capacity["rps"],
            "req/s",
            "empty FastAPI POST, TLS, new conn.",
            fresh["rps"],
            note="generator is not the bottleneck"
            if headroom >= 3
            else "info: near the generator's limit; the TLS baseline is a lower bound",
        ),
        Row(
            "empty FastAPI POST, TLS keep-alive",
            kept["rps"],
            "req/s",
            "empty FastAPI POST",
            empty["rps"],
            note=latency_note(kept),
        ),
        Row(
            "empty FastAPI POST, TLS new connection each",
            fresh["rps"],
            "req/s",
            "empty FastAPI POST",
            empty["rps"],
            note=latency_note(fresh),
        ),
    ]


RELAY_ROW = "check-ins/s through a relay (SQLite, TLS both hops)"


def measure_server_tls(ctx: Context, duration: float, tls: Baseline) -> list[Row]:
    """Check-ins as they arrive in production: TLS, one new connection per check-in (SQLite);
    then the same through a relay (``tessera relay``, a split deployment's DMZ part)."""
    with tessera_server(None, tls=True) as server:
        assert server.ca is not None
        keys = server.seed(4, PER_LICENSE)
        insts = installations(keys, PER_LICENSE, prefix="tls")
        act = run_load(
            server.port,
            "/api/v1/activate",
            activation_bodies(insts),
            duration=60,
            connections=4,
            tls_ca=server.ca,
        )
        if act["ok"] != len(insts):
            raise RuntimeError(f"activations over TLS failed: {act['statuses']}")
        ctx.log(f"  SQLite over TLS: check-ins for {duration:.0f} s, a new connection each")
        r = run_load(
            server.port,
            "/api/v1/checkin",
            checkin_bodies(insts, int(duration * 1500)),
            duration=duration,
            connections=CONNECTIONS,
            tls_ca=server.ca,
            new_connection=True,
            baseline=tls,
            slices=pairs(duration),
        )
        ratio = r["ratio"]
        rows = [
            Row(
                "check-ins/s (SQLite, TLS, new connection each)",
                r["rps"],
                "req/s",
                "empty FastAPI POST, TLS, new conn. (paired)",
                r["baseline"]["rps"],
                f">= {TARGET_RATIO}x",
                ratio >= TARGET_RATIO and r["ok"] == r["requests"],
                f"{latency_note(r)}; {pair_note(r)}",
                paired_ratio=ratio,
            )
        ]
        if importlib.util.find_spec("tessera.server.relay") is None:
            return [*rows, skipped(RELAY_ROW, "req/s", "relay not available", "the row above")]
        rows += guarded(ctx, "relay", lambda: [measure_relay(ctx, server, insts, duration, r)])
    return rows


def measure_relay(
    ctx: Context, server: Server, insts: list[Installation], duration: float, direct: LoadResult
) -> Row:
    """The same check-ins through a relay in front of the server: its own TLS towards the
    agents (a new connection each), kept-alive TLS connections to the server."""
    assert server.ca is not None
    with tempfile.TemporaryDirectory(prefix="tessera-bench-relay-") as tmp:
        relay_dir = Path(tmp) / "relay"
        made = subprocess.run(
            [TESSERA, "relay", "init", "--data-dir", str(relay_dir), "--upstream", server.url,
             "--upstream-ca", str(server.ca)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if made.returncode != 0:
            raise RuntimeError(f"relay init failed: {made.stderr.strip()[-300:]}")
        port = free_port()
        ca = relay_dir / "tls" / "ca.pem"
        args = [TESSERA, "relay", "run", "--data-dir", str(relay_dir), "--host", LOOPBACK]
        args += ["--port", str(port)]
        with serving(args, port=port, health=f"https://{LOOPBACK}:{port}/api/v1/health", verify=str(ca)):
            ctx.log(f"  through a relay: check-ins for {duration:.0f} s, a new connection each")
            r = run_load(
                port,
                "/api/v1/checkin",
                checkin_bodies(insts, int(duration * 1000)),
                duration=duration,
                connections=CONNECTIONS,
                tls_ca=ca,
                new_connection=True,
            )
    return Row(
        RELAY_ROW,
        r["rps"],
        "req/s",
        "the row above (direct)",
        direct["rps"],
        note=f"info: one more process and TLS hop on the same 2 cores; {latency_note(r)}",
        passed=None if r["ok"] == r["requests"] else False,
    )


@contextmanager
def backend(name: str) -> Iterator[str | None]:
    if name == "SQLite":
        yield None
    else:
        with postgres_database() as url:
            yield url


def measure_server(ctx: Context, name: str, duration: float, baselines: Baselines) -> list[Row]:
    crowd = baselines.crowd
    slices = pairs(duration)
    empty_side = paired(baselines)
    # Bodies for more than the rows can use in ``duration`` seconds of their slices: the
    # pairs end early when the bodies run out (activations bind a machine each; check-ins
    # carry a nonce each).
    count = int(2000 * duration)
    licenses = max(2, count // PER_LICENSE + 1)
    checkins = int(8000 * duration)
    rows: list[Row] = []
    with backend(name) as url, tessera_server(url) as server:
        ctx.log(f"  {name}: issuing {licenses} licenses x {PER_LICENSE} machines")
        start = time.perf_counter()
        keys = server.seed(licenses + 1, PER_LICENSE)
        probe = installations(keys[-1:], 1, prefix="probe")[0]  # its own license, always free
        keys = keys[:-1]
        issue_rate = licenses / (time.perf_counter() - start)
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
            baseline=empty_side,
            slices=slices,
        )
        # The generator takes bodies in order: the first ``requests`` were sent. Check in with
        # those only if every one was bound (else fall back to the warm-up machines).
        ok = insts[: act["requests"]] if act["ok"] == act["requests"] else warm
        if server.activate(probe) != server.checkin_keys([probe])[0]:
            raise RuntimeError("the check-in keys derived for the load differ from what the server seals")
        ctx.log(f"  {name}: check-ins for {duration:.0f} s over {len(ok)} installations")
        chk = run_load(
            server.port,
            "/api/v1/checkin",
            checkin_bodies(ok, checkins, server.checkin_keys(ok)),
            duration=duration,
            connections=CONNECTIONS,
            baseline=empty_side,
            slices=slices,
        )
        crowded = None
        if crowd is not None:
            ctx.log(f"  {name}: check-ins for {duration:.0f} s, {CROWD} connections")
            crowded = run_load(
                server.port,
                "/api/v1/checkin",
                checkin_bodies(ok, checkins, server.checkin_keys(ok)),
                duration=duration,
                connections=CROWD,
                baseline=empty_side,
                slices=slices,
            )
    for what, r in (("activations", act), ("check-ins", chk)):
        ratio = r["ratio"]
        clean = r["ok"] == r["requests"]
        note = f"{latency_note(r)}; {pair_note(r)}"
        if what == "activations":
            # Both as ratios to their paired empty endpoint: the machine's drift cancels.
            note += f"; {ratio / baselines.activation_floor['ratio']:.2f}x of the activation floor"
        rows.append(
            Row(
                f"{what}/s ({name})",
                r["rps"],
                "req/s",
                "empty FastAPI POST (paired)",
                r["baseline"]["rps"],
                f">= {TARGET_RATIO}x",
                ratio >= TARGET_RATIO and clean,
                note,
                paired_ratio=ratio,
            )
        )
    if crowd is not None and crowded is not None:
        rows.append(
            Row(
                f"check-ins/s ({name}, {CROWD} connections)",
                crowded["rps"],
                "req/s",
                f"empty FastAPI POST, {CROWD} connections (paired)",
                crowded["baseline"]["rps"],
                note=f"info: capacity with more agents at once; {latency_note(crowded)}",
                paired_ratio=crowded["ratio"],
            )
        )
    projected = BULK / issue_rate
    rows.append(
        Row(
            f"licenses issued one per request ({name})",
            issue_rate,
            "licenses/s",
            note=f"info: POST /api/v1/licenses, 4 clients ({BULK:,} would take {projected:,.0f} s); "
            "the bulk path is the 'bulk issue' row",
        )
    )
    return rows


@benchmark("http")
def http(ctx: Context) -> list[Row]:
    """empty FastAPI baseline, activations and check-ins/s over loopback (SQLite, PostgreSQL)"""
    duration = ctx.budget(2.0, 10.0)  # per side of a paired row: the row takes twice that
    with empty_endpoint() as port:
        rows, baselines = measure_baselines(ctx, duration, port)
        reason = server_unavailable()
        for name in BACKENDS:
            if reason is not None:
                rows += [
                    skipped(
                        f"{what}/s ({name})", "req/s", reason, "empty FastAPI POST", f">= {TARGET_RATIO}x"
                    )
                    for what in ("activations", "check-ins")
                ]
                continue
            rows += guarded(
                ctx, f"server ({name})", functools.partial(measure_server, ctx, name, duration, baselines)
            )
    return rows


@benchmark("tls")
def tls(ctx: Context) -> list[Row]:
    """the same over TLS with a new connection per request (handshake cost), SQLite"""
    duration = ctx.budget(2.0, 6.0)
    empty = run_empty_plain(duration)
    with tls_empty_endpoint() as (tls_side, files):
        rows = measure_tls_baselines(duration, empty, tls_side, files)
        name = "check-ins/s (SQLite, TLS, new connection each)"
        reason = server_unavailable()
        if reason is not None:
            return [
                *rows,
                skipped(name, "req/s", reason, "empty FastAPI POST, TLS, new conn.", f">= {TARGET_RATIO}x"),
                skipped(RELAY_ROW, "req/s", reason, "the row above (direct)"),
            ]
        return rows + guarded(ctx, "server (TLS)", lambda: measure_server_tls(ctx, duration, tls_side))


def run_empty_plain(duration: float) -> LoadResult:
    port = free_port()
    with serving([*uvicorn_args(port), "--log-level", "warning", "--no-access-log"], port=port):
        run_load(port, "/empty", [sample_body()], duration=0.5, repeat=True)
        return run_load(
            port, "/empty", [sample_body()], duration=duration, repeat=True, connections=CONNECTIONS
        )


def guarded(ctx: Context, what: str, measure: Callable[[], list[Row]]) -> list[Row]:
    """One backend failing (PostgreSQL down, a server bug) must not hide the others' rows."""
    try:
        return measure()
    except Exception as exc:
        ctx.log(f"  {what}: {type(exc).__name__}: {exc}")
        return [Row(what, None, "req/s", passed=False, note=f"error: {type(exc).__name__}: {str(exc)[:120]}")]
