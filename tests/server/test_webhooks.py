"""Webhooks: outbox written with the change, delivered in the background, signed, retried with
backoff against a real loopback receiver that fails the first attempts, kept across restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select

from tessera.core.clock import SystemClock
from tessera.core.signing import SigningKey
from tessera.server import webhooks
from tessera.server.app import ServerState
from tessera.server.errors import Invalid
from tessera.server.models import WebhookDelivery, WebhookEndpoint
from tessera.server.storage import Database
from tessera.server.tokens import Principal, Role, create_token

from .conftest import START, serve, wait_until
from .helpers import agent, setup_license

SECRET = "whsec-" + "x" * 24


class Receiver:
    """A loopback HTTP endpoint that answers 500 to the first ``fail_first`` requests."""

    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.received: list[tuple[dict[str, str], bytes, datetime]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer.lock:
                    outer.received.append((dict(self.headers), body, datetime.now(UTC)))
                    failing = len(outer.received) <= outer.fail_first
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=2)
    yield r
    r.close()


@pytest.fixture
def fast_state(database: Database) -> ServerState:
    """A server on the real clock with fast retries (the policy of ``[webhooks]``)."""
    return ServerState(
        db=database,
        signing_key=SigningKey.generate(),
        pepper=secrets.token_bytes(32),
        clock=SystemClock(),
        webhook_settings=webhooks.WebhookSettings(
            retry_base_seconds=0.3, max_attempts=5, poll_seconds=0.05, timeout_seconds=5
        ),
    )


def deliveries(state: ServerState) -> list[WebhookDelivery]:
    with state.db.read() as session:
        return list(session.execute(select(WebhookDelivery).order_by(WebhookDelivery.id)).scalars())


def add(state: ServerState, url: str, events: list[str] | None = None) -> None:
    with state.db.write() as session:
        webhooks.add_endpoint(
            session, url=url, secret=SECRET, events=events or [], ca_pem=None,
            pepper=state.pepper, now=START,
        )  # fmt: skip


def test_signature_scheme() -> None:
    body = b'{"event":"license.issued"}'
    now = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    header = webhooks.sign_payload(SECRET, int(now.timestamp()), body)
    assert webhooks.verify_signature(SECRET, header, body, now)
    assert not webhooks.verify_signature(SECRET, header, body + b" ", now)
    assert not webhooks.verify_signature("other-secret-123456", header, body, now)
    assert not webhooks.verify_signature(SECRET, header, body, now.replace(hour=11))
    assert not webhooks.verify_signature(SECRET, "garbage", body, now)


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",
        "ftp://127.0.0.1/x",
        "https://user:pw@example.com/",
        "not a url",
        "https://a\u0000b/x",
        "https://exa mple.com/x",
        "https://example.com/x\r\nX-Evil: 1",
        "https://example.com:99999/x",
        "https://example.com:0/x",
        "https://[::1/x",
        "https://exa\u00admple.com/",
    ],
)
def test_endpoint_urls_must_be_https_or_loopback(state: ServerState, url: str) -> None:
    with pytest.raises(Invalid, match="url"):
        add(state, url)


def test_unknown_event_refused(state: ServerState) -> None:
    with pytest.raises(Invalid, match="unknown event"), state.db.write() as session:
        webhooks.add_endpoint(
            session, url="https://h.example/", secret=None, events=["license.exploded"],
            ca_pem=None, pepper=state.pepper, now=START,
        )  # fmt: skip


def test_events_are_written_with_the_change_and_only_then(state: ServerState, admin: Principal) -> None:
    add(state, "https://hooks.example/all")
    add(state, "https://hooks.example/leases", ["lease.denied"])
    serial, _key = setup_license(state, admin, START)
    rows = deliveries(state)
    assert [(r.endpoint_id, r.event) for r in rows] == [(1, "license.issued")]
    payload = json.loads(rows[0].payload)
    assert payload["data"]["serial"] == serial and payload["event"] == "license.issued"
    # A failed transaction leaves no event behind.
    with pytest.raises(RuntimeError), state.db.write() as session:
        webhooks.emit(session, "license.activated", {"serial": serial}, START)
        raise RuntimeError("rolled back")
    assert len(deliveries(state)) == 1
    with pytest.raises(ValueError, match="unknown webhook event"), state.db.write() as session:
        webhooks.emit(session, "nope", {}, START)


def test_delivery_retries_with_backoff_until_the_receiver_accepts(
    fast_state: ServerState, receiver: Receiver
) -> None:
    state = fast_state
    add(state, receiver.url)
    with state.db.write() as session:
        event_id = webhooks.emit(session, "license.activated", {"serial": "2026-000001"})
    worker = webhooks.WebhookWorker(state.db, state.pepper, state.clock, state.webhook_settings)

    async def run_until_delivered() -> None:
        task = asyncio.create_task(worker.run())
        try:
            for _ in range(200):
                if deliveries(state)[0].status != "pending":
                    break
                await asyncio.sleep(0.05)
        finally:
            worker.stop()
            await task

    asyncio.run(run_until_delivered())
    [row] = deliveries(state)
    assert (row.status, row.attempts, row.last_error) == ("delivered", 3, None)
    assert len(receiver.received) == 3
    times = [t for _, _, t in receiver.received]
    # Exponential backoff: 0.3 s, then 0.6 s (the worker polls every 0.05 s).
    assert (times[1] - times[0]).total_seconds() >= 0.25
    assert (times[2] - times[1]).total_seconds() >= 0.55
    for headers, body, at in receiver.received:
        assert headers["Tessera-Event"] == "license.activated"
        assert headers["Tessera-Delivery"] == event_id
        assert webhooks.verify_signature(SECRET, headers["Tessera-Signature"], body, at)
        assert json.loads(body)["data"] == {"serial": "2026-000001"}


def test_pending_events_survive_a_restart_and_give_up_after_max_attempts(
    fast_state: ServerState, receiver: Receiver
) -> None:
    state = fast_state
    add(state, receiver.url)
    add(state, "http://127.0.0.1:9/closed")  # nothing listens on the discard port
    with state.db.write() as session:
        webhooks.emit(session, "lease.denied", {"serial": "2026-000001"})
    # "Restart": a brand-new worker (another process would do the same) finds the outbox.
    for _ in range(2):
        worker = webhooks.WebhookWorker(state.db, state.pepper, state.clock, state.webhook_settings)
        asyncio.run(worker.run_once())
    wait_until(lambda: all(r.next_attempt_at <= datetime.now(UTC) for r in deliveries(state)))

    async def drain() -> None:
        worker = webhooks.WebhookWorker(state.db, state.pepper, state.clock, state.webhook_settings)
        task = asyncio.create_task(worker.run())
        for _ in range(300):
            if all(r.status != "pending" for r in deliveries(state)):
                break
            await asyncio.sleep(0.05)
        worker.stop()
        await task

    asyncio.run(drain())
    ok, closed = deliveries(state)
    assert ok.status == "delivered"
    assert (closed.status, closed.attempts) == ("failed", 5)
    assert closed.last_error


def test_live_server_emits_and_delivers_without_blocking(fast_state: ServerState, receiver: Receiver) -> None:
    """Through HTTP: the admin API registers the endpoint, an activation's answer does not
    wait for the (failing) receiver, and the worker inside the server delivers later."""
    state = fast_state
    with state.db.write() as session:
        _, token = create_token(session, name="t", role=Role.ADMIN, now=START)
    admin = Principal(1, "t", Role.ADMIN)
    serial, key = setup_license(state, admin, START)
    with serve(state) as live, live.client(token) as client:
        hook = client.post(
            "/api/v1/webhooks",
            json={"url": receiver.url, "secret": SECRET, "events": ["license.activated"]},
        )
        assert hook.status_code == 201, hook.text
        assert client.post("/api/v1/webhooks", json={"url": "http://10.0.0.1/x"}).status_code == 422
        response = client.post("/api/v1/activate", content=agent(1).activation(key).to_json())
        assert response.status_code == 200, response.text
        wait_until(lambda: any(r.status == "delivered" for r in deliveries(state)), 20)
        listed = client.get("/api/v1/webhooks/deliveries").json()
        assert listed[0]["event"] == "license.activated" and listed[0]["attempts"] == 3
        assert client.get("/api/v1/webhooks").json()[0]["url"] == receiver.url
    body = json.loads(receiver.received[-1][1])
    assert body["data"]["serial"] == serial


def test_a_bad_url_over_the_api_is_422_naming_url(state: ServerState, admin_token: str) -> None:
    with serve(state) as live, live.client(admin_token) as client:
        for url in (
            "https://exa mple.com/x",
            "https://example.com/x\r\nX-Evil: 1",
            "https://example.com:99999/x",
        ):
            answer = client.post("/api/v1/webhooks", json={"url": url})
            assert answer.status_code == 422 and answer.json()["detail"].startswith("url: "), answer.text
        assert client.get("/api/v1/webhooks").json() == []


def test_an_unusable_stored_url_fails_per_the_retry_policy(state: ServerState) -> None:
    """An endpoint stored before URLs were checked strictly: each attempt fails (it stayed
    pending with 0 attempts for good while the worker logged the client's refusal)."""
    with state.db.write() as session:
        session.add(
            WebhookEndpoint(
                url="https://example.com/x\r\nX-Evil: 1", secret=webhooks._seal_secret(SECRET, state.pepper),
                events="", active=True, created_at=START,
            )
        )  # fmt: skip
        session.flush()
        webhooks.emit(session, "lease.denied", {"serial": "2026-000001"}, START)
    settings = webhooks.WebhookSettings(retry_base_seconds=0, retry_max_seconds=0, max_attempts=3)
    worker = webhooks.WebhookWorker(state.db, state.pepper, state.clock, settings)
    for _ in range(3):
        assert asyncio.run(worker.run_once()) == 1
    (delivery,) = deliveries(state)
    assert (delivery.status, delivery.attempts) == ("failed", 3)
    assert delivery.last_error
    assert asyncio.run(worker.run_once()) == 0


def test_a_removed_endpoints_pending_deliveries_are_cancelled_and_listed_so(
    state: ServerState, admin_token: str
) -> None:
    """``cancelled`` is a status like the other three: the API filters by it, the CLI's
    --status and the metric name it (docs/webhooks.md)."""
    from tessera.cli import lease_cmds

    add(state, "https://hooks.example/gone")
    with state.db.write() as session:
        webhooks.emit(session, "lease.denied", {"serial": "2026-000001"}, START)
    with serve(state) as live, live.client(admin_token) as client:
        assert client.delete("/api/v1/webhooks/1").status_code == 200
        listed = client.get("/api/v1/webhooks/deliveries", params={"status": "cancelled"}).json()
        assert [d["status"] for d in listed] == ["cancelled"]
        assert client.get("/api/v1/webhooks/deliveries", params={"status": "pending"}).json() == []
        schema = client.get("/openapi.json").json()["paths"]["/api/v1/webhooks/deliveries"]["get"]
    [status] = [p for p in schema["parameters"] if p["name"] == "status"]
    offered = status["schema"]["anyOf"][0]["enum"]
    assert tuple(offered) == webhooks.DELIVERY_STATUSES == lease_cmds.DELIVERY_STATUSES


class Silent:
    """A TCP listener that accepts every connection and never answers: an endpoint that
    hangs each delivery until the worker's timeout. Counts the connections open at once."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.held: list[socket.socket] = []
        self.most_open = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.held = [c for c in self.held if not _closed_by_peer(c)] + [conn]
                self.most_open = max(self.most_open, len(self.held))

    def close(self) -> None:
        """Every held connection closed: the hanging deliveries fail at once."""
        self.sock.close()
        with self.lock:
            for conn in self.held:
                conn.close()


def _closed_by_peer(conn: socket.socket) -> bool:
    conn.setblocking(False)
    try:
        while True:  # drain the request the worker sent; b"" is the worker gone
            if conn.recv(65536) == b"":
                conn.close()
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        if conn.fileno() != -1:
            conn.setblocking(True)


@contextmanager
def running_worker(state: ServerState, db: Database | None = None) -> Iterator[webhooks.WebhookWorker]:
    """``WebhookWorker.run`` on an event loop of its own in a thread, as in a server process
    (``db``: that process's own connection pool); stopped when the block ends."""
    worker = webhooks.WebhookWorker(db or state.db, state.pepper, state.clock, state.webhook_settings)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(worker.run(),), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        loop.call_soon_threadsafe(worker.stop)
        thread.join(30)
        assert not thread.is_alive(), "the worker did not stop"
        loop.close()


def test_a_hanging_endpoint_does_not_delay_the_others(database: Database) -> None:
    """QA: with one endpoint that never answers, a healthy endpoint's events arrived up to
    timeout_seconds late (the worker waited for its whole batch before the next poll, and a
    backlog of the hanging endpoint filled the batch). Each endpoint is now delivered on its
    own, the hanging one holding at most PER_ENDPOINT connections."""
    state = ServerState(
        db=database, signing_key=SigningKey.generate(), pepper=secrets.token_bytes(32), clock=SystemClock(),
        webhook_settings=webhooks.WebhookSettings(
            retry_base_seconds=60, max_attempts=3, poll_seconds=0.05, timeout_seconds=8
        ),
    )  # fmt: skip
    silent, healthy = Silent(), Receiver(fail_first=0)
    try:
        add(state, silent.url)  # every event, and first: its backlog is the oldest
        add(state, healthy.url, ["license.activated"])
        with state.db.write() as session:
            for n in range(30):
                webhooks.emit(session, "lease.denied", {"serial": f"2026-{n:06d}"})
        with running_worker(state):
            wait_until(lambda: silent.most_open > 0)
            time.sleep(0.3)  # the worker is inside its hanging deliveries
            with state.db.write() as session:
                webhooks.emit(session, "license.activated", {"serial": "2026-000001"})
            emitted = time.monotonic()
            wait_until(lambda: len(healthy.received) == 1, 20)
            took = time.monotonic() - emitted
            hanging = sum(
                r.status == "pending" and r.attempts == 0 for r in deliveries(state) if r.endpoint_id == 1
            )
            silent.close()  # the hanging deliveries fail now, not after 8 s
        assert took < 3, f"the healthy endpoint waited {took:.1f} s for the hanging one"
        assert hanging == 31  # none of the hanging endpoint's deliveries had ended yet
        assert 1 <= silent.most_open <= webhooks.WebhookWorker.PER_ENDPOINT
    finally:
        silent.close()
        healthy.close()
    rows = deliveries(state)
    assert [r.status for r in rows if r.endpoint_id == 2] == ["delivered"]
    # The hanging endpoint's attempts that ended are failed attempts, retried later.
    assert all(r.status == "pending" for r in rows if r.endpoint_id == 1)
    assert all(r.last_error for r in rows if r.endpoint_id == 1 and r.attempts)


def test_a_claim_takes_each_endpoints_oldest_rows_in_turn_within_the_bounds(state: ServerState) -> None:
    add(state, "https://one.example/", ["lease.denied"])  # a backlog of 10, the oldest
    add(state, "https://two.example/", ["license.activated"])
    add(state, "https://three.example/", ["checkpoint.overdue"])
    with state.db.write() as session:
        for event, times in (("lease.denied", 10), ("license.activated", 2), ("checkpoint.overdue", 1)):
            for _ in range(times):
                webhooks.emit(session, event, {}, START)
    worker = webhooks.WebhookWorker(state.db, state.pepper, state.clock, state.webhook_settings)
    first = worker._claim(5, {})
    assert sorted(job.endpoint_id for job in first) == [1, 1, 2, 2, 3]  # in turns, not endpoint 1's five
    # Endpoint 1 has 2 in flight: 2 more of its rows, up to PER_ENDPOINT; the rest is claimed.
    assert webhooks.WebhookWorker.PER_ENDPOINT == 4
    assert [job.endpoint_id for job in worker._claim(32, {1: 2})] == [1, 1]
    assert worker._claim(32, {1: 4}) == []
    assert [job.endpoint_id for job in worker._claim(32, {1: 3})] == [1]


def test_an_attempt_ends_within_its_deadline_even_when_the_answer_trickles(database: Database) -> None:
    """httpx's timeout is per read: an answer sent a byte at a time would hold the attempt
    (and its claimed row) for good. An attempt ends after 3 x timeout_seconds."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    done = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100:
                if done.is_set():
                    return
                with contextlib.suppress(OSError):
                    conn.sendall(bytes([byte]))
                time.sleep(0.1)

    threading.Thread(target=trickle, daemon=True).start()
    state = ServerState(
        db=database, signing_key=SigningKey.generate(), pepper=secrets.token_bytes(32), clock=SystemClock(),
        webhook_settings=webhooks.WebhookSettings(timeout_seconds=0.3, retry_base_seconds=60),
    )  # fmt: skip
    add(state, f"http://127.0.0.1:{listener.getsockname()[1]}/hook")
    with state.db.write() as session:
        webhooks.emit(session, "lease.denied", {})
    worker = webhooks.WebhookWorker(state.db, state.pepper, state.clock, state.webhook_settings)
    started = time.monotonic()
    try:
        assert asyncio.run(worker.run_once()) == 1
    finally:
        done.set()
        listener.close()
    assert time.monotonic() - started < 3  # 0.9 s, and the time to record it
    (row,) = deliveries(state)
    assert (row.status, row.attempts, row.last_error) == ("pending", 1, "no complete answer within 0.9 s")


def test_two_processes_deliver_each_event_once(db_url: str, database: Database) -> None:
    """Several server processes on one database (PostgreSQL in production) share the outbox:
    a row is claimed by one of them only, also now that each claims while its earlier
    deliveries are still in flight."""
    state = ServerState(
        db=database, signing_key=SigningKey.generate(), pepper=secrets.token_bytes(32), clock=SystemClock(),
        webhook_settings=webhooks.WebhookSettings(poll_seconds=0.02, timeout_seconds=5),
    )  # fmt: skip
    receivers = [Receiver(fail_first=0), Receiver(fail_first=0)]
    other = Database(db_url)  # the second process's own connections
    try:
        for r in receivers:
            add(state, r.url)
        with state.db.write() as session:
            events = [webhooks.emit(session, "lease.denied", {"n": n}) for n in range(40)]
        with running_worker(state), running_worker(state, other):
            wait_until(lambda: all(r.status == "delivered" for r in deliveries(state)), 60)
    finally:
        for r in receivers:
            r.close()
        other.dispose()
    for r in receivers:
        got = sorted(headers["Tessera-Delivery"] for headers, _, _ in r.received)
        assert got == sorted(events)  # every event, none twice
    assert {r.attempts for r in deliveries(state)} == {1}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.example.com/tessera?token=s3cret", "https://hooks.example.com/tessera?[redacted]"),
        ("https://user:s3cret@hooks.example.com:8443/x", "https://[redacted]@hooks.example.com:8443/x"),
        ("https://hooks.example.com/x#s3cret", "https://hooks.example.com/x#[redacted]"),
        ("https://hooks.example.com/plain", "https://hooks.example.com/plain"),
        ("http://[::1]:9/a?b=s3cret", "http://[::1]:9/a?[redacted]"),
    ],
)
def test_redacted_urls_keep_where_but_no_secret(url: str, shown: str) -> None:
    assert webhooks.redact_url(url) == shown


def test_a_failing_endpoints_secrets_stay_out_of_the_log_and_the_audit_log(
    state: ServerState, admin_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    """QA: a failed delivery wrote the endpoint URL (a token in its query) to the server log,
    and readonly/support tokens read it in the audit log. The admin who manages webhooks
    still sees the whole URL."""
    url = "http://127.0.0.1:9/closed?token=s3cret-in-query"  # nothing listens on the discard port
    with serve(state) as live, live.client(admin_token) as client:
        assert client.post("/api/v1/webhooks", json={"url": url, "secret": SECRET}).status_code == 201
        assert client.get("/api/v1/webhooks").json()[0]["url"] == url
        readonly = client.post("/api/v1/tokens", json={"name": "ro", "role": "readonly"}).json()["token"]
        audit = live.client(readonly).get("/api/v1/audit")
        assert audit.status_code == 200 and "webhook.add" in audit.text
        assert "s3cret" not in audit.text and "127.0.0.1:9/closed?[redacted]" in audit.text
    with state.db.write() as session:
        # One stored before credentials in the URL were refused.
        session.add(
            WebhookEndpoint(
                url="http://user:s3cret-in-userinfo@127.0.0.1:9/old", events="", active=True,
                created_at=START, secret=webhooks._seal_secret(SECRET, state.pepper),
            )
        )  # fmt: skip
        session.flush()
        webhooks.emit(session, "lease.denied", {"serial": "2026-000001"}, START)
    settings = webhooks.WebhookSettings(retry_base_seconds=0, retry_max_seconds=0, max_attempts=1)
    worker = webhooks.WebhookWorker(state.db, state.pepper, state.clock, settings)
    with caplog.at_level("WARNING", logger="tessera.server.webhooks"):
        assert asyncio.run(worker.run_once()) == 2
    assert [r.status for r in deliveries(state)] == ["failed", "failed"]
    assert "failed for good" in caplog.text and "127.0.0.1:9/closed?[redacted]" in caplog.text
    assert "s3cret" not in caplog.text
    assert all("s3cret" not in (d.last_error or "") for d in deliveries(state))
