"""Webhooks: license events delivered to the vendor's HTTPS endpoints, signed and retried.

Events go through an **outbox**: :func:`emit` only inserts rows, in the caller's
transaction, so an event exists exactly when the change that caused it was committed, and
a restart loses nothing. A background task in every server process (:class:`WebhookWorker`)
claims due rows, POSTs them and reschedules failures with exponential backoff. The request
that caused an event never waits for its delivery.

Each delivery carries ``Tessera-Signature: t=<unix time>,v1=<hex>``, the HMAC-SHA256 with the
endpoint's secret over ``f"{t}.".encode() + body`` (the scheme of Stripe), plus
``Tessera-Event`` and ``Tessera-Delivery`` (the event id, the same on every retry, so
receivers can drop duplicates). ``docs/webhooks.md`` shows how to verify it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import os
import re
import secrets
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import bindparam, insert, or_, select, update
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from tessera.core.clock import Clock, utc
from tessera.server.config import WebhookSettings
from tessera.server.errors import Invalid, NotFound
from tessera.server.models import WebhookDelivery, WebhookEndpoint
from tessera.server.storage import Database

if TYPE_CHECKING:
    from tessera.server.rawsql import RawTransaction

__all__ = [
    "DELIVERY_STATUSES",
    "EVENTS",
    "WebhookSettings",
    "WebhookWorker",
    "add_endpoint",
    "emit",
    "emit_raw",
    "list_deliveries",
    "list_endpoints",
    "redact_url",
    "remove_endpoint",
    "sign_payload",
    "verify_signature",
]

log = logging.getLogger("tessera.server.webhooks")

#: Every event the server may emit. Those whose triggers live in other modules (rehost,
#: blacklist, checkpoint) are emitted there through :func:`emit`.
EVENTS = (
    "license.issued",
    "license.bulk-issued",
    "license.activated",
    "license.rehosted",
    "license.blacklisted",
    "blacklist.hit",
    "checkpoint.overdue",
    "credential.issued",
    "lease.denied",
    "order.cancelled",
)
#: Every status a delivery row has: ``pending`` (due or waiting for a retry), ``delivered``
#: (a 2xx answer), ``failed`` (``max_attempts`` used up) and ``cancelled`` (its endpoint was
#: removed before it was delivered). The API's ``status`` filter, the CLI's ``--status``
#: and the ``tessera_webhook_deliveries`` metric's states are these four.
DELIVERY_STATUSES = ("pending", "delivered", "failed", "cancelled")
SIGNATURE_HEADER = "Tessera-Signature"
MAX_ERROR = 300


# ---------------------------------------------------------------------------- signing


def sign_payload(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Tessera-Signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode("ascii") + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(
    secret: str, header: str, body: bytes, now: datetime, tolerance_seconds: int = 300
) -> bool:
    """What a receiver does: recompute the HMAC, compare in constant time, check freshness."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(utc(now).timestamp() - timestamp) > tolerance_seconds:
        return False
    expected = sign_payload(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def _secret_box(pepper: bytes) -> AESGCM:
    key = HKDF(hashes.SHA256(), 32, salt=None, info=b"tessera webhook secrets").derive(pepper)
    return AESGCM(key)


def _seal_secret(secret: str, pepper: bytes) -> str:
    nonce = os.urandom(12)
    return base64.b64encode(nonce + _secret_box(pepper).encrypt(nonce, secret.encode(), None)).decode()


def _open_secret(sealed: str, pepper: bytes) -> str:
    raw = base64.b64decode(sealed)
    return _secret_box(pepper).decrypt(raw[:12], raw[12:], None).decode()


# ---------------------------------------------------------------------------- endpoints

#: Never in an endpoint's URL: ASCII whitespace and control characters (spaces must be %20).
_URL_BAD = re.compile(r"[\x00-\x20\x7f]")


def check_url(url: str) -> str:
    """HTTPS only; plain HTTP only to this host (a local relay), where nothing is on the wire.

    Strict, because an endpoint whose URL the HTTP client refuses can never be delivered
    to: no space or control character anywhere (a CR LF would be a header injection), a
    port that exists, and what the worker's client (httpx) itself accepts."""
    if (bad := _URL_BAD.search(url)) is not None:
        what = "a space" if bad.group() == " " else f"a control character (U+{ord(bad.group()):04X})"
        raise Invalid(f"url: must not contain {what}")
    try:
        parts = urlsplit(url)
        port = parts.port  # out of range: ValueError
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise Invalid(
            f"url: not a usable URL ({str(exc).splitlines()[0] if str(exc) else 'malformed'})"
        ) from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise Invalid("url: must be an https:// URL")
    if port == 0:
        raise Invalid("url: port 0 is not a port to deliver to")
    if parts.username or parts.password:
        raise Invalid("url: credentials in the URL are not allowed (use the secret)")
    if parts.scheme == "http":
        host = parts.hostname
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise Invalid("url: must be https:// (plain http only to a loopback address)")
    return url


def redact_url(url: str) -> str:
    """The endpoint's URL for the server log, a delivery's error and the audit log: where it
    goes (scheme, host, port, path), without what may be a secret (user info, the query, as
    ``?token=...``, and the fragment). Those are read by more people than the admins who
    manage webhooks; ``GET /api/v1/webhooks`` (admin only) keeps the whole URL."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an unparsable URL)"
    _userinfo, at, host = parts.netloc.rpartition("@")
    shown = f"{parts.scheme}://{'[redacted]@' if at else ''}{host}{parts.path}"
    shown += "?[redacted]" if parts.query else ""
    shown += "#[redacted]" if parts.fragment else ""
    return _URL_BAD.sub("_", shown)  # an old URL's CR LF must not forge a log line


def add_endpoint(
    session: Session,
    *,
    url: str,
    secret: str | None,
    events: list[str],
    ca_pem: str | None,
    pepper: bytes,
    now: datetime,
) -> tuple[WebhookEndpoint, str]:
    """Register an endpoint; returns it and its secret (generated when none was given)."""
    check_url(url)
    unknown = [e for e in events if e not in EVENTS]
    if unknown:
        raise Invalid(f"events: unknown event {unknown[0]!r} (known: {', '.join(EVENTS)})")
    if ca_pem is not None:
        try:
            ssl.create_default_context(cadata=ca_pem)
        except (ssl.SSLError, ValueError):
            raise Invalid("ca: not a PEM CA certificate") from None
    secret = secret or secrets.token_urlsafe(32)
    row = WebhookEndpoint(
        url=url,
        secret=_seal_secret(secret, pepper),
        events=",".join(events),
        ca_pem=ca_pem,
        active=True,
        created_at=now,
    )
    session.add(row)
    session.flush()
    return row, secret


def endpoint_view(row: WebhookEndpoint) -> dict[str, Any]:
    return {
        "id": row.id,
        "url": row.url,
        "events": [e for e in row.events.split(",") if e] or ["*"],
        "active": row.active,
        "created_at": utc(row.created_at).isoformat(),
    }


def list_endpoints(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(select(WebhookEndpoint).order_by(WebhookEndpoint.id)).scalars()
    return [endpoint_view(r) for r in rows if r.active]


def remove_endpoint(session: Session, endpoint_id: int) -> None:
    row = session.get(WebhookEndpoint, endpoint_id)
    if row is None or not row.active:
        raise NotFound(f"webhook {endpoint_id} not found")
    row.active = False  # kept (inactive) so its delivery history stays readable
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.status == "pending")
        .values(status="cancelled")
    )


def list_deliveries(session: Session, status: str | None, limit: int) -> list[dict[str, Any]]:
    stmt = select(WebhookDelivery).order_by(WebhookDelivery.id.desc()).limit(limit)
    if status is not None:
        stmt = stmt.where(WebhookDelivery.status == status)
    return [
        {
            "id": d.id,
            "endpoint_id": d.endpoint_id,
            "event_id": d.event_id,
            "event": d.event,
            "status": d.status,
            "attempts": d.attempts,
            "created_at": utc(d.created_at).isoformat(),
            "next_attempt_at": utc(d.next_attempt_at).isoformat(),
            "delivered_at": utc(d.delivered_at).isoformat() if d.delivered_at else None,
            "last_error": d.last_error,
        }
        for d in session.execute(stmt).scalars()
    ]


# ---------------------------------------------------------------------------- emitting


_ACTIVE_ENDPOINTS = select(WebhookEndpoint.id, WebhookEndpoint.events).where(WebhookEndpoint.active.is_(True))
_QUEUE = (
    insert(WebhookDelivery)
    .values(
        endpoint_id=bindparam("endpoint_id"),
        event_id=bindparam("event_id"),
        event=bindparam("event"),
        payload=bindparam("payload"),
        created_at=bindparam("at"),
        status="pending",
        attempts=0,
        next_attempt_at=bindparam("at"),
    )
    .inline()
)


def emit(session: Session, event: str, payload: dict[str, Any], at: datetime | None = None) -> str:
    """Queue ``event`` for every endpoint that wants it, in the caller's transaction.

    Cheap (one select of the endpoints, one insert per endpoint) and never touches the
    network, so any service may call it from inside its request. Returns the event id.
    """
    event_id, at, body = _event(event, payload, at)
    endpoints = session.execute(_ACTIVE_ENDPOINTS).all()
    for endpoint_id in _wanting(endpoints, event):
        session.add(
            WebhookDelivery(
                endpoint_id=endpoint_id,
                event_id=event_id,
                event=event,
                payload=body,
                created_at=at,
                status="pending",
                attempts=0,
                next_attempt_at=at,
            )
        )
    session.flush()
    return event_id


def emit_raw(
    tx: RawTransaction,
    endpoints: Sequence[tuple[int, str]],
    event: str,
    payload: dict[str, Any],
    at: datetime,
) -> None:
    """:func:`emit` for a transaction on a plain DB-API connection (the activation path):
    the same outbox rows, without a session; nothing is written when no endpoint wants it.

    ``endpoints`` are the active ones (id, events), read by the caller in this transaction
    together with what else it reads: one statement less.
    """
    if event not in EVENTS:
        raise ValueError(f"unknown webhook event {event!r}")
    wanting = _wanting(endpoints, event)
    if not wanting:  # the usual case: no JSON body, no random id for nobody
        return
    event_id, at, body = _event(event, payload, at)
    for endpoint_id in wanting:
        tx.run(_QUEUE, endpoint_id=endpoint_id, event_id=event_id, event=event, payload=body, at=at)


def _event(event: str, payload: dict[str, Any], at: datetime | None) -> tuple[str, datetime, str]:
    """A new event's id, its time (whole seconds) and the body every endpoint receives."""
    if event not in EVENTS:
        raise ValueError(f"unknown webhook event {event!r}")
    at = utc(at or datetime.now(UTC)).replace(microsecond=0)
    event_id = "evt_" + secrets.token_urlsafe(18)
    body = json.dumps(
        {
            "id": event_id,
            "event": event,
            "created": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "data": payload,
        },
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return event_id, at, body


def _wanting(endpoints: Sequence[Sequence[Any]], event: str) -> list[int]:
    """The active endpoints (id, comma-separated events or empty for all) that want ``event``."""
    return [endpoint_id for endpoint_id, wanted in endpoints if not wanted or event in wanted.split(",")]


# ---------------------------------------------------------------------------- delivering


@dataclass(frozen=True, slots=True)
class _Job:
    id: int
    endpoint_id: int
    url: str
    secret: str
    ca_pem: str | None
    event: str
    event_id: str
    payload: bytes
    attempts: int


class WebhookWorker:
    """Delivers the outbox from inside a server process (one per process, several may share
    a database: a row is claimed by a conditional update that only one process wins).

    Endpoints are delivered to independently: each delivery runs as a task of its own,
    at most :attr:`PER_ENDPOINT` at once to one endpoint and :attr:`MAX_IN_FLIGHT` in all
    (per process), and the worker claims more while others are in flight. One endpoint
    that hangs until ``timeout_seconds`` then holds its own slots only, and its backlog
    never fills a claim meant for the others (a claim takes each endpoint's oldest rows
    first, round-robin)."""

    #: How long a claimed row is reserved for its process, at least: longer than any
    #: attempt (:meth:`_attempt_seconds`), so no process claims it again while it is in
    #: flight (which would deliver it twice).
    CLAIM_SECONDS = 120
    #: Deliveries in flight at once to one endpoint, per process.
    PER_ENDPOINT = 4
    #: Deliveries in flight at once in all, per process.
    MAX_IN_FLIGHT = 32

    def __init__(self, db: Database, pepper: bytes, clock: Clock, settings: WebhookSettings) -> None:
        self._db = db
        self._pepper = pepper
        self._clock = clock
        self.settings = settings
        self._stop = asyncio.Event()
        #: Set when :meth:`stop` is called or a delivery ends (a slot is free again).
        self._wake = asyncio.Event()
        self._in_flight: dict[int, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def now(self) -> datetime:
        return utc(self._clock.now())

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _attempt_seconds(self) -> float:
        """The longest one attempt may take: connecting, sending and the answer, each within
        ``timeout_seconds`` (httpx's timeouts are per step, so a receiver trickling its
        answer could otherwise hold the delivery past its claim)."""
        return 3 * self.settings.timeout_seconds

    def _claim_seconds(self) -> float:
        return max(self.CLAIM_SECONDS, self._attempt_seconds() + 60)

    def _room(self) -> int:
        """How many more deliveries may start now."""
        return self.MAX_IN_FLIGHT - sum(self._in_flight.values())

    async def run(self) -> None:
        """Poll and deliver until :meth:`stop`; a failing database only delays delivery.

        A poll that started deliveries is followed at once by the next (a backlog drains
        as fast as the bounds allow); otherwise the worker sleeps ``poll_seconds`` or until
        a delivery ends. On :meth:`stop` the deliveries in flight are awaited (each ends
        within its timeout and records its outcome); cancelled, they are cancelled too and
        their rows are claimed again once the claim lapses."""
        try:
            while not self._stop.is_set():
                self._wake.clear()
                started = 0
                room = self._room()
                if room > 0:
                    try:
                        jobs = await run_in_threadpool(self._claim, room, dict(self._in_flight))
                    except Exception as exc:  # never let the worker die: log and retry next poll
                        log.warning("webhook worker: %s", exc)
                        jobs = []
                    for job in jobs:
                        self._start(job)
                    started = len(jobs)
                if started == 0 or self._room() <= 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            for task in list(self._tasks):
                task.cancel()

    def _start(self, job: _Job) -> None:
        self._in_flight[job.endpoint_id] = self._in_flight.get(job.endpoint_id, 0) + 1
        task = asyncio.create_task(self._deliver_logged(job), name=f"tessera-webhook-{job.id}")
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            left = self._in_flight[job.endpoint_id] - 1
            if left:
                self._in_flight[job.endpoint_id] = left
            else:
                del self._in_flight[job.endpoint_id]
            self._wake.set()

        task.add_done_callback(done)

    async def _deliver_logged(self, job: _Job) -> None:
        try:
            await self._deliver(job)
        except Exception as exc:  # the database failed recording it: retried once the claim lapses
            log.warning(
                "webhook %s to endpoint %d (%s): %s", job.event_id, job.endpoint_id, redact_url(job.url), exc
            )

    async def run_once(self) -> int:
        """Claim the due deliveries (within the bounds) and attempt each once, waiting for
        all of them; returns how many were attempted."""
        jobs = await run_in_threadpool(self._claim, self._room(), dict(self._in_flight))
        if not jobs:
            return 0
        await asyncio.gather(*(self._deliver(job) for job in jobs))
        return len(jobs)

    def _claim(self, room: int, in_flight: dict[int, int]) -> list[_Job]:
        """Up to ``room`` due rows, per endpoint at most :attr:`PER_ENDPOINT` less its
        deliveries ``in_flight`` in this process: each endpoint's oldest first, taken in
        turn (the first row of every endpoint, then the second, ...), so one endpoint's
        backlog cannot crowd out the others."""
        if room <= 0:
            return []
        now = self.now()
        due_now = (
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= now,
            or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until < now),
        )
        # Chosen in a read transaction (an idle poll never takes SQLite's write lock), one
        # query per endpoint on (endpoint_id, status, next_attempt_at): its cost does not
        # grow with another endpoint's backlog. The conditional update below decides.
        queues: list[list[tuple[datetime, int]]] = []
        with self._db.read() as session:
            for endpoint_id in session.execute(select(WebhookEndpoint.id)).scalars().all():
                free = self.PER_ENDPOINT - in_flight.get(endpoint_id, 0)
                if free <= 0:
                    continue
                due = session.execute(
                    select(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                    .where(WebhookDelivery.endpoint_id == endpoint_id, *due_now)
                    .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                    .limit(free)
                ).all()
                if due:
                    queues.append([(utc(at), delivery_id) for at, delivery_id in due])
        # In turns: the first row of every endpoint (the longest-waiting endpoint first),
        # then the second, ...
        queues.sort(key=lambda queue: queue[0])
        chosen: list[int] = []
        for turn in itertools.zip_longest(*queues):
            chosen += [entry[1] for entry in turn if entry is not None]
        del chosen[room:]
        if not chosen:
            return []
        with self._db.write() as session:
            until = now + timedelta(seconds=self._claim_seconds())
            claimed: list[int] = []
            for delivery_id in chosen:
                won = session.execute(
                    update(WebhookDelivery)
                    .where(WebhookDelivery.id == delivery_id, *due_now)
                    .values(locked_until=until)
                    .execution_options(synchronize_session=False)
                )
                if won.rowcount == 1:  # type: ignore[attr-defined]
                    claimed.append(delivery_id)
            if not claimed:
                return []
            rows = session.execute(
                select(WebhookDelivery, WebhookEndpoint)
                .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
                .where(WebhookDelivery.id.in_(claimed))
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
            ).all()
            return [
                _Job(
                    delivery.id,
                    endpoint.id,
                    endpoint.url,
                    _open_secret(endpoint.secret, self._pepper),
                    endpoint.ca_pem,
                    delivery.event,
                    delivery.event_id,
                    delivery.payload.encode("utf-8"),
                    delivery.attempts,
                )
                for delivery, endpoint in rows
            ]

    async def _deliver(self, job: _Job) -> None:
        error: str | None = None
        timestamp = int(self.now().timestamp())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "tessera-webhooks/1",
            "Tessera-Event": job.event,
            "Tessera-Delivery": job.event_id,
            SIGNATURE_HEADER: sign_payload(job.secret, timestamp, job.payload),
        }
        verify: ssl.SSLContext | bool = True
        try:
            if job.ca_pem:
                verify = ssl.create_default_context(cadata=job.ca_pem)
                verify.minimum_version = ssl.TLSVersion.TLSv1_2
            async with (
                asyncio.timeout(self._attempt_seconds()),
                httpx.AsyncClient(
                    verify=verify,
                    timeout=self.settings.timeout_seconds,
                    trust_env=False,
                    follow_redirects=False,
                ) as client,
            ):
                response = await client.post(job.url, content=job.payload, headers=headers)
            if not 200 <= response.status_code < 300:
                error = f"HTTP {response.status_code}"
        except TimeoutError:
            error = f"no complete answer within {self._attempt_seconds():g} s"
        except (httpx.HTTPError, httpx.InvalidURL, ssl.SSLError, ValueError) as exc:
            # An endpoint that can never work (a URL or CA the client refuses, stored before
            # they were checked as strictly) is a failed attempt like a refused connection,
            # so the retry policy ends it as "failed" rather than leaving it pending for good.
            error = (str(exc) or type(exc).__name__).splitlines()[0]
            # Support reads the deliveries: an error that quotes the URL quotes it redacted.
            error = error.replace(job.url, redact_url(job.url))
        await run_in_threadpool(self._record, job, error)

    def _record(self, job: _Job, error: str | None) -> None:
        now = self.now()
        attempts = job.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "locked_until": None}
        if error is None:
            values.update(status="delivered", delivered_at=now, last_error=None)
        else:
            values["last_error"] = error[:MAX_ERROR]
            if attempts >= self.settings.max_attempts:
                values["status"] = "failed"
                log.warning(
                    "webhook %s to endpoint %d (%s) failed for good: %s",
                    job.event_id, job.endpoint_id, redact_url(job.url), error,
                )  # fmt: skip
            else:
                delay = min(
                    self.settings.retry_base_seconds * 2 ** (attempts - 1),
                    self.settings.retry_max_seconds,
                )
                values["next_attempt_at"] = now + timedelta(seconds=delay)
        with self._db.write() as session:
            session.execute(update(WebhookDelivery).where(WebhookDelivery.id == job.id).values(**values))
