"""The online activation path: every rule of :func:`tessera.server.activation.activate`,
without the ORM.

An activation locks its license, reads the license's content, the blacklist and the bound
machines, writes one machine row, one audit entry and maybe a webhook, and signs two
documents. Through the ORM that cost about 5 ms of server CPU, most of it the ORM's own
work (identity map, eager loaders, unit of work, a session per request), not the
database's. Here the same statements, built once at import from the models, run on a plain
DB-API connection (:mod:`tessera.server.rawsql`); the rules themselves are the functions
:mod:`tessera.server.activation` uses too, so the two paths cannot disagree on one.

Recovery requests (``/api/v1/recover``) and offline activations keep the ORM path
(:func:`tessera.server.activation.activate`, :func:`~tessera.server.activation.activate_offline`):
they are rare, and a recovery's bookkeeping lives in :mod:`tessera.server.recovery`.

Concurrency is the ORM path's: the license row is locked first, in a statement of its
own (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` holds the whole
database), and everything that depends on other activations (entitlements, blacklist,
bound machines) is read by a later statement, which on PostgreSQL sees what the previous
holder of the lock committed. ``(license_id, slot)`` stays unique as the second line.
The activations that queue together run in one transaction, which decides them one after
the other on what it read, as separate transactions in that order would; on PostgreSQL
it locks all their licenses in one statement, in id order (two processes' batches wait
for each other, never deadlock).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Final, NamedTuple

from sqlalchemy import (
    Date,
    DateTime,
    Integer,
    String,
    any_,
    bindparam,
    cast,
    false,
    insert,
    literal_column,
    null,
    select,
    union_all,
    update,
)
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.sql.elements import ClauseElement, ColumnElement
from sqlalchemy.sql.selectable import Select

from tessera.core.clock import utc
from tessera.core.fingerprint import LockingId
from tessera.core.licensekey import license_key_digest
from tessera.core.model import MatchLevel
from tessera.core.protocol import ActivationRequest
from tessera.core.signing import SigningKey
from tessera.server import audit, webhooks
from tessera.server.activation import (
    activation_response,
    blacklist_refusal,
    blacklisted,
    check_product,
    check_usable,
    first_same_hardware,
    free_slot,
    no_free_machine,
    other_hardware,
    same_hardware,
    signed_files,
)
from tessera.server.errors import NotFound, ServiceError
from tessera.server.models import (
    BlacklistEntryRow,
    Customer,
    EntitlementRow,
    LicenseRow,
    Machine,
    Product,
    WebhookEndpoint,
    format_licensee,
    parse_emergency,
)
from tessera.server.rawsql import (
    Broken,
    Busy,
    RawTransaction,
    array_literal,
    pipelining,
    text_array,
    transaction,
    unnest_arrays,
)
from tessera.server.storage import Database
from tessera.server.writer import Job, gather_turn, release_connection, settle, take_batch

_Job = Job[ActivationRequest]

__all__ = ["ActivationWriter"]

log = logging.getLogger("tessera.server")

#: Activations in one transaction at most (:func:`_activate_batch`): bounds how long one
#: batch holds its licenses' locks (SQLite: the whole database).
MAX_BATCH = 64
#: SQLite: after this many activations committed on the event loop (whose connection does
#: not checkpoint), the writer thread checkpoints the WAL.
CHECKPOINT_EVERY = 64
_STOP: Final = object()
_CHECKPOINT: Final = object()

# Built once: constructing SQL per request costs more than running it.
LICENSE_FOR_ACTIVATION = (
    select(
        LicenseRow.id,
        LicenseRow.serial,
        LicenseRow.status,
        LicenseRow.revision,
        LicenseRow.version_range,
        LicenseRow.binding,
        LicenseRow.match_level,
        LicenseRow.machines_allowed,
        LicenseRow.connect,
        LicenseRow.validation_hours,
        LicenseRow.failover_days,
        LicenseRow.checkpoint_days,
        LicenseRow.emergency,
        LicenseRow.recovery_allowance,
        LicenseRow.recovery_interval_days,
        LicenseRow.sealed,
        Customer.name,
        Customer.city,
        Product.code,
    )
    .join(Customer, Customer.id == LicenseRow.customer_id)
    .join(Product, Product.id == LicenseRow.product_id)
    .where(LicenseRow.key_digest == bindparam("digest"))
    .with_for_update(of=LicenseRow)
)
#: PostgreSQL's batches: the licenses of all the batch's keys, locked in id order (so two
#: processes' batches, each locking several, never deadlock each other); the digest first.
LICENSES_FOR_ACTIVATION = (
    select(LicenseRow.key_digest, *LICENSE_FOR_ACTIVATION.selected_columns)
    .join(Customer, Customer.id == LicenseRow.customer_id)
    .join(Product, Product.id == LicenseRow.product_id)
    .where(LicenseRow.key_digest == any_(text_array("digests", String())))
    .order_by(LicenseRow.id)
    .with_for_update(of=LicenseRow)
)
# Everything an activation reads once its license is locked, in one statement: on
# PostgreSQL each statement is a round trip (about 60 us of server CPU each, measured),
# and these four were four. Each row is (part, lid, a, b, c, d, n, m, day); the database
# sorts by (part, lid, a, b, n), which puts entitlements in LicenseRow.entitlements' order
# (location, feature), machines by slot and endpoints by id, each license's together.
_ENTITLEMENT, _MACHINE, _CONTAINER, _ENDPOINT = range(4)
_TEXT, _NUMBER, _DAY = cast(null(), String), cast(null(), Integer), cast(null(), Date)


def _part(
    number: int,
    lid: Any = _NUMBER,
    a: Any = _TEXT,
    b: Any = _TEXT,
    c: Any = _TEXT,
    d: Any = _TEXT,
    n: Any = _NUMBER,
    m: Any = _NUMBER,
    day: Any = _DAY,
) -> Select[Any]:
    columns = {"lid": lid, "a": a, "b": b, "c": c, "d": d, "n": n, "m": m, "day": day}
    part = literal_column(str(number), Integer).label("part")
    return select(part, *(column.label(name) for name, column in columns.items()))


def _after_lock(licensed: Callable[[Any], ColumnElement[bool]]) -> ClauseElement:
    """What the activations read once their licenses are locked; ``licensed(column)`` says
    which licenses' rows (one, or the batch's)."""
    return union_all(
        _part(
            _ENTITLEMENT,
            lid=EntitlementRow.license_id,
            a=EntitlementRow.location,
            b=EntitlementRow.feature,
            n=EntitlementRow.count,
            day=EntitlementRow.expiry,
        ).where(licensed(EntitlementRow.license_id)),
        _part(
            _MACHINE,
            lid=Machine.license_id,
            c=Machine.locking_id,
            d=Machine.system_id,
            n=Machine.slot,
            m=Machine.id,
        ).where(licensed(Machine.license_id)),
        _part(_CONTAINER, c=BlacklistEntryRow.locking_id).where(BlacklistEntryRow.scope == "container"),
        _part(_ENDPOINT, c=WebhookEndpoint.events, n=WebhookEndpoint.id).where(
            WebhookEndpoint.active.is_(True)
        ),
    ).order_by("part", "lid", "a", "b", "n")


AFTER_LOCK = _after_lock(lambda column: column == bindparam("license_id"))
#: PostgreSQL's batches: the same for every license the batch locked.
AFTER_LOCK_MANY = _after_lock(lambda column: column == any_(text_array("license_ids", Integer())))
#: What an activation writes into a machine slot, new or taken again.
_BOUND: Final = {
    "locking_id": bindparam("locking_id"),
    "system_id": bindparam("system_id"),
    "agent_key": bindparam("agent_key"),
    "activated_at": bindparam("now"),
    "delivered_revision": bindparam("revision"),
    "offline": False,
}
BIND_NEW = (
    insert(Machine).values(license_id=bindparam("license_id"), slot=bindparam("slot"), **_BOUND).inline()
)
REBIND = update(Machine).where(Machine.id == bindparam("machine_id")).values(**_BOUND)
#: PostgreSQL: a batch's new machines as one statement over arrays (in the batch's order).
_NEW_COLUMNS: Final = (
    "license_id", "slot", "locking_id", "system_id", "agent_key", "activated_at", "delivered_revision",
)  # fmt: skip
_NEW = unnest_arrays(
    "bound",
    ("license_id", Integer()),
    ("slot", Integer()),
    ("locking_id", String()),
    ("system_id", String()),
    ("agent_key", String()),
    ("activated_at", DateTime(timezone=True)),
    ("delivered_revision", Integer()),
    ordinality="n",
)
BIND_NEW_MANY = insert(Machine).from_select(
    [*_NEW_COLUMNS, "offline"],
    select(*(_NEW.c[name] for name in _NEW_COLUMNS), false()).order_by(_NEW.c.n),
)


@dataclass(frozen=True, slots=True)
class _Entitlement:  # not a named tuple: ``count`` would shadow tuple.count
    location: str
    feature: str
    count: int
    expiry: date | None


class _License(NamedTuple):
    """The license as one activation needs it (a :class:`~tessera.server.licenses.LicenseContent`);
    a named tuple because it is made from a row on every activation."""

    id: int
    serial: str
    status: str
    revision: int
    version_range: str
    binding: str
    match_level: str
    machines_allowed: int
    connect: bool
    validation_hours: int
    failover_days: int
    checkpoint_days: int | None
    emergency: str
    recovery_allowance: int | None
    recovery_interval_days: int | None
    sealed: bool
    customer_name: str
    customer_city: str | None
    product_code: str
    entitlements: Sequence[_Entitlement]

    @property
    def licensee(self) -> str:
        return format_licensee(self.customer_name, self.customer_city)

    @property
    def emergency_features(self) -> tuple[str, ...]:
        return parse_emergency(self.emergency)


class _Held:
    """A license locked by this transaction, as its activations see it: its content and
    its bound machines (id, slot, locking id, system id) by slot, which the activations of
    a batch update as they bind (a machine bound by this batch has no id yet: None)."""

    __slots__ = ("bound", "row")

    def __init__(self, row: _License, bound: list[_Bound]) -> None:
        self.row = row
        self.bound = bound


#: A bound machine as the slot scan sees it: (id, slot, locking id, system id).
_Bound = tuple[int | None, int, str, str]


class _Later(Exception):
    """The activation would take again a machine this batch bound (no id yet): it runs in
    the next batch, which sees that machine as a sequence of activations would."""


def _read(
    locked: Sequence[Sequence[Any]], reads: Sequence[Sequence[Any]]
) -> tuple[dict[int, _Held], list[str], list[tuple[int, str]]]:
    """The locked licenses (rows of ``LICENSE_FOR_ACTIVATION``, by id) with what was read
    after the lock (rows of ``AFTER_LOCK``: (part, lid, a, b, c, d, n, m, day)); the
    blacklisted containers; the active webhook endpoints (id, events)."""
    entitlements: dict[int, list[_Entitlement]] = {}
    machines: dict[int, list[_Bound]] = {}
    containers: list[str] = []
    endpoints: list[tuple[int, str]] = []
    for read in reads:
        part = read[0]
        if part == _ENTITLEMENT:
            entitlements.setdefault(read[1], []).append(_Entitlement(read[2], read[3], read[6], read[8]))
        elif part == _MACHINE:
            machines.setdefault(read[1], []).append((read[7], read[6], read[4], read[5]))
        elif part == _CONTAINER:
            containers.append(read[4])
        else:
            endpoints.append((read[6], read[4]))
    held = {
        found[0]: _Held(_License._make((*found, entitlements.get(found[0], []))), machines.get(found[0], []))
        for found in locked
    }
    return held, containers, endpoints


def _bind(
    held: _Held, containers: Sequence[str], request: ActivationRequest, now: datetime
) -> tuple[int | None, int, str]:
    """Every rule of an online activation, nothing written: the machine to take again (its
    id) or None for a new one, its slot, and the audit action; else the refusal raised."""
    row = held.row
    check_product(request, row.product_code)
    level = MatchLevel(row.match_level)
    if blacklisted(containers, request.locking_id, level):
        raise blacklist_refusal(row.serial, request.locking_id, now)
    check_usable(row, now)
    # The same installation again, else the same hardware (tolerant match), lowest slot
    # first as the ORM path scans.
    bound = held.bound
    machine = next((m for m in bound if m[3] == request.system_id), None)
    current = LockingId.parse(request.locking_id)
    if machine is not None:
        machine_id, slot, locking_id, _ = machine
        if row.binding == "machine" and not same_hardware(locking_id, current, level):
            raise other_hardware(row.serial)
    else:
        # An instance is its installation, not its hardware: two instances may share a machine.
        same = (
            None if row.binding == "instance" else first_same_hardware((m[2] for m in bound), current, level)
        )
        if same is None:
            free = free_slot((m[1] for m in bound), row.machines_allowed)
            if free is None:
                raise no_free_machine(row.serial, len(bound), row.machines_allowed)
            return None, free, "license.activate"
        machine_id, slot, _, _ = bound[same]
    if machine_id is None:
        raise _Later
    return machine_id, slot, "license.reactivate"


def _write(
    tx: RawTransaction,
    held: _Held,
    endpoints: Sequence[tuple[int, str]],
    request: ActivationRequest,
    now: datetime,
    binding: tuple[int | None, int, str],
    signing_key: SigningKey,
    pepper: bytes,
    new_machines: list[dict[str, Any]],
) -> tuple[bytes, dict[str, Any]]:
    """Bind as ``binding`` says (a machine taken again at once, a new one's row added to
    ``new_machines`` for :func:`_bind_new`, maybe a webhook, ``held`` updated): the signed
    response, and the audit entry still to append (last, see :func:`_activate_batch`)."""
    machine_id, slot, action = binding
    row = held.row
    bound_as = {
        "locking_id": request.locking_id,
        "system_id": request.system_id,
        "agent_key": request.agent_key,
        "now": now,
        "revision": row.revision,
    }
    # What may fail comes before the first write: a batch goes on without this one.
    license_file, identity_file = signed_files(row, slot, request, now, signing_key)
    response = activation_response(request, now, row.serial, license_file, identity_file, pepper)
    signed = response.signed_json(signing_key)
    taken = (machine_id, slot, request.locking_id, request.system_id)
    if machine_id is None:
        new_machines.append({"license_id": row.id, "slot": slot, **bound_as})  # written together
        bisect.insort(held.bound, taken, key=lambda m: m[1])
    else:
        tx.run(REBIND, machine_id=machine_id, **bound_as)
        held.bound[:] = [taken if m[0] == machine_id else m for m in held.bound]
    if action == "license.activate":
        webhooks.emit_raw(
            tx,
            endpoints,
            "license.activated",
            {"serial": row.serial, "slot": slot, "locking_id": request.locking_id, "offline": False},
            now,
        )
    entry = {
        "at": now,
        "actor": f"agent:{request.system_id}",
        "action": action,
        "target": row.serial,
        "details": {
            "slot": slot,
            "locking_id": request.locking_id,
            "system_id": request.system_id,
            "offline": False,
            "revision": row.revision,
        },
    }
    return signed, entry


def _activate_batch(
    tx: RawTransaction,
    batch: Sequence[tuple[ActivationRequest, datetime]],
    signing_key: SigningKey,
    pepper: bytes,
) -> list[bytes | BaseException | _Later]:
    """The activations of ``batch`` (each a request and its time) in one transaction, as
    if one ran after the other in this order: each one's signed response (valid once
    committed), refusal, error, or :class:`_Later` (never the first's).

    On PostgreSQL four round trips whatever the batch's size, where each activation alone
    made four: the lock of every license the batch names (in id order, one statement),
    the read after it, the audit chain's head, the end. On SQLite one commit, and each
    license read once, for the batch. A refusal writes nothing, so it does not touch
    the others. An activation that would take again a machine this batch bound waits for
    the next batch, and so do the activations of its license after it: each license's
    activations stay in their order, so every answer is what the activations one after
    the other in that order would get (only the audit log, like the commits, has the
    waiting ones after the rest).
    """
    digests = [license_key_digest(request.license_key, pepper) for request, _ in batch]
    if tx.is_postgresql:
        locked = tx.all(LICENSES_FOR_ACTIVATION, digests=array_literal(set(digests)))
        reads = (
            tx.all(AFTER_LOCK_MANY, license_ids=array_literal(found[1] for found in locked)) if locked else []
        )
    else:  # the transaction holds the whole database; each statement runs in process
        locked, reads = [], []
        for digest in dict.fromkeys(digests):
            found = tx.one(LICENSE_FOR_ACTIVATION, digest=digest)
            if found is not None:
                # the blacklist and the endpoints once, with the first license
                first = not locked
                locked.append((digest, *found))
                reads += (r for r in tx.all(AFTER_LOCK, license_id=found[0]) if first or r[0] < _CONTAINER)
    by_digest = {found[0]: found[1] for found in locked}
    held, containers, endpoints = _read([found[1:] for found in locked], reads)
    outcomes: list[bytes | BaseException | _Later] = []
    entries: list[dict[str, Any]] = []
    new_machines: list[dict[str, Any]] = []
    waiting: set[int] = set()  # licenses with an activation left for the next batch
    for (request, now), digest in zip(batch, digests, strict=True):
        license_id = by_digest.get(digest)
        try:
            if license_id is None:
                raise NotFound("unknown license key")
            if license_id in waiting:  # keeps each license's activations in their order
                raise _Later
            license_ = held[license_id]
            binding = _bind(license_, containers, request, now)
            response, entry = _write(
                tx, license_, endpoints, request, now, binding, signing_key, pepper, new_machines
            )
        except _Later as later:
            waiting.add(license_id)  # type: ignore[arg-type]  # only a known license waits
            outcomes.append(later)
            continue
        except ServiceError as exc:
            outcomes.append(exc)
            continue
        outcomes.append(response)
        entries.append(entry)
    _bind_new(tx, new_machines)
    if entries:
        # Last: on PostgreSQL the audit chain's lock is then held only until the commit.
        audit.append_raw(tx, entries)
    return outcomes


def _bind_new(tx: RawTransaction, rows: list[dict[str, Any]]) -> None:
    """The batch's new machines: on PostgreSQL one statement over arrays (each statement of
    a pipeline costs the writer thread a send and a wait for the GIL), on SQLite a statement
    each (in process). A slot or installation taken twice fails the batch here, before its
    commit, as it would have at its own statement."""
    if not rows:
        return
    if not tx.is_postgresql:
        for row in rows:
            tx.run(BIND_NEW, **row)
        return
    tx.run(
        BIND_NEW_MANY,
        license_id=array_literal(row["license_id"] for row in rows),
        slot=array_literal(row["slot"] for row in rows),
        locking_id=array_literal(row["locking_id"] for row in rows),
        system_id=array_literal(row["system_id"] for row in rows),
        agent_key=array_literal(row["agent_key"] for row in rows),
        activated_at=array_literal(utc(row["now"]).isoformat() for row in rows),
        delivered_revision=array_literal(row["revision"] for row in rows),
    )


class ActivationWriter:
    """The online activations of one server process: on the event loop or one writer thread.

    The activations that queue together run in one transaction (:func:`_activate_batch`:
    one commit, each license read once, the audit chain's head read once), on a
    connection kept for the purpose (no pool checkout, no ``pre_ping`` round trip on
    PostgreSQL); a batch that fails runs each activation alone, as a batch of one.
    Through the general thread pool each activation paid a hop of its own and, with many
    requests in flight, most of them queued on SQLite's write lock inside pool threads
    that kept waking each other: about as much server CPU as the activation itself.

    SQLite: the activations of one turn of the event loop run right there when the write
    lock (this process's and the file's) is free that instant, as check-ins do
    (``checkins.py``); the database work is a few hundred microseconds the GIL serializes
    anyway, and handing it to a thread and back cost 15-25 % of the activation's CPU. The
    loop never waits: with the lock taken, the activations go to the writer thread, which
    waits for its turn. The loop's connection does not checkpoint the WAL (a checkpoint
    writes and syncs the database file); the writer thread does that every
    :data:`CHECKPOINT_EVERY` activations on the loop. One transaction per turn instead of
    one per activation (16 clients, licenses of 50 seats): server CPU per activation
    0.81-0.91 -> 0.63-0.72 ms, p99 25 -> 12-19 ms.

    PostgreSQL: always the writer thread, which runs everything it took at once in one
    transaction (four round trips for the batch where each activation made four; server
    CPU per activation 1.3 -> 0.8-0.9 ms, PostgreSQL's 480 -> 250-280 us, 16 clients) and
    hands the answers back to the loop together. One thread: every activation ends in the
    audit chain's lock, so activations of one process hardly overlap anyway, and more
    threads only fought over the GIL (measured with 16 clients before batches: one thread
    1.7 ms of server CPU per activation and 395/s, two 2.2 ms and 338/s, three 2.7 ms and
    281/s).
    """

    def __init__(self, db: Database, signing_key: SigningKey, pepper: bytes) -> None:
        self._db = db
        self._signing_key = signing_key
        self._pepper = pepper
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._connection: Any = None  # the writer thread's own
        self._loop_connection: Any = None  # SQLite: the event loop's own
        self._loop_activations = 0
        #: SQLite: the activations that arrived in one turn of each event loop.
        self._pending: dict[asyncio.AbstractEventLoop, list[_Job]] = {}

    async def activate(self, request: ActivationRequest, now: datetime) -> bytes:
        """The signed response (committed), or the refusal or database error raised.

        A :class:`~tessera.server.errors.RecordedRefusal` is raised with its record not yet
        written (its transaction was rolled back): the caller writes it.
        """
        loop = asyncio.get_running_loop()
        job = _Job(request, now, loop.create_future(), loop)
        if self._db.is_sqlite:
            gather_turn(self._pending, job, self._flush)
        else:
            self._hand_over(job)
        return await job.future

    def stop(self) -> None:
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout=15)
        self._discard_loop_connection(broken=False)

    # ------------------------------------------------------------------ on the event loop

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """SQLite: this turn's activations right here, in one transaction, if the write
        lock is free *now*; else on the writer thread, which waits for it."""
        batch = self._pending.pop(loop)
        for start in range(0, len(batch), MAX_BATCH):
            part = batch[start : start + MAX_BATCH]
            try:
                self._run_batch(part, on_loop=True)
            except Exception as exc:  # a bug: these fail (500) rather than wait forever
                log.exception("activation batch failed")
                unsettled = [job for job in part if not job.future.done()]
                settle(unsettled, [exc] * len(unsettled), on_loop=True)

    def _loop_connect(self) -> Any:
        if self._loop_connection is None:
            try:
                connection = self._db.engine.raw_connection()
            except self._db.engine.dialect.loaded_dbapi.Error as exc:
                raise RawTransaction(None, None, self._db.engine.dialect).wrapped(exc) from exc
            connection.detach()  # its settings below must not reach the pool's other users
            cursor = connection.cursor()
            cursor.execute("PRAGMA busy_timeout=0")  # a lock held elsewhere: Busy at once
            cursor.execute("PRAGMA wal_autocheckpoint=0")
            cursor.close()
            self._loop_connection = connection
        return self._loop_connection

    def _discard_loop_connection(self, *, broken: bool = True) -> None:
        connection, self._loop_connection = self._loop_connection, None
        release_connection(connection, broken=broken)

    # ------------------------------------------------------------------ the writer thread

    def _hand_over(self, job: _Job | object) -> None:
        self._ensure_started()
        self._queue.put(job)

    def _ensure_started(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="tessera-activations", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                taken, stop = take_batch(self._queue, first, MAX_BATCH, _STOP)
                if _CHECKPOINT in taken:
                    self._checkpoint()
                batch = [job for job in taken if isinstance(job, Job)]
                try:
                    self._run_batch(batch)
                except Exception as exc:  # a bug: these fail (500), the thread goes on
                    log.exception("activation batch failed")
                    settle(batch, [exc] * len(batch))  # (settled ones are skipped on the loop)
                if stop:
                    return
        finally:
            self._discard(broken=False)

    def _run_batch(self, batch: list[_Job], *, on_loop: bool = False) -> None:
        """``batch`` in transactions of several activations, on the writer thread or
        (SQLite) ``on_loop``; every job settled there, or handed to the writer thread.

        An activation that would take again a machine its batch bound runs in the next
        transaction, with the rest of such; each transaction settles at least its first.
        On the loop, a write lock taken elsewhere, or a transaction that failed before its
        commit, hands what is left to the writer thread, which waits for the lock and runs
        each activation alone if the batch fails again.
        """
        while batch:
            try:
                outcomes = self._batch_once(batch, on_loop=on_loop)
            except Busy:
                for job in batch:
                    self._hand_over(job)
                return
            done = [(job, o) for job, o in zip(batch, outcomes, strict=True) if not isinstance(o, _Later)]
            settle([job for job, _ in done], [o for _, o in done], on_loop=on_loop)
            if on_loop:
                before, self._loop_activations = self._loop_activations, self._loop_activations + len(done)
                if before // CHECKPOINT_EVERY != self._loop_activations // CHECKPOINT_EVERY:
                    self._hand_over(_CHECKPOINT)
            batch = [job for job, o in zip(batch, outcomes, strict=True) if isinstance(o, _Later)]

    def _batch_once(self, batch: list[_Job], *, on_loop: bool) -> Sequence[bytes | BaseException | _Later]:
        """``batch`` in one transaction (:func:`_activate_batch`): each job's outcome;
        :class:`~tessera.server.rawsql.Busy` before any work ``on_loop`` if the lock is
        taken (or if the batch failed there, see :meth:`_run_batch`).

        A kept connection may have died since its last use (database restarted, network
        cut): if the batch failed because of that before its commit was sent, it runs once
        more on a new connection, as the pool's ``pre_ping`` would have spared it. If one
        activation may have failed the transaction before its commit (a constraint, a
        trigger, a bug), nothing of it stays and each activation runs alone (a batch of
        one), so each gets its own answer or error. The
        database's own trouble (lost, locked too long: SQLAlchemy's ``OperationalError``)
        and a failed commit fail them all (after a commit that may have happened, running
        them again would record them twice; alone, each would wait out the same lock).
        """
        discard = self._discard_loop_connection if on_loop else self._discard
        for attempt in (1, 2):
            kept = (self._loop_connection if on_loop else self._connection) is not None
            try:
                connection = self._loop_connect() if on_loop else self._connect()
            except DBAPIError as exc:
                return [exc] * len(batch)
            try:
                # pipelined: PostgreSQL's kept connection (see _connect); SQLite ignores it
                with transaction(self._db, connection, wait=not on_loop, pipelined=True) as tx:
                    requests = [(job.request, job.now) for job in batch]
                    return _activate_batch(tx, requests, self._signing_key, self._pepper)
            except Busy:
                raise
            except Broken as broken:  # the connection is closed (a failed pipeline always)
                error: BaseException = broken.__cause__ or broken
                discard()
                gone = isinstance(error, DBAPIError) and error.connection_invalidated
            except DBAPIError as exc:
                error, gone = exc, exc.connection_invalidated
                if gone:
                    discard()
            except Exception as exc:  # SQLite: a bug, rolled back
                error, gone = exc, False
            if gone and kept and attempt == 1 and _before_commit(error):
                continue
            if gone or isinstance(error, OperationalError) or not _before_commit(error):
                return [error] * len(batch)  # the database's trouble, not an activation's
            if len(batch) == 1:
                if not isinstance(error, DBAPIError):
                    log.error("activation failed", exc_info=error)
                return [error]
            if not isinstance(error, DBAPIError):
                log.error("activation batch of %d failed; each runs alone", len(batch), exc_info=error)
            if on_loop:
                raise Busy  # the writer thread tries again, then each alone
            return [self._batch_once([job], on_loop=False)[0] for job in batch]
        raise AssertionError("unreachable")

    def _connect(self) -> Any:
        if self._connection is None:
            try:
                connection = self._db.engine.raw_connection()
                self._connection = connection if self._db.is_sqlite else pipelining(connection)
            except self._db.engine.dialect.loaded_dbapi.Error as exc:
                raise RawTransaction(None, None, self._db.engine.dialect).wrapped(exc) from exc
        return self._connection

    def _checkpoint(self) -> None:
        """Copy the WAL into the database file without waiting for anyone (``PASSIVE``)."""
        try:
            cursor = self._connect().cursor()
            cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
            cursor.close()
        except Exception as exc:  # the next commit of any other connection checkpoints too
            log.warning("WAL checkpoint failed: %s", exc)
            self._discard()

    def _discard(self, *, broken: bool = True) -> None:
        """Give up the thread's connection: invalidated if it may be broken, else closed."""
        connection, self._connection = self._connection, None
        release_connection(connection, broken=broken)


def _before_commit(error: BaseException) -> bool:
    """Did ``error`` happen before the commit was sent (so nothing can have been committed)?"""
    return not (isinstance(error, DBAPIError) and error.statement == "COMMIT")
