"""The agent's persistent state: one SQLite file plus the installation secret.

Why SQLite in WAL mode with ``synchronous=FULL``: every change is one transaction, so a
``kill -9`` or a power cut at any moment leaves either the old or the new state, never a
mix, and a full disk makes the transaction fail as a whole (the old state stays). Readers
in other processes (``tessera agent status`` while the product runs) never block writers.

The *installation secret* (``installation.key``, 32 random bytes, mode 0600) lives beside
the database, not in it (``state.sealed`` beside both: :data:`MARKER_NAME`). Keys derived
from it encrypt the agent's private key at rest and the ``--with-license`` backups. What
that protects against: a copy of the database alone (support bundle, a leaked backup, a
file-level sync of ``state.db``) does not reveal the agent key, and a with-license backup
restores only into the installation that wrote it. It does not protect against someone
who can read the whole state directory on this machine (root): nothing that runs
unattended can.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tessera.agent.errors import NotInstalled, SeatError, StateError
from tessera.core.protocol import new_system_id

__all__ = ["DB_NAME", "MARKER_NAME", "PROTECTED", "SEAL_NAME", "SECRET_NAME", "SeatRow", "StateStore"]

DB_NAME = "state.db"
SECRET_NAME = "installation.key"
#: 2: the security-relevant meta values carry a MAC (``state_mac``); 1: they did not
_SCHEMA_VERSION = "2"
SEAL_NAME = "state_mac"
#: Beside ``installation.key``: this installation's state has been sealed. A state that
#: looks unsealed (schema 1, no ``state_mac``) is then an edit, not an older agent's state
#: to seal as it is. Its content is a MAC keyed from the secret, so a marker left over from
#: another installation key counts for nothing.
MARKER_NAME = "state.sealed"
#: The meta values that decide what the agent grants or refuses: an edit to any of them
#: (including deleting one) breaks the seal. The license text itself is covered by its
#: vendor signature and ``license_sha256``.
PROTECTED = (
    "locked",
    "last_success",
    "last_failure",
    "failover_since",
    "high_water",
    "grace_start",
    "installed_at",
    "license_serial",
    "license_revision",
    "license_sha256",
    "revoked",
    "revoked_serial",
    "blacklist_sequence",
    "system_id",
    "awaiting_restore",
)
#: set when a directory that lost its state.db is opened to restore a backup: until a
#: with-license restore succeeds the directory is still "lost", never a fresh installation
AWAITING_RESTORE = "awaiting_restore"
_BUSY_TIMEOUT_MS = 15_000
#: below this much free space an I/O error from SQLite is taken to mean "disk full"
_LOW_SPACE = 64 * 1024


@dataclass(frozen=True, slots=True)
class SeatRow:
    feature: str
    subject: str
    assigned_at: str


def _disk_full(where: Path) -> bool:
    try:
        return shutil.disk_usage(where).free < _LOW_SPACE
    except OSError:
        return False


def _explain(exc: BaseException, where: Path) -> str:
    text = str(exc).lower()
    name = getattr(exc, "sqlite_errorname", "") or ""
    # SQLite says only "disk I/O error" when it cannot grow state.db-shm (the WAL index
    # every reader needs), which on a full disk makes even `status` fail: name the cause.
    if name == "SQLITE_IOERR_SHMSIZE" or (name.startswith("SQLITE_IOERR") and _disk_full(where)):
        return (
            f"the disk holding {where} is full (no space left for the state's index file "
            f"{DB_NAME}-shm), so the agent state cannot be read; free some space"
        )
    if "readonly" in text or "read-only" in text or isinstance(exc, PermissionError):
        return f"the agent state directory {where} is read-only; nothing was changed"
    if "disk is full" in text or "no space" in text or getattr(exc, "errno", None) == 28:
        return f"the disk holding {where} is full; nothing was changed"
    if "locked" in text or "busy" in text:
        return f"the agent state in {where} is locked by another process; try again"
    if "unable to open" in text:
        return f"cannot open the agent state in {where} (missing or not writable)"
    if "malformed" in text or "not a database" in text:
        return f"the agent state file {where / DB_NAME} is damaged; restore a backup"
    return f"agent state in {where}: {exc}"


class StateStore:
    """Transactions over ``state.db``; every method is one transaction and thread-safe."""

    def __init__(self, state_dir: Path, *, restoring: bool = False, create: bool = True) -> None:
        self.state_dir = Path(state_dir)
        self._lock = threading.RLock()
        if not create and self._not_installed():
            raise NotInstalled(self.state_dir)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(_explain(exc, self.state_dir)) from None
        if not os.access(self.state_dir, os.W_OK):
            raise StateError(
                f"the agent state directory {self.state_dir} is read-only; the agent needs to "
                "write there (make it writable, or pass another --state-dir)"
            )
        db_path = self.state_dir / DB_NAME
        fresh = not db_path.exists()
        lost = self._state_lost(db_path)
        if lost and not restoring:
            raise StateError(self._lost_message())
        self.secret = self._load_or_make_secret(fresh or lost)
        marked = self._marked()
        try:
            self._db = sqlite3.connect(
                db_path,
                timeout=_BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            with self._tx() as db:
                db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS seats (feature TEXT NOT NULL,"
                    " subject TEXT NOT NULL, assigned_at TEXT NOT NULL,"
                    " PRIMARY KEY (feature, subject))"
                )
                db.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema', ?), ('system_id', ?)",
                    (_SCHEMA_VERSION, new_system_id()),
                )
                if lost:
                    db.execute("INSERT OR REPLACE INTO meta VALUES (?, '1')", (AWAITING_RESTORE,))
                self._migrate(db, marked)
                awaiting = db.execute("SELECT 1 FROM meta WHERE name = ?", (AWAITING_RESTORE,)).fetchone()
                sealed = self.seal_ok(self._meta(db))
            check = self._db.execute("PRAGMA quick_check").fetchone()
            if sealed and not marked:
                self._mark()
        except sqlite3.Error as exc:
            self._close_quietly()
            if fresh or lost or not self._can_read_frozen(exc, db_path):
                raise StateError(_explain(exc, self.state_dir)) from None
            check, awaiting = self._open_frozen(db_path, _explain(exc, self.state_dir))
            self._frozen = (
                f"the disk holding {self.state_dir} is full: the agent state can be read but "
                "not changed; free some space"
            )
        if check is None or check[0] != "ok":
            self._close_quietly()
            raise StateError(f"the agent state file {db_path} is damaged; restore a backup")
        if awaiting and not restoring:
            self._close_quietly()
            raise StateError(self._lost_message())

    _frozen: str | None = None

    def _can_read_frozen(self, exc: sqlite3.Error, db_path: Path) -> bool:
        """On a full disk, may the state still be read without SQLite's shared memory?

        Only when everything is in ``state.db`` itself (no write-ahead log with content):
        then no other process is mid-write and an immutable read sees the whole state, so
        ``status`` and ``check`` keep working while every write reports the full disk.
        """
        if not _explain(exc, self.state_dir).startswith(f"the disk holding {self.state_dir} is full"):
            return False
        try:
            return (self.state_dir / f"{DB_NAME}-wal").stat().st_size == 0
        except FileNotFoundError:
            return True
        except OSError:
            return False

    def _open_frozen(self, db_path: Path, why: str) -> tuple[Any, Any]:
        try:
            self._db = sqlite3.connect(
                f"{db_path.absolute().as_uri()}?immutable=1",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
            )
            check = self._db.execute("PRAGMA quick_check").fetchone()
            awaiting = self._db.execute("SELECT 1 FROM meta WHERE name = ?", (AWAITING_RESTORE,)).fetchone()
        except sqlite3.Error:
            self._close_quietly()
            raise StateError(why) from None
        return check, awaiting

    def _not_installed(self) -> bool:
        """No installation here: the directory is missing, or holds neither ``state.db``
        nor ``installation.key``. Anything else (not a directory, unreadable, a lost
        ``state.db``) is left to the normal opening, which names the problem."""

        def missing(path: Path) -> bool | None:  # None: cannot tell
            try:
                os.stat(path)
            except FileNotFoundError:
                return True
            except OSError:
                return None
            return False

        here = missing(self.state_dir)
        if here is None or here:
            return bool(here)
        if not self.state_dir.is_dir():
            return False
        return all(missing(self.state_dir / name) is True for name in (DB_NAME, SECRET_NAME))

    def _state_lost(self, db_path: Path) -> bool:
        """``state.db`` missing or empty beside an existing installation secret.

        That is not a new installation but one whose state was lost or truncated: starting
        afresh would drop its license and grant the one-time grace period again.
        """
        if not (self.state_dir / SECRET_NAME).exists():
            return False
        try:
            return db_path.stat().st_size == 0
        except FileNotFoundError:
            return True
        except OSError:
            return False

    def _lost_message(self) -> str:
        return (
            f"the agent state file {self.state_dir / DB_NAME} is missing or empty while "
            f"{self.state_dir / SECRET_NAME} is there: the state was lost or damaged; "
            "restore a --with-license backup made here (tessera agent restore FILE), or move "
            f"{self.state_dir} away to start a new installation"
        )

    # ------------------------------------------------------------------ seal

    def seal_of(self, meta: Mapping[str, str | None]) -> str:
        """HMAC over the protected values (absent ones too), keyed from the secret."""
        body = json.dumps({name: meta.get(name) for name in PROTECTED}, sort_keys=True)
        key = self.derive_key("state seal")
        return hmac.new(key, body.encode("utf-8"), hashlib.sha256).hexdigest()

    def seal_ok(self, meta: Mapping[str, str]) -> bool:
        """Do the protected values still carry the seal the agent wrote with them?"""
        stored = meta.get(SEAL_NAME)
        return stored is not None and hmac.compare_digest(stored, self.seal_of(meta))

    def _meta(self, db: sqlite3.Connection) -> dict[str, str]:
        return {str(k): str(v) for k, v in db.execute("SELECT name, value FROM meta").fetchall()}

    def _migrate(self, db: sqlite3.Connection, marked: bool) -> None:
        """A state written before the seal existed (schema 1) is sealed as it is, once; so
        is a new one. Where this installation has sealed its state before (``marked``),
        neither is done: a state made to look older or new (``schema`` set back to 1,
        ``state_mac`` and the rest deleted) stays unsealed, so the agent reports it as
        edited instead of sealing the edit. A state.db recreated for a restore is new."""
        meta = self._meta(db)
        if SEAL_NAME in meta:
            return
        if meta.get("schema") == "1":
            if marked:
                return
            db.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (_SCHEMA_VERSION,))
            meta["schema"] = _SCHEMA_VERSION
            db.execute("INSERT INTO meta VALUES (?, ?)", (SEAL_NAME, self.seal_of(meta)))
        elif set(meta) <= {"schema", "system_id", AWAITING_RESTORE}:
            if marked and AWAITING_RESTORE not in meta:
                return
            db.execute("INSERT INTO meta VALUES (?, ?)", (SEAL_NAME, self.seal_of(meta)))

    def _marker(self) -> bytes:
        key = self.derive_key("state seal marker")
        return hmac.new(key, b"sealed", hashlib.sha256).hexdigest().encode("ascii") + b"\n"

    def _marked(self) -> bool:
        """Has this installation (this secret) sealed its state before? An unreadable
        marker counts as there: it is never a reason to seal an unsealed state."""
        try:
            data = (self.state_dir / MARKER_NAME).read_bytes()
        except FileNotFoundError:
            return False
        except OSError:
            return True
        return hmac.compare_digest(data, self._marker())

    def _mark(self) -> None:
        """Write the marker (once the state carries a valid seal): atomically, and best
        effort, since the next open that finds the seal valid writes it again."""
        with suppress(OSError):
            _write_durably(self.state_dir / MARKER_NAME, self._marker())

    def _reseal(self, db: sqlite3.Connection, was_ok: bool) -> None:
        """Seal what a write left, unless the seal was broken before it.

        A write on a state whose seal is broken must not launder the edit (the agent writes
        the trusted-time mark on most reads): the seal stays broken until :meth:`reseal`.
        """
        if was_ok:
            meta = self._meta(db)
            db.execute(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                (SEAL_NAME, self.seal_of(meta)),
            )

    def reseal(self) -> None:
        """Accept the protected values as they are now (after a restore or a re-activation:
        every one of them was just written from a trusted source)."""
        try:
            with self._tx() as db:
                self._reseal(db, True)
        except sqlite3.Error as exc:
            raise self._wrap(exc) from None

    # ------------------------------------------------------------------ plumbing

    def _load_or_make_secret(self, fresh: bool) -> bytes:
        path = self.state_dir / SECRET_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if not fresh:
                raise StateError(
                    f"{path} is missing: this state directory was copied without its "
                    "installation secret; restore it, or start a new installation and "
                    "restore a --without-license backup"
                ) from None
            data = os.urandom(32)
            try:
                _write_durably(path, data)
            except OSError as exc:
                raise StateError(_explain(exc, self.state_dir)) from None
        except OSError as exc:
            raise StateError(_explain(exc, self.state_dir)) from None
        if len(data) != 32:
            raise StateError(f"{path} is damaged (expected 32 bytes)")
        return data

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: other processes wait instead of failing mid-way."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _close_quietly(self) -> None:
        with suppress(Exception):
            self._db.close()

    def close(self) -> None:
        with self._lock:
            self._close_quietly()

    def _wrap(self, exc: sqlite3.Error) -> StateError:
        if self._frozen is not None:  # opened read-only because the disk is full
            return StateError(f"{self._frozen}; nothing was changed")
        return StateError(_explain(exc, self.state_dir))

    def data_version(self) -> int:
        """Changes whenever *another* connection (another process) committed: cheap to poll."""
        try:
            with self._lock:
                row = self._db.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error as exc:
            raise self._wrap(exc) from None
        return int(row[0])

    # ------------------------------------------------------------------ meta values

    def get(self, name: str) -> str | None:
        return self.get_all().get(name)

    def get_all(self) -> dict[str, str]:
        try:
            with self._lock:
                rows = self._db.execute("SELECT name, value FROM meta").fetchall()
        except sqlite3.Error as exc:
            raise self._wrap(exc) from None
        return {str(k): str(v) for k, v in rows}

    def put(self, values: Mapping[str, str | None]) -> None:
        """Set (or, for ``None``, delete) several values in one transaction."""
        try:
            with self._tx() as db:
                was_ok = self.seal_ok(self._meta(db))
                for name, value in values.items():
                    if value is None:
                        db.execute("DELETE FROM meta WHERE name = ?", (name,))
                    else:
                        db.execute(
                            "INSERT INTO meta VALUES (?, ?)"
                            " ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                            (name, value),
                        )
                self._reseal(db, was_ok)
        except sqlite3.Error as exc:
            raise self._wrap(exc) from None

    # ------------------------------------------------------------------ seats

    def seats(self) -> list[SeatRow]:
        try:
            with self._lock:
                rows = self._db.execute(
                    "SELECT feature, subject, assigned_at FROM seats ORDER BY feature, assigned_at, subject"
                ).fetchall()
        except sqlite3.Error as exc:
            raise self._wrap(exc) from None
        return [SeatRow(str(f), str(s), str(a)) for f, s, a in rows]

    def add_seat(self, feature: str, subject: str, assigned_at: str, limit: int) -> bool:
        """Assign unless ``limit`` seats are taken; False when it was assigned already.

        The count and the insert share one IMMEDIATE transaction, so two processes
        assigning the last seat at once cannot both get it.
        """
        try:
            with self._tx() as db:
                if db.execute(
                    "SELECT 1 FROM seats WHERE feature = ? AND subject = ?", (feature, subject)
                ).fetchone():
                    return False
                (taken,) = db.execute("SELECT COUNT(*) FROM seats WHERE feature = ?", (feature,)).fetchone()
                if taken >= limit:
                    raise SeatError(f"all {limit} seat(s) of {feature} are assigned; unassign one first")
                db.execute("INSERT INTO seats VALUES (?, ?, ?)", (feature, subject, assigned_at))
                return True
        except sqlite3.Error as exc:
            raise self._wrap(exc) from None

    def remove_seat(self, feature: str, subject: str) -> bool:
        try:
            with self._tx() as db:
                cur = db.execute("DELETE FROM seats WHERE feature = ? AND subject = ?", (feature, subject))
                return cur.rowcount > 0
        except sqlite3.Error as exc:
            raise self._wrap(exc) from None

    def replace_everything(
        self,
        meta: Mapping[str, str] | None,
        seats: list[SeatRow],
        *,
        keep_meta: tuple[str, ...] = (),
    ) -> None:
        """Restore: swap meta values (unless ``meta`` is None) and all seats atomically."""
        try:
            with self._tx() as db:
                was_ok = self.seal_ok(self._meta(db))
                if meta is not None:
                    kept = {
                        k: v
                        for k, v in db.execute("SELECT name, value FROM meta").fetchall()
                        if k in keep_meta
                    }
                    db.execute("DELETE FROM meta")
                    for name, value in {**meta, **kept}.items():
                        if name != SEAL_NAME:
                            db.execute("INSERT INTO meta VALUES (?, ?)", (name, value))
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
                self._reseal(db, was_ok)
                db.execute("DELETE FROM seats")
                for row in seats:
                    db.execute(
                        "INSERT OR IGNORE INTO seats VALUES (?, ?, ?)",
                        (row.feature, row.subject, row.assigned_at),
                    )
        except sqlite3.Error as exc:
            raise self._wrap(exc) from None

    # ------------------------------------------------------------------ encryption at rest

    def derive_key(self, purpose: str) -> bytes:
        return HKDF(
            algorithm=hashes.SHA256(), length=32, salt=b"tessera-agent/1", info=purpose.encode()
        ).derive(self.secret)

    def encrypt(self, purpose: str, plaintext: bytes) -> str:
        nonce = os.urandom(12)
        blob = nonce + AESGCM(self.derive_key(purpose)).encrypt(nonce, plaintext, purpose.encode())
        return base64.b64encode(blob).decode("ascii")

    def decrypt(self, purpose: str, text: str) -> bytes:
        try:
            blob = base64.b64decode(text, validate=True)
            return AESGCM(self.derive_key(purpose)).decrypt(blob[:12], blob[12:], purpose.encode())
        except (InvalidTag, ValueError):
            raise StateError(
                f"cannot decrypt the {purpose}: it was written by another installation"
            ) from None


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``path`` (mode 0600) so that a crash leaves the old file or the new one, never
    half of one: a temporary file, fsynced, renamed over it, and the directory fsynced.
    The temporary file is removed when anything fails; the error is the caller's."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        with suppress(OSError):
            tmp.unlink()
        raise
