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
    a database: a row is claimed by a conditional update that only one process wins)."""

    CLAIM_SECONDS = 120
    BATCH = 20

    def __init__(self, db: Database, pepper: bytes, clock: Clock, settings: WebhookSettings) -> None:
        self._db = db
        self._pepper = pepper
        self._clock = clock
        self.settings = settings
        self._stop = asyncio.Event()

    def now(self) -> datetime:
        return utc(self._clock.now())

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Poll and deliver until :meth:`stop`; a failing database only delays delivery."""
        while not self._stop.is_set():
            try:
                delivered = await self.run_once()
            except Exception as exc:  # never let the worker die: log and retry next poll
                log.warning("webhook worker: %s", exc)
                delivered = 0
            if delivered == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.settings.poll_seconds)

    async def run_once(self) -> int:
        """Claim the due deliveries and attempt each once; returns how many were attempted."""
        jobs = await run_in_threadpool(self._claim)
        if not jobs:
            return 0
        await asyncio.gather(*(self._deliver(job) for job in jobs))
        return len(jobs)

    def _claim(self) -> list[_Job]:
        now = self.now()
        # Look first in a read transaction: an idle poll never takes SQLite's write lock.
        with self._db.read() as session:
            due_any = session.execute(
                select(WebhookDelivery.id)
                .where(
                    WebhookDelivery.status == "pending",
                    WebhookDelivery.next_attempt_at <= now,
                )
                .limit(1)
            ).first()
        if due_any is None:
            return []
        with self._db.write() as session:
            due = session.execute(
                select(WebhookDelivery, WebhookEndpoint)
                .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
                .where(
                    WebhookDelivery.status == "pending",
                    WebhookDelivery.next_attempt_at <= now,
                    or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until < now),
                )
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                .limit(self.BATCH)
            ).all()
            jobs: list[_Job] = []
            for delivery, endpoint in due:
                claimed = session.execute(
                    update(WebhookDelivery)
                    .where(
                        WebhookDelivery.id == delivery.id,
                        WebhookDelivery.status == "pending",
                        or_(
                            WebhookDelivery.locked_until.is_(None),
                            WebhookDelivery.locked_until < now,
                        ),
                    )
                    .values(locked_until=now + timedelta(seconds=self.CLAIM_SECONDS))
                    .execution_options(synchronize_session=False)
                )
                if claimed.rowcount != 1:  # type: ignore[attr-defined]
                    continue
                jobs.append(
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
                )
            return jobs

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
            async with httpx.AsyncClient(
                verify=verify,
                timeout=self.settings.timeout_seconds,
                trust_env=False,
                follow_redirects=False,
            ) as client:
                response = await client.post(job.url, content=job.payload, headers=headers)
            if not 200 <= response.status_code < 300:
                error = f"HTTP {response.status_code}"
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
