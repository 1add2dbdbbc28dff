"""Checkpoint licenses whose machines stopped checking in: tell the vendor, once.

A checkpoint license is valid on a machine only ``checkpoint_days`` past its last successful
check-in; the agent enforces that on its own. The vendor wants to know when it happens (a
customer who may be about to lose service, or an installation that went dark on purpose),
so a sweep in every server process emits ``checkpoint.overdue`` for each such machine. The
``checkpoint_overdue_at`` marker, set in the same transaction as the outbox row and cleared
by the next check-in, makes it once per lapse even with several processes sweeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from sqlalchemy import select, update
from starlette.concurrency import run_in_threadpool

from tessera.core.clock import Clock, utc
from tessera.server import webhooks
from tessera.server.models import LicenseRow, Machine
from tessera.server.storage import Database

__all__ = ["CheckpointWatch", "sweep"]

log = logging.getLogger("tessera.server.checkpoints")
BATCH = 500


def sweep(db: Database, now: datetime) -> int:
    """Emit ``checkpoint.overdue`` for every machine past its checkpoint; returns how many."""
    now = utc(now).replace(microsecond=0)
    due: list[int] = []
    after = 0
    while True:  # in pages by id, so machines not yet due never hide the due ones
        with db.read() as session:
            page = session.execute(
                select(
                    Machine.id,
                    Machine.last_checkin_at,
                    Machine.activated_at,
                    LicenseRow.checkpoint_days,
                )
                .join(LicenseRow, LicenseRow.id == Machine.license_id)
                .where(
                    Machine.id > after,
                    LicenseRow.checkpoint_days.is_not(None),
                    # Without connect there are no check-ins to wait for (issue and update
                    # refuse the pair; rows made before that remain).
                    LicenseRow.connect.is_(True),
                    LicenseRow.status == "active",
                    Machine.checkpoint_overdue_at.is_(None),
                )
                .order_by(Machine.id)
                .limit(BATCH)
            ).all()
        due.extend(
            row.id
            for row in page
            if utc(row.last_checkin_at or row.activated_at) + timedelta(days=row.checkpoint_days) < now
        )
        if len(page) < BATCH:
            break
        after = page[-1].id
    emitted = 0
    for machine_id in due:
        with db.write() as session:
            # Conditional: another process may have sent it (or a check-in came) meanwhile.
            claimed = session.execute(
                update(Machine)
                .where(Machine.id == machine_id, Machine.checkpoint_overdue_at.is_(None))
                .values(checkpoint_overdue_at=now)
                .execution_options(synchronize_session=False)
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                continue
            machine = session.get(Machine, machine_id)
            assert machine is not None
            row = session.get(LicenseRow, machine.license_id)
            assert row is not None
            last = utc(machine.last_checkin_at or machine.activated_at)
            webhooks.emit(
                session,
                "checkpoint.overdue",
                {
                    "serial": row.serial,
                    "locking_id": machine.locking_id,
                    "last_checkin": None if machine.last_checkin_at is None else last.isoformat(),
                    "checkpoint_days": row.checkpoint_days,
                    "overdue_since": (last + timedelta(days=row.checkpoint_days or 0)).isoformat(),
                },
                now,
            )
            emitted += 1
    return emitted


class CheckpointWatch:
    """Runs :func:`sweep` every ``interval`` seconds beside the requests."""

    def __init__(self, db: Database, clock: Clock, interval: float = 60.0) -> None:
        self._db = db
        self._clock = clock
        self._interval = interval
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await run_in_threadpool(sweep, self._db, self._clock.now())
            except Exception as exc:  # a database outage only delays the notice
                log.warning("checkpoint watch: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval)
