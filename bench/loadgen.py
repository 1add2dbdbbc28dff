"""A closed-loop HTTP/1.1 load generator, run as its own process: ``python -m bench.loadgen``.

Why not httpx, why not wrk: the generator shares a 2-core machine with the server, so it
must spend as little CPU per request as possible, or it (not the server) sets the rate.
Raw asyncio protocols on uvloop with keep-alive connections and pre-built requests cost a
few microseconds per request; an httpx ``AsyncClient`` costs around a hundred, which on
this machine is slower than an empty FastAPI endpoint (the ``loadgen capacity`` rows of the
benchmark measure both against a trivial server). wrk would need a Debian package the CI
image does not have.

Each of ``--connections`` connections sends one request, waits for the whole response,
sends the next: a closed loop, so latency is honest (no coordinated omission from a queue
inside the generator), and the rate is what the server sustains at that concurrency.
Bounded by ``--duration`` seconds *and* ``--max-requests``. Bodies come from a file with
one request body per line, each used once (signed requests carry a nonce) unless
``--repeat`` allows cycling. Prints one JSON object on stdout.

**Paired with a baseline** (``--baseline-port``, ``--baseline-path``, ``--baseline-bodies``,
``--slices N``): the run alternates ``N`` slices of the figure with ``N`` of the baseline
(a second server, its bodies cycled), in the order ABBA ABBA ..., each slice
``duration / N`` seconds of its own (the baseline's after a pause), and adds ``baseline``
(the same keys), ``pairs`` (each pair's two rates), ``pair_p50_ms`` (each pair's two
median latencies) and ``ratio`` (the median of the per-pair ratios of the rates) to the
result. This machine's speed wanders by a third within minutes
(other runs share it): a figure measured a minute after its baseline carries that drift
into its ratio; a pair of slices a second apart does not.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import ssl
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

__all__ = ["main", "percentile"]

#: Paired runs: the pause before each slice of the baseline, unless ``--pause`` says.
PAUSE_S = 0.5


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


class _Source:
    """Hands out pre-built requests until the count or the time is up."""

    def __init__(self, requests: list[bytes], repeat: bool, max_requests: int, deadline: float) -> None:
        self._requests = requests
        self._repeat = repeat
        self._next = 0
        self._left = max_requests
        self.deadline = deadline

    def more(self, *, ignore_time: bool = False) -> bool:
        return (
            self._left > 0
            and (ignore_time or time.perf_counter() < self.deadline)
            and (self._repeat or self._next < len(self._requests))
        )

    def take(self) -> bytes | None:
        if self._left <= 0 or time.perf_counter() >= self.deadline:
            return None
        if self._next >= len(self._requests):
            if not self._repeat:
                return None
            self._next = 0
        request = self._requests[self._next]
        self._next += 1
        self._left -= 1
        return request


class _Connection(asyncio.Protocol):
    """One keep-alive connection: send, parse the response incrementally, send the next."""

    def __init__(
        self,
        source: _Source,
        latencies: list[float],
        statuses: Counter[int],
        done: asyncio.Future[None],
        opened_at: float | None = None,
    ) -> None:
        self.source = source
        # With a connection per request, latency counts from before the TCP connect (and the
        # TLS handshake): that is what an agent checking in once a day waits for.
        self.opened_at = opened_at
        self.latencies = latencies
        self.statuses = statuses
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self._send()

    def _send(self) -> None:
        request = self.source.take()
        if request is None:
            if self.transport is not None:
                self.transport.close()
            return
        self.sent_at = self.opened_at if self.opened_at is not None else time.perf_counter()
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
                elif line.startswith(b"transfer-encoding:") and b"chunked" in line:
                    raise RuntimeError("chunked responses are not supported by this generator")
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            status = int(head[9:12])
            del self.buffer[:total]
            self.latencies.append(time.perf_counter() - self.sent_at)
            self.statuses[status] += 1
            if self.opened_at is not None or b"connection: close" in head:
                assert self.transport is not None
                self.transport.close()
                return
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def build_requests(host: str, port: int, path: str, bodies: list[bytes], headers: list[str]) -> list[bytes]:
    extra = "".join(f"{h}\r\n" for h in headers)
    out = []
    for body in bodies:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode("ascii") + body)
    return out


async def run_raw(args: argparse.Namespace, requests: list[bytes]) -> tuple[list[float], Counter[int], float]:
    source = _Source(requests, args.repeat, args.max_requests, 0.0)
    return await _run_slice(args, args.port, source, args.duration, args.tls_ca)


async def _run_slice(
    args: argparse.Namespace, port: int, source: _Source, duration: float, tls_ca: Path | None
) -> tuple[list[float], Counter[int], float]:
    """``args.connections`` closed loops against ``port`` for ``duration`` seconds, taking
    requests from ``source`` (which keeps its place from slice to slice); TLS if ``tls_ca``."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    ssl_context = _client_tls(tls_ca)
    tls = {"ssl": ssl_context, "server_hostname": args.host} if ssl_context else {}
    start = time.perf_counter()
    source.deadline = start + duration

    async def keep_alive() -> None:
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(
            lambda: _Connection(source, latencies, statuses, done), args.host, port, **tls
        )
        await done

    async def connection_per_request() -> None:
        while source.more():
            done: asyncio.Future[None] = loop.create_future()
            opened = time.perf_counter()
            await loop.create_connection(
                functools.partial(_Connection, source, latencies, statuses, done, opened),
                args.host,
                port,
                **tls,
            )
            await done

    slot = connection_per_request if args.new_connection else keep_alive
    await asyncio.wait_for(asyncio.gather(*(slot() for _ in range(args.connections))), timeout=duration + 30)
    return latencies, statuses, time.perf_counter() - start


