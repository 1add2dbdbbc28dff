"""A limit on how many refusals a server process writes down (:class:`RefusalLimit`)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime

from tessera.core.clock import utc

__all__ = ["RefusalLimit"]

log = logging.getLogger("tessera.server")


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: datetime
    suppressed: int = 0


class RefusalLimit:
    """How many refusals are written down, per license and in all.

    A recorded refusal costs an audit entry (hash-chained, append-only: it can never be
    pruned), a row and a webhook event, and the requests refused need little or no secret:
    a lease request only a license's serial (printed on its file) and a made-up user; an
    activation from a blacklisted container, or a recovery the rule denies, only a license
    key and a key pair the requester makes up. Without a limit anyone holding one could
    grow the audit log without bound. Each license may have ``burst`` refusals recorded at
    once and one more every ``60 / per_minute`` seconds; all licenses of this server
    process together ``total_burst`` and ``total_per_minute``. A refusal over either limit
    is answered as usual but not recorded; the next one recorded for that license says how
    many were not (``suppressed``), so every refusal is still counted, and a warning is
    logged, at most once a minute. Each server process has its own limit.
    """

    def __init__(
        self,
        *,
        burst: int = 20,
        per_minute: float = 12,
        total_burst: int = 100,
        total_per_minute: float = 60,
        what: str = "refusals",
    ) -> None:
        self._what = what
        self._burst, self._rate = burst, per_minute / 60
        self._total_burst, self._total_rate = total_burst, total_per_minute / 60
        self._licenses: dict[str, _Bucket] = {}
        self._total: _Bucket | None = None
        self._warned: datetime | None = None
        self._lock = threading.Lock()  # the lease route runs in the thread pool

    def admit(self, serial: str, now: datetime) -> int | None:
        """None if this refusal is not to be recorded; else how many refusals of ``serial``
        were not recorded since the last one that was."""
        with self._lock:
            if len(self._licenses) > 10_000:  # forget licenses whose allowance is whole again
                self._licenses = {
                    key: kept
                    for key, kept in self._licenses.items()
                    if kept.suppressed or self._refill(kept, now, self._burst, self._rate) < self._burst
                }
            bucket = self._licenses.get(serial)
            if bucket is None:
                bucket = self._licenses[serial] = _Bucket(float(self._burst), now)
            if self._total is None:
                self._total = _Bucket(float(self._total_burst), now)
            if (
                self._refill(bucket, now, self._burst, self._rate) < 1
                or self._refill(self._total, now, self._total_burst, self._total_rate) < 1
            ):
                if self._warned is None or abs((utc(now) - utc(self._warned)).total_seconds()) >= 60:
                    self._warned = now  # once a minute at most: the log must not flood either
                    log.warning(
                        "%s arrive faster than they are recorded (license %s); the"
                        " next one recorded of a license counts those left out",
                        self._what,
                        serial,
                    )
                bucket.suppressed += 1
                return None
            bucket.tokens -= 1
            self._total.tokens -= 1
            suppressed, bucket.suppressed = bucket.suppressed, 0
            return suppressed

    @staticmethod
    def _refill(bucket: _Bucket, now: datetime, burst: int, rate: float) -> float:
        elapsed = (utc(now) - utc(bucket.at)).total_seconds()
        if elapsed > 0:  # a clock set back refills nothing
            bucket.tokens = min(float(burst), bucket.tokens + elapsed * rate)
            bucket.at = now
        return bucket.tokens
