"""Prometheus metrics at ``GET /metrics``: what an operator graphs and alerts on.

Two kinds of figures:

* **Traffic**, counted by :class:`MetricsMiddleware` around the whole app (the Connect
  lanes included): requests and their duration by interface and status code. The
  interface is one of a fixed set (``checkin``, ``activate``, ``recover``, ``lease``,
  ``health``, ``admin``, ``offline``, ``portal``, ``metrics``, ``other``), never the raw
  path, so a scanner's made-up URLs cannot grow the label set.
* **Stock**, read from the database when scraped (:class:`StockCollector`, at most every
  :data:`STOCK_TTL` seconds): licenses by status, bound machines, leases held, webhook
  deliveries waiting and given up, blacklist entries and hits, portal users.

With ``server run --workers N`` every worker counts its own traffic into files under
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode; the runner makes that
directory empty before the workers start), and a scrape, whichever worker answers it, adds
them up.

The endpoint is off unless ``[interfaces] metrics = true`` and needs a bearer token of role
admin, support or readonly (Prometheus: ``authorization: {credentials_file: ...}``). Off,
nothing is measured at all: the traffic counters cost a request about 4 µs (bench row
``metrics layer``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tessera.server.models import (
    BlacklistEntryRow,
    BlacklistHit,
    Lease,
    LicenseRow,
    Machine,
    PortalUser,
    WebhookDelivery,
)
from tessera.server.storage import Database
from tessera.server.webhooks import DELIVERY_STATUSES

__all__ = ["MULTIPROC_ENV", "Metrics", "MetricsMiddleware", "StockCollector"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: How old the database figures may be (a count over a million licenses is not free).
STOCK_TTL = 30.0
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0)
_EXACT = {
    "/api/v1/checkin": "checkin",
    "/api/v1/activate": "activate",
    "/api/v1/recover": "recover",
    "/api/v1/lease": "lease",
    "/api/v1/health": "health",
    "/api/v1/activate-offline": "offline",
    "/metrics": "metrics",
}


def interface_of(path: str) -> str:
    """The bounded label for a request path."""
    known = _EXACT.get(path)
    if known is not None:
        return known
    if path.startswith("/api/v1/"):
        return "admin"
    if path == "/portal" or path.startswith("/portal/"):
        return "portal"
    return "other"


class Metrics:
    """One app's traffic metrics, in a registry of its own (several apps may live in one
    test process; in multiprocess mode the values go to files whatever the registry), and
    what a scrape reads: those, or every worker's files, plus ``stock``."""

    def __init__(self, stock: Collector | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tessera_http_requests",
            "HTTP requests answered, by interface and status code.",
            ["interface", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "tessera_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer, by interface.",
            ["interface"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._scraped = self.registry
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            self._scraped = CollectorRegistry()
            multiprocess.MultiProcessCollector(self._scraped)
        if stock is not None:
            self._scraped.register(stock)

    def exposition(self) -> bytes:
        """The text format of one scrape."""
        return generate_latest(self._scraped)


class MetricsMiddleware:
    """Counts every request by interface and status, and times it (outermost layer)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            interface = interface_of(scope["path"])
            # 0: the client left before an answer began (or the app failed before one).
            self.metrics.requests.labels(interface, str(status or 0)).inc()
            self.metrics.duration.labels(interface).observe(time.perf_counter() - started)


class StockCollector(Collector):
    """Figures counted in the database at scrape time, cached for :data:`STOCK_TTL` s."""

    def __init__(
        self, db: Database, now: Callable[[], datetime], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._db = db
        self._now = now
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            now = self._clock()
            if self._cached is None or now - self._cached[0] >= STOCK_TTL:
                self._cached = (now, self._count())
            return iter(self._cached[1])

    def _count(self) -> list[Metric]:
        with self._db.read() as session:
            by_status = dict(
                session.execute(select(LicenseRow.status, func.count()).group_by(LicenseRow.status)).all()
            )

            def scalar(stmt: Any) -> float:
                return float(session.execute(stmt).scalar() or 0)

            machines = scalar(select(func.count()).select_from(Machine))
            leases = scalar(select(func.count()).select_from(Lease).where(Lease.expires_at > self._now()))
            outbox = dict(
                session.execute(
                    select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
                ).all()
            )
            blacklisted = scalar(select(func.count()).select_from(BlacklistEntryRow))
            hits = scalar(select(func.coalesce(func.sum(1 + BlacklistHit.suppressed), 0)))
            portal_users = scalar(select(func.count()).select_from(PortalUser))
        licenses = GaugeMetricFamily("tessera_licenses", "Licenses on file, by status.", labels=["status"])
        for status in ("active", "revoked"):
            licenses.add_metric([status], float(by_status.get(status, 0)))
        deliveries = GaugeMetricFamily(
            "tessera_webhook_deliveries", "Webhook deliveries in the outbox, by state.", labels=["state"]
        )
        for state in sorted({*DELIVERY_STATUSES, *outbox}):
            deliveries.add_metric([str(state)], float(outbox.get(state, 0)))
        return [
            licenses,
            GaugeMetricFamily(
                "tessera_machines", "Machines (installations) bound to licenses.", value=machines
            ),
            GaugeMetricFamily("tessera_leases", "Leases of user-bound licenses held now.", value=leases),
            deliveries,
            GaugeMetricFamily("tessera_blacklist_entries", "Blacklisted containers.", value=blacklisted),
            GaugeMetricFamily(
                "tessera_blacklist_hits", "Hits of blacklisted containers, every one counted.", value=hits
            ),
            GaugeMetricFamily("tessera_portal_users", "Web portal accounts.", value=portal_users),
        ]