class _Side:
    """One side of a paired run: its slices' latencies, statuses and seconds."""

    def __init__(self, source: _Source, port: int, tls_ca: Path | None) -> None:
        self.source = source
        self.port = port
        self.tls_ca = tls_ca
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.seconds = 0.0
        self.rates: list[float] = []
        self.p50s: list[float] = []  # each slice's median latency, ms

    async def slice(self, args: argparse.Namespace, duration: float) -> None:
        latencies, statuses, seconds = await _run_slice(args, self.port, self.source, duration, self.tls_ca)
        self.latencies += latencies
        self.statuses += statuses
        self.seconds += seconds
        ok = sum(n for code, n in statuses.items() if 200 <= code < 300)
        self.rates.append(ok / seconds if seconds else 0.0)
        self.p50s.append(statistics.median(latencies) * 1000 if latencies else float("nan"))


async def run_paired(
    args: argparse.Namespace, requests: list[bytes], baseline: list[bytes]
) -> tuple[_Side, _Side]:
    """Slices of the figure and the baseline, ABBA ABBA ...: a drift in the machine's speed
    during a pair lands on both sides alike. Stops early when the figure's bodies run out
    (the pairs measured so far stand)."""
    figure = _Side(_Source(requests, args.repeat, args.max_requests, 0.0), args.port, args.tls_ca)
    base = _Side(_Source(baseline, True, 1 << 62, 0.0), args.baseline_port, args.baseline_tls_ca)
    each = args.duration / args.slices
    for i in range(args.slices):
        if not figure.source.more(ignore_time=True):
            break
        order = (figure, base) if i % 2 == 0 else (base, figure)
        for side in order:
            if side is base:
                # What the figure's server still does once its last answer is out (its
                # database writing the WAL, a collection) must not slow the baseline's
                # slice: measured with PostgreSQL check-ins, the baseline ran 4-7 % slower
                # right after a figure slice than after one of its own with a 0.1 s pause,
                # and alike with 0.5 s. A figure slice after a figure slice pays its own
                # aftermath, as it would in one long run.
                await asyncio.sleep(args.pause)
            await side.slice(args, each)
        if figure.rates[-1] == 0.0 and not figure.source.more(ignore_time=True):
            for side in (figure, base):  # the bodies ran out at the very start of its slice
                side.rates.pop()
                side.p50s.pop()
            break
    return figure, base


def _client_tls(ca_file: Path | None) -> ssl.SSLContext | None:
    if ca_file is None:
        return None
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def run_httpx(args: argparse.Namespace, bodies: list[bytes]) -> tuple[list[float], Counter[int], float]:
    import httpx

    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    start = time.perf_counter()
    deadline = start + args.duration
    items: Iterator[bytes] = _cycle(bodies) if args.repeat else iter(bodies)
    left = [args.max_requests]
    url = f"http://{args.host}:{args.port}{args.path}"
    headers = dict(h.split(": ", 1) for h in args.header)
    limits = httpx.Limits(max_connections=args.connections, max_keepalive_connections=args.connections)
    async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=30) as client:

        async def worker() -> None:
            while left[0] > 0 and time.perf_counter() < deadline:
                body = next(items, None)
                if body is None:
                    return
                left[0] -= 1
                t0 = time.perf_counter()
                response = await client.post(
                    url, content=body, headers={"content-type": "application/json", **headers}
                )
                latencies.append(time.perf_counter() - t0)
                statuses[response.status_code] += 1

        await asyncio.gather(*(worker() for _ in range(args.connections)))
    return latencies, statuses, time.perf_counter() - start


def _cycle(items: list[bytes]) -> Iterator[bytes]:
    while True:
        yield from items


def _summary(
    args: argparse.Namespace, latencies: list[float], statuses: Counter[int], seconds: float
) -> dict[str, object]:
    latencies = sorted(latencies)
    ok = sum(n for code, n in statuses.items() if 200 <= code < 300)
    return {
        "requests": len(latencies),
        "ok": ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "seconds": seconds,
        "rps": ok / seconds if seconds else 0.0,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
        "client": args.client,
        "tls": args.tls_ca is not None,
        "new_connection": args.new_connection,
        "connections": args.connections,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--bodies", type=Path, required=True, help="one request body per line")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--repeat", action="store_true", help="cycle through the bodies")
    parser.add_argument("--header", action="append", default=[], help="extra 'Name: value' header")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw")
    parser.add_argument("--tls-ca", type=Path, help="speak TLS, trusting only this CA (raw client)")
    parser.add_argument(
        "--new-connection", action="store_true", help="one connection (and handshake) per request"
    )
    parser.add_argument("--baseline-port", type=int, help="pair the run with this server's slices")
    parser.add_argument("--baseline-path", help="the baseline's path (with --baseline-port)")
    parser.add_argument("--baseline-bodies", type=Path, help="the baseline's bodies, cycled")
    parser.add_argument("--baseline-tls-ca", type=Path, help="the baseline speaks TLS, trusting this CA")
    parser.add_argument("--slices", type=int, default=1, help="pairs of slices (with --baseline-port)")
    parser.add_argument(
        "--pause",
        type=float,
        default=PAUSE_S,
        help="seconds before each baseline slice (0 when the figure's server leaves no work behind)",
    )
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        parser.error("load targets must be on loopback")
    paired = args.baseline_port is not None
    if paired and (args.baseline_path is None or args.baseline_bodies is None or args.client != "raw"):
        parser.error("--baseline-port needs --baseline-path and --baseline-bodies (raw client)")
    if args.slices < 1:
        parser.error("--slices must be at least 1")
    bodies = [line for line in args.bodies.read_bytes().split(b"\n") if line]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if paired:
        requests = build_requests(args.host, args.port, args.path, bodies, args.header)
        baseline = [line for line in args.baseline_bodies.read_bytes().split(b"\n") if line]
        baseline = build_requests(args.host, args.baseline_port, args.baseline_path, baseline, [])
        figure, base = asyncio.run(run_paired(args, requests, baseline))
        result = _summary(args, figure.latencies, figure.statuses, figure.seconds)
        result["baseline"] = _summary(args, base.latencies, base.statuses, base.seconds)
        pairs = list(zip(figure.rates, base.rates, strict=True))
        result["pairs"] = [list(pair) for pair in pairs]
        result["pair_p50_ms"] = [list(pair) for pair in zip(figure.p50s, base.p50s, strict=True)]
        ratios = [a / b for a, b in pairs if b]
        result["ratio"] = statistics.median(ratios) if ratios else float("nan")
    else:
        if args.client == "raw":
            requests = build_requests(args.host, args.port, args.path, bodies, args.header)
            latencies, statuses, seconds = asyncio.run(run_raw(args, requests))
        else:
            latencies, statuses, seconds = asyncio.run(run_httpx(args, bodies))
        result = _summary(args, latencies, statuses, seconds)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
