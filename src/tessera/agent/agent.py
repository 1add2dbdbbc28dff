"""The :class:`Agent`: one installation's licensing, from a state directory.

Reads (``check``) and writes (import, check-in, seats) are split: every write persists
first, then rebuilds an immutable :class:`~tessera.agent.policy.Snapshot` and swaps one
reference, so a reader sees either the old or the new state (hot update without restart)
and never takes a lock. Writers serialize on one lock per Agent and, across processes, on
SQLite's write lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from datetime import date, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx

from tessera.agent.connect import (
    ACTIVATE_PATH,
    CHECKIN_PATH,
    RECOVER_PATH,
    ConnectClient,
    check_server_url,
    pinned_ssl_context,
)
from tessera.agent.errors import (
    AgentError,
    BackupError,
    BadResponse,
    ConnectError,
    FeatureDenied,
    SeatError,
    ServerRefused,
    StaleBlacklist,
    StateError,
)
from tessera.agent.policy import Facts, Snapshot, decide
from tessera.agent.status import AgentState, AgentStatus, FeatureSeats
from tessera.agent.store import AWAITING_RESTORE, SeatRow, StateStore
from tessera.agent.verification import (
    Installation,
    VerifiedLicense,
    all_expired,
    verify_identity,
    verify_license,
)
from tessera.core.blacklist import parse_blacklist
from tessera.core.clock import Clock, SystemClock
from tessera.core.errors import (
    BindingError,
    FormatError,
    TesseraError,
    VerificationError,
    VersionError,
    clipped,
    shown,
)
from tessera.core.fileformat import format_timestamp, parse, parse_timestamp
from tessera.core.fingerprint import collect_facts, locking_id_for, match_locking_ids
from tessera.core.licensekey import normalize_license_key
from tessera.core.model import (
    Binding,
    Identity,
    License,
    MatchLevel,
    check_feature_code,
    check_product_code,
)
from tessera.core.protocol import (
    MAX_REVISION,
    ActivationRequest,
    CheckinRequest,
    ServerResponse,
    open_checkin_key,
)
from tessera.core.signing import Keyring, SigningKey
from tessera.core.verify import check_binding, check_pair
from tessera.core.versions import parse_version

__all__ = ["Agent"]

log = logging.getLogger("tessera.agent")

BACKUP_FORMAT = "tessera-agent-backup/1"
_MAX_SUBJECT = 200
_RETRY_AFTER_FAILURE = timedelta(minutes=15)
#: how often a started agent looks for changes written by other processes (seconds)
WATCH_INTERVAL = 1.0


#: The Locking ID salt of a generic agent that did not know its product when first opened.
DEFAULT_SALT = "tessera"


TAMPERED_MESSAGE = (
    "the agent state was edited outside the agent (its protected values no longer match "
    "their seal): nothing is granted; re-activate online (tessera agent activate), or move "
    "the state directory away and start a new installation"
)


def _ts(value: datetime) -> str:
    return format_timestamp(value)


def _parse_ts(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError:
        return None


def _held_revision(meta: Mapping[str, str | None]) -> int:
    """The revision of the license in force, for the check-in (0: none, or unreadable)."""
    value = meta.get("license_revision") or ""
    if not value.isascii() or not value.isdigit() or not 0 < int(value) <= MAX_REVISION:
        return 0
    return int(value)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_subject(subject: str) -> str:
    if (
        not isinstance(subject, str)
        or not subject
        or subject != subject.strip()
        or len(subject) > _MAX_SUBJECT
        or any(not ch.isprintable() for ch in subject)
    ):
        raise FormatError(f"invalid subject {shown(subject)} (1-{_MAX_SUBJECT} printable characters)")
    return subject


class Agent:
    """The license agent of one installation.

    ``check(feature)`` is a set lookup on verified in-memory state (no I/O, no signatures);
    everything else persists to ``state_dir`` before it takes effect. Thread-safe.
    ``locking_id`` and ``transport`` exist for tests and embedders; by default the Locking
    ID is this machine's, salted with ``product``.

    ``product=None`` is the generic agent of the ``tessera agent`` CLI: it adopts the product
    of the first license it accepts (and remembers it); ``product_version=None`` skips the
    version-range check, for an administrator's tool that does not know the running version.

    ``restoring=True`` is for :meth:`restore` only: it opens a directory whose ``state.db``
    was lost (``installation.key`` still there), which otherwise is refused so that a lost
    state never silently becomes a fresh, unlicensed installation with a new grace period.

    ``create=False`` is for tools that only look (``tessera agent status``): a directory
    that holds no installation raises :class:`NotInstalled` instead of being set up, so
    asking about a mistyped path leaves no new installation behind.
    """

    def __init__(
        self,
        state_dir: str | Path,
        keyring: Keyring,
        product: str | None,
        product_version: str | None,
        *,
        clock: Clock | None = None,
        locking_id: str | None = None,
        location: str | None = None,
        transport: httpx.BaseTransport | None = None,
        grace_features: tuple[str, ...] = (),
        blacklist: bytes | str | None = None,
        restoring: bool = False,
        create: bool = True,
    ) -> None:
        # Checked before anything is opened or written: a bad argument changes nothing.
        if isinstance(state_dir, str) and not state_dir.strip():
            raise FormatError("the agent state directory must be given (an empty path is refused)")
        if product is not None:
            try:
                check_product_code(product)
            except ValueError as exc:
                raise FormatError(str(exc)) from None
        if product_version is not None:
            _check_version(product_version)
        for code in grace_features:
            _valid_feature(code)
        self._grace_features = frozenset(grace_features)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._now_ts: Callable[[], float] = (
            time.time if isinstance(self._clock, SystemClock) else lambda: self._clock.now().timestamp()
        )
        self._transport = transport
        self._write_lock = threading.RLock()
        self._store = StateStore(Path(state_dir), restoring=restoring, create=create)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        meta = self._store.get_all()
        stored_product = meta.get("product")
        if stored_product is not None and product is not None and stored_product != product:
            self._store.close()
            raise StateError(
                f"state directory {state_dir} belongs to product {stored_product!r}, not {product!r}"
            )
        product = product or stored_product
        if product_version is None:
            product_version = meta.get("product_version")
            # A version remembered by an older agent that did not check it is forgotten.
            if product_version is not None and not _is_version(product_version):
                product_version = None
        # The Locking ID salt is fixed at first use: an installation that adopted its product
        # from its first license keeps the salt its license was bound with.
        salt = meta.get("lockid_salt") or product or DEFAULT_SALT
        lid = locking_id or str(locking_id_for(collect_facts(), salt))
        self.installation = Installation(keyring, product, product_version, lid, location)
        updates: dict[str, str | None] = {}
        if meta.get("lockid_salt") is None:
            updates["lockid_salt"] = salt
        if stored_product is None and product is not None:
            updates["product"] = product
        if product_version is not None and meta.get("product_version") != product_version:
            updates["product_version"] = product_version  # remembered for the CLI
        if meta.get("installed_at") is None:
            updates["installed_at"] = _ts(self._clock.now())
        if updates:
            self._store.put(updates)
        self._snapshot: Snapshot = self._rebuild(record_time=True)
        if blacklist is not None:
            # The list shipped with this product version; a newer one in force stays.
            try:
                self.import_blacklist(blacklist)
            except StaleBlacklist:
                log.debug("the shipped blacklist is older than the one in force")

    # ---------------------------------------------------------------- reading

    @property
    def state_dir(self) -> Path:
        return self._store.state_dir

    @property
    def system_id(self) -> str:
        return self._store.get("system_id") or ""

    @property
    def locking_id(self) -> str:
        return self.installation.locking_id

    def _current(self) -> Snapshot:
        snap = self._snapshot
        now = self._now_ts()
        if snap.computed_at <= now < snap.recompute_at:
            return snap
        return self._refresh()

    def check(self, feature: str) -> bool:
        """May ``feature`` be used now? A set lookup on verified in-memory state."""
        snap = self._snapshot
        now = self._now_ts()
        if not snap.computed_at <= now < snap.recompute_at:
            snap = self._refresh()
        return feature in snap.allowed

    def require(self, feature: str) -> None:
        """Like :meth:`check`, but raise :class:`FeatureDenied` saying why."""
        snap = self._current()
        if feature not in snap.allowed:
            raise FeatureDenied(feature, snap.reason(feature))

    def status(self) -> AgentStatus:
        return self._current().status

    def seats(self) -> dict[str, FeatureSeats]:
        """Who holds which feature; features of the license without holders are listed too."""
        licensed = {e.feature: e.count for e in self._licensed_entitlements()}
        holders: dict[str, list[str]] = {code: [] for code in licensed}
        for row in self._store.seats():
            holders.setdefault(row.feature, []).append(row.subject)
        return {
            code: FeatureSeats(code, licensed.get(code, 0), tuple(subjects))
            for code, subjects in sorted(holders.items())
        }

    def holds(self, feature: str, subject: str) -> bool:
        """Does ``subject`` hold a seat of ``feature`` that may be used now?"""
        if not self.check(feature):
            return False
        seats = self.seats().get(feature)
        # Over-assignment after a central reduction is reported, not enforced: the
        # administrator decides whom to unassign; until then nobody new gets a seat.
        return seats is not None and subject in seats.subjects

    def _licensed_entitlements(self) -> tuple[Any, ...]:
        verified = self._facts_cache.verified if self._facts_cache is not None else None
        return () if verified is None else verified.location.entitlements

    # ---------------------------------------------------------------- state rebuild

    _facts_cache: Facts | None = None
    _data_version: int = -1

    def reload(self) -> AgentStatus:
        """Pick up what another process (``tessera agent import``) wrote, if anything."""
        with self._write_lock:
            version = self._store.data_version()
            if version != self._data_version:
                return self._rebuild().status
            return self._current().status

    def _refresh(self) -> Snapshot:
        with self._write_lock:
            facts = self._facts_cache
            try:
                version = self._store.data_version()
            except StateError:
                version = self._data_version
            if facts is None or version != self._data_version:
                try:
                    facts = self._load_facts()
                    self._data_version = version
                except StateError as exc:
                    # check() must answer, not raise: keep the last verified state
                    log.warning("cannot re-read the agent state: %s", exc)
                    facts = facts or Facts()
            self._facts_cache = facts
            now = self._clock.now()
            if facts.high_water is None or now > facts.high_water + timedelta(hours=1):
                facts = self._record_time(facts, now)
            snap = decide(facts, now)
            self._snapshot = snap
            return snap

    def _record_time(self, facts: Facts, now: datetime) -> Facts:
        """Raise the persisted high-water mark to ``now`` (never lower it)."""
        if facts.high_water is not None and now <= facts.high_water:
            return facts
        try:
            self._store.put({"high_water": _ts(now)})
        except StateError as exc:
            log.warning("cannot record trusted time: %s", exc)
        facts = _replace(facts, high_water=now.replace(microsecond=0))
        self._facts_cache = facts
        return facts

    def _rebuild(self, *, record_time: bool = False) -> Snapshot:
        with self._write_lock:
            self._data_version = self._store.data_version()
            facts = self._load_facts()
            self._facts_cache = facts
            now = self._clock.now()
            if record_time:
                facts = self._record_time(facts, now)
            snap = decide(facts, now)
            self._snapshot = snap
            return snap

    def _load_facts(self) -> Facts:
        meta = self._store.get_all()
        verified: VerifiedLicense | None = None
        problem: tuple[AgentState, str] | None = None
        about: tuple[str, str] | None = None
        text = meta.get("license")
        if not self._store.seal_ok(meta):
            # None of the protected values can be believed, not even a lock: refuse all.
            return Facts(problem=(AgentState.INVALID, TAMPERED_MESSAGE))
        if text is not None:
            try:
                verified = self._verify_stored(meta, text)
            except BindingError as exc:
                if not self._machine_changed(text):  # instance/agent-key: the files disagree
                    problem = (AgentState.INVALID, self._invalid_message(str(exc)))
                else:
                    about = _about(text)
                    problem = (
                        AgentState.BROKEN,
                        f"the license no longer matches this machine ({exc}): too much hardware "
                        "changed; ask the vendor to rehost the license to this machine's "
                        "Locking ID (tessera agent locking-id) and import the new file",
                    )
            except VersionError as exc:
                about = _about(text)
                problem = (
                    AgentState.INVALID,
                    f"{exc}: import a license for this version, or ask the vendor for an upgrade",
                )
            except (TesseraError, ValueError) as exc:
                problem = (AgentState.INVALID, self._invalid_message(str(exc)))
        over: dict[str, int] = {}
        if verified is not None:
            counts = {e.feature: e.count for e in verified.location.entitlements}
            taken: dict[str, int] = {}
            for row in self._store.seats():
                taken[row.feature] = taken.get(row.feature, 0) + 1
            over = {f: n - counts.get(f, 0) for f, n in taken.items() if n > counts.get(f, 0)}
        return Facts(
            blacklisted=self._blacklisted(meta, verified),
            verified=verified,
            problem=problem,
            last_success=_parse_ts(meta.get("last_success")),
            last_failure=_parse_ts(meta.get("last_failure")),
            failover_since=_parse_ts(meta.get("failover_since")),
            failure_reason=meta.get("failure_reason"),
            grace_start=_parse_ts(meta.get("grace_start")),
            high_water=_parse_ts(meta.get("high_water")),
            locked=meta.get("locked"),
            revoked=meta.get("revoked"),
            installed_at=_parse_ts(meta.get("installed_at")),
            grace_features=self._grace_features if "grace_start" not in meta else frozenset(),
            over_assigned=MappingProxyType(over),
            online=meta.get("server_url") is not None,
            about=about,
        )

    def _blacklisted(
        self, meta: Mapping[str, str], verified: VerifiedLicense | None
    ) -> tuple[date, AgentState, str] | None:
        """What the stored blacklist file says about this container and its license.

        The file is verified again on every rebuild: an edited state file lifts nothing.
        """
        text = meta.get("blacklist")
        if text is None:
            return None
        try:
            listed = parse_blacklist(text).verify(self.installation.keyring)
        except (TesseraError, ValueError) as exc:
            return (
                date.min,
                AgentState.INVALID,
                self._invalid_message(f"the stored blacklist fails verification ({exc})"),
            )
        # Tolerant, like a binding: a container whose hardware drifted a little since it
        # was listed (a new disk, another NIC) is still the listed container.
        level = verified.license.match if verified is not None else MatchLevel.MEDIUM
        entry = listed.container_entry(self.locking_id) or next(
            (e for e in listed.containers if match_locking_ids(e.subject, self.locking_id, level).ok),
            None,
        )
        if entry is not None:
            return (
                entry.enforced_from(),
                AgentState.LOCKED,
                f"this installation's container is blacklisted by the vendor (blacklist "
                f"{listed.sequence}); contact the vendor's support",
            )
        if verified is None:
            return None
        lic = verified.license
        # Only the copies the license left behind: on the container it moved away from
        # (tessera/2), or issued before the day of the move (tessera/1).
        entry = listed.withdrawing(lic)
        if entry is not None:
            return (
                entry.enforced_from(),
                AgentState.UNLICENSED,
                f"license {lic.serial} was recovered to another machine and withdrawn here "
                f"(blacklist {listed.sequence}); contact the vendor's support",
            )
        return None

    def import_blacklist(self, data: bytes | str) -> int:
        """Put the vendor's signed blacklist file in force; returns its sequence number.

        A forged or altered file fails its signature; a file older than the one in force
        (lower sequence, or the same sequence with other content) is refused as a replay,
        since going back to it could lift a blacklisting. The same file again is a no-op.
        """
        try:
            signed = parse_blacklist(data)  # FormatError for anything malformed
            listed = signed.verify(self.installation.keyring)  # SignatureError when forged
        except TesseraError as exc:
            log.warning("blacklist file refused: %s", exc)
            raise
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        with self._write_lock:
            meta = self._store.get_all()
            current = meta.get("blacklist")
            if current is not None:
                have = int(meta.get("blacklist_sequence", "0"))
                if listed.sequence < have:
                    log.warning("blacklist %d refused: %d is in force", listed.sequence, have)
                    raise StaleBlacklist(
                        f"blacklist {listed.sequence} is older than the one in force ({have}): refused"
                    )
                if listed.sequence == have:
                    if parse_blacklist(current).body != signed.body:
                        raise StaleBlacklist(
                            f"blacklist {listed.sequence} differs from the one in force with "
                            "the same sequence number: refused"
                        )
                    return listed.sequence
            self._store.put({"blacklist": text, "blacklist_sequence": str(listed.sequence)})
            log.info("blacklist %d is in force", listed.sequence)
            self._rebuild()
            return listed.sequence

    def _machine_changed(self, text: str) -> bool:
        """Is this a machine-bound license whose Locking ID no longer matches here?"""
        try:
            lic = parse(text.encode("utf-8")).document
            if not isinstance(lic, License) or lic.binding is not Binding.MACHINE:
                return False
            check_binding(lic, self.locking_id)
        except BindingError:
            return True
        except (TesseraError, ValueError):
            return False
        return False

    @staticmethod
    def _invalid_message(why: str) -> str:
        return (
            f"the stored license is invalid ({why}): the license file or the agent state was "
            "altered; import the original license file again or re-activate"
        )

    def _verify_stored(self, meta: Mapping[str, str], text: str) -> VerifiedLicense:
        if meta.get("license_sha256") != _sha256(text):
            raise VerificationError("the stored license file does not match the recorded state")
        identity = self._stored_identity(meta)
        verified = verify_license(
            text,
            self.installation,
            identity=identity,
            agent_key=self._agent_public(meta),
            license_key=self._license_key(meta),
        )
        if meta.get("license_serial") != verified.license.serial:
            raise VerificationError("the stored license's serial does not match the recorded state")
        if meta.get("license_revision") != str(verified.license.revision):
            raise VerificationError(
                f"the recorded license revision {shown(meta.get('license_revision'))} is not the "
                f"stored file's ({verified.license.revision})"
            )
        return verified

    def _stored_identity(self, meta: Mapping[str, str]) -> Identity | None:
        text = meta.get("identity")
        return None if text is None else verify_identity(text, self.installation)

    def _agent_signing_key(self, meta: Mapping[str, str]) -> SigningKey | None:
        blob = meta.get("agent_key")
        if blob is None:
            return None
        return SigningKey.from_raw(self._store.decrypt("agent key", blob))

    @staticmethod
    def _agent_public(meta: Mapping[str, str]) -> str | None:
        return meta.get("agent_public")

    def _checkin_key(self, meta: Mapping[str, str]) -> bytes | None:
        """The key check-ins are MACed with (online activation only; else they are signed)."""
        blob = meta.get("checkin_key")
        return None if blob is None else self._store.decrypt("checkin key", blob)

    def _license_key(self, meta: Mapping[str, str]) -> str | None:
        blob = meta.get("license_key")
        return None if blob is None else self._store.decrypt("license key", blob).decode("ascii")

    # ---------------------------------------------------------------- import

    def import_license(self, data: bytes | str) -> AgentStatus:
        """Verify a ``.lic`` or ``.par`` file and, only if it passes, put it in force now."""
        raw = data.encode("utf-8") if isinstance(data, str) else data
        kind = parse(raw).kind  # FormatError (naming the line) for anything unreadable
        text = raw.decode("utf-8")
        with self._write_lock:
            if kind == "identity":
                self._import_identity(text)
            else:
                self._import_license_text(text, from_server=False)
            return self._rebuild().status

    def _import_identity(self, text: str) -> None:
        """An identity file that pairs with the license in force replaces its identity at
        once; one for another license waits (``identity_pending``) for its ``.lic``, so
        importing the two parts of a new license never breaks the one in force."""
        identity = verify_identity(text, self.installation)
        self._adopt(identity.product)
        meta = self._store.get_all()
        current = meta.get("license")
        lic = parse(current.encode("utf-8")).document if current is not None else None
        if isinstance(lic, License) and lic.serial == identity.serial:
            check_pair(identity, lic)
            self._store.put({"identity": text, "identity_pending": None})
        elif isinstance(lic, License) and lic.binding is Binding.INSTANCE:
            self._store.put({"identity_pending": text})
        else:
            self._store.put({"identity": text, "identity_pending": None})

    def _import_license_text(self, text: str, *, from_server: bool) -> VerifiedLicense:
        meta = self._store.get_all()
        identity = self._stored_identity(meta)
        pending_text = meta.get("identity_pending")
        pending = None if pending_text is None else verify_identity(pending_text, self.installation)
        serial = parse(text.encode("utf-8")).document.serial
        use_pending = pending is not None and pending.serial == serial
        verified = verify_license(
            text,
            self.installation,
            identity=pending if use_pending else identity,
            agent_key=self._agent_public(meta),
            license_key=self._license_key(meta),
        )
        lic = verified.license
        now = max(self._clock.now(), _parse_ts(meta.get("high_water")) or self._clock.now())
        if all_expired(verified, now.date()):
            raise VerificationError(f"license {lic.serial}: every entitlement has expired")
        if not from_server:
            if meta.get("revoked_serial") == lic.serial:
                raise VerificationError(
                    f"license {lic.serial} was revoked on this installation by the vendor"
                )
            if (
                meta.get("license_serial") == lic.serial
                and int(meta.get("license_revision", "0")) > lic.revision
            ):
                raise VerificationError(
                    f"license {lic.serial} revision {lic.revision} is older than the one in force "
                    f"(revision {meta.get('license_revision')})"
                )
        updates: dict[str, str | None] = {
            "license": text,
            "license_sha256": _sha256(text),
            "license_serial": lic.serial,
            "license_revision": str(lic.revision),
            "revoked": None,
        }
        if use_pending:
            updates.update({"identity": pending_text, "identity_pending": None})
        if from_server:
            updates["revoked_serial"] = None
        if meta.get("grace_start") is None:
            updates["grace_start"] = _ts(self._clock.now())
        if self.installation.product is None:
            updates["product"] = lic.product
        self._store.put(updates)
        self._adopt(lic.product)
        log.info("license %s revision %d is in force", lic.serial, lic.revision)
        return verified

    def _adopt(self, product: str | None) -> None:
        """A generic agent takes on the product of the first file it accepts."""
        if self.installation.product is None and product is not None:
            check_product_code(product)
            self._store.put({"product": product})
            self.installation = dataclasses.replace(self.installation, product=product)

    # ---------------------------------------------------------------- seats

    @staticmethod
    def check_seat_arguments(feature: str, subject: str) -> None:
        """:class:`FormatError` for a feature code or subject :meth:`assign` refuses, without
        any state: a tool names bad input first, also where nothing is installed."""
        _valid_feature(feature)
        _check_subject(subject)

    def assign(self, feature: str, subject: str) -> bool:
        """Give ``subject`` a seat of ``feature``; False if it had one. Never over the count."""
        self.check_seat_arguments(feature, subject)
        with self._write_lock:
            counts = {e.feature: e.count for e in self._licensed_entitlements()}
            if feature not in counts:
                raise SeatError(f"feature {feature} is not licensed here")
            added = self._store.add_seat(feature, subject, _ts(self._clock.now()), counts[feature])
            self._rebuild()
            return added

    def unassign(self, feature: str, subject: str) -> None:
        with self._write_lock:
            if not self._store.remove_seat(feature, subject):
                # Not validated: a seat an older agent stored must stay removable; only the
                # echo is bounded.
                raise SeatError(f"{clipped(subject)} holds no seat of {clipped(feature)}")
            self._rebuild()

    # ---------------------------------------------------------------- Connect

    def _client(self, server_url: str, ca_pem: bytes | None) -> ConnectClient:
        return ConnectClient(server_url, ca_pem, self.installation.keyring, self._transport)

    def _ensure_agent_key(self) -> SigningKey:
        meta = self._store.get_all()
        key = self._agent_signing_key(meta)
        if key is None:
            key = SigningKey.generate()
            self._store.put(
                {
                    "agent_key": self._store.encrypt("agent key", key.to_raw()),
                    "agent_public": key.public.to_base64(),
                }
            )
        return key

    def activation_request(self, license_key: str) -> ActivationRequest:
        """The offline request file: makes the agent key if needed and remembers the key."""
        try:
            key_text = normalize_license_key(license_key)
        except ValueError as exc:
            raise FormatError(str(exc)) from None
        with self._write_lock:
            agent_key = self._ensure_agent_key()
            self._store.put({"license_key": self._store.encrypt("license key", key_text.encode())})
            return ActivationRequest.create(
                key_text, self.locking_id, self.system_id, agent_key, self.installation.product
            )

    def activate(
        self,
        server_url: str,
        license_key: str,
        ca_pem: bytes | None = None,
        *,
        recover: bool = False,
    ) -> AgentStatus:
        """Online activation: the server binds the license here and sends it, signed.

        ``recover`` asks the server to move the license here when all its machines are
        bound (a mainboard swap); the license's recovery rule decides (docs/recovery.md).
        Without it a machine beyond the count is refused, so nobody takes over a slot by
        accident.
        """
        with self._write_lock:
            client = self._client(server_url, ca_pem)
            request = self.activation_request(license_key)
            with client:
                path = RECOVER_PATH if recover else ACTIVATE_PATH
                response = client.post(path, request.to_json(), request.nonce)
            if response.license is None:
                raise BadResponse("the activation response carries no license")
            if response.identity is not None:
                self._import_identity(response.identity)
            self._import_license_text(response.license, from_server=True)
            settings: dict[str, str | None] = {
                "server_url": server_url,
                "server_ca": None if ca_pem is None else ca_pem.decode("ascii"),
                "checkin_key": None,  # another server's key would not fit
            }
            if response.checkin_key is not None:
                agent_key = self._agent_signing_key(self._store.get_all())
                assert agent_key is not None  # made by activation_request above
                checkin_key = open_checkin_key(response.checkin_key, agent_key)
                settings["checkin_key"] = self._store.encrypt("checkin key", checkin_key)
            self._store.put(settings)
            self._record_success(response)
            # Everything the seal covers was just written from the server's answer: an
            # online activation is how a state edited outside the agent is repaired.
            self._store.reseal()
            return self._rebuild().status

    def connect(self) -> AgentStatus:
        """One check-in now. On failure the reason is recorded (failover) and re-raised."""
        with self._write_lock:
            meta = self._store.get_all()
            url = meta.get("server_url")
            key = self._agent_signing_key(meta)
            license_key = self._license_key(meta)
            if url is None or key is None or license_key is None:
                raise AgentError(
                    "this installation was not activated online: no license server to check in "
                    "with (run 'tessera agent activate')"
                )
            ca = meta.get("server_ca")
            checkin_key = self._checkin_key(meta)
            request = CheckinRequest.create(
                license_key, self.locking_id, self.system_id, key, checkin_key,
                revision=_held_revision(meta),
            )  # fmt: skip
            try:
                with self._client(url, None if ca is None else ca.encode("ascii")) as client:
                    try:
                        response = client.post(CHECKIN_PATH, request.to_json(), request.nonce)
                    except ServerRefused as exc:
                        if exc.status_code != 422 or not any(
                            f"'{field}'" in str(exc) for field in ("accept", "revision")
                        ):
                            raise
                        # A server older than these fields: ask as older agents do.
                        request = CheckinRequest.create(
                            license_key, self.locking_id, self.system_id, key, checkin_key,
                            accept_batch=False,
                        )  # fmt: skip
                        response = client.post(CHECKIN_PATH, request.to_json(), request.nonce)
            except ConnectError as exc:
                self._record_failure(str(exc))
                raise
            if "lock" not in response.directives:
                problem: str | None = None
                if response.identity is not None:
                    try:
                        self._import_identity(response.identity)
                    except TesseraError as exc:
                        problem = f"the identity file the server sent fails here: {exc}"
                if response.license is not None and problem is None:
                    try:
                        self._import_license_text(response.license, from_server=True)
                    except TesseraError as exc:
                        problem = f"the license the server sent fails here: {exc}"
                if problem is not None:
                    log.warning("%s; keeping the license in force", problem)
            self._record_success(response)
            return self._rebuild().status

    def _record_success(self, response: ServerResponse) -> None:
        """Server time is trusted: it replaces the high-water mark, even lowering it.

        The mark becomes max(server time, this clock), so a clock that ran ahead by mistake
        is forgiven, and a clock behind the server stays "set back" until it is corrected.
        The check-in is dated the same way, so failover is measured on the clock that
        measures it.
        """
        trusted = max(response.server_time, self._clock.now().replace(microsecond=0))
        updates: dict[str, str | None] = {
            "last_success": _ts(trusted),
            "last_failure": None,
            "failover_since": None,
            "failure_reason": None,
            "high_water": _ts(trusted),
            "locked": None,
        }
        reason = f" ({response.message})" if response.message else ""
        if "lock" in response.directives:
            updates["locked"] = (
                f"this installation was locked by the vendor{reason}; contact the vendor's support"
            )
            log.warning("the license server locked this installation%s", reason)
        if "revoke" in response.directives:
            meta = self._store.get_all()
            updates.update(
                {
                    "license": None,
                    "license_sha256": None,
                    "license_serial": None,
                    "license_revision": None,
                    "revoked_serial": meta.get("license_serial") or response.serial,
                    "revoked": f"license {response.serial} was revoked by the vendor{reason}",
                }
            )
            log.warning("the license server revoked license %s%s", response.serial, reason)
        self._store.put(updates)

    def _record_failure(self, reason: str) -> None:
        """Dated in trusted time: a clock set back must not date the failover start before
        the last check-in (failover is measured from it)."""
        log.warning("check-in failed, running on the last verified state: %s", reason)
        try:
            meta = self._store.get_all()
            clock_now = self._clock.now().replace(microsecond=0)
            now = _ts(max(clock_now, _parse_ts(meta.get("high_water")) or clock_now))
            since = meta.get("failover_since") or now
            self._store.put({"last_failure": now, "failure_reason": reason, "failover_since": since})
        except StateError as exc:
            log.warning("cannot record the failed check-in: %s", exc)
        self._rebuild()

    # ---------------------------------------------------------------- background

    def start(self) -> None:
        """Start the background threads: check-ins every ``validation-hours`` with jitter,
        and a watcher that puts licenses imported by other processes in force."""
        with self._write_lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="tessera-agent-connect", daemon=True)
            self._thread.start()
            self._watcher = threading.Thread(target=self._watch, name="tessera-agent-watch", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        """Hot update from other processes: poll SQLite's data_version (no disk read)."""
        while not self._stop.wait(WATCH_INTERVAL):
            try:
                self.reload()
            except TesseraError as exc:
                log.warning("cannot re-read the agent state: %s", exc)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background threads (check-in and watcher)."""
        self._stop.set()
        for thread in (self._thread, self._watcher):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)
        self._thread = self._watcher = None

    def next_checkin_delay(self) -> float:
        """Seconds until the next check-in: the license's interval, jittered by -25%..0."""
        facts = self._facts_cache or self._load_facts()
        hours = facts.verified.license.validation_hours if facts.verified is not None else 24
        interval = timedelta(hours=hours) * random.uniform(0.75, 1.0)
        if facts.last_failure is not None:
            interval = min(interval, _RETRY_AFTER_FAILURE * random.uniform(0.5, 1.0))
            return interval.total_seconds()
        if facts.last_success is None:
            return 0.0
        due = facts.last_success + interval
        return max(0.0, (due - self._clock.now()).total_seconds())

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._stop.wait(self.next_checkin_delay()):
                return
            try:
                self.connect()
            except Exception as exc:  # the product must never lose its licensing thread
                log.warning("background check-in: %s", exc)
                if self._stop.wait(60.0):
                    return

    # ---------------------------------------------------------------- backups

    def backup(self, *, with_license: bool) -> bytes:
        """A backup file: with license encrypted to this installation, else portable JSON."""
        meta = self._store.get_all()
        seats = [
            {"feature": r.feature, "subject": r.subject, "assigned_at": r.assigned_at}
            for r in self._store.seats()
        ]
        if with_license:
            plain = json.dumps({"meta": meta, "seats": seats}, sort_keys=True).encode("utf-8")
            doc: dict[str, Any] = {
                "format": BACKUP_FORMAT,
                "kind": "with-license",
                "system_id": meta.get("system_id"),
                "product": self.installation.product,
                "sealed": self._store.encrypt("backup", plain),
            }
        else:
            doc = {
                "format": BACKUP_FORMAT,
                "kind": "without-license",
                "product": self.installation.product,
                "settings": {k: meta[k] for k in ("server_url", "server_ca") if k in meta},
                "seats": seats,
            }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")

    def restore(self, data: bytes) -> AgentStatus:
        """Restore a backup; a with-license backup only into the installation that made it."""
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise BackupError("not a Tessera agent backup (not JSON)") from None
        if not isinstance(doc, dict) or doc.get("format") != BACKUP_FORMAT:
            raise BackupError(f"not a Tessera agent backup (expected format {BACKUP_FORMAT})")
        if self.installation.product is None and isinstance(doc.get("product"), str):
            try:
                self._adopt(doc["product"])
            except ValueError:
                raise BackupError("the backup names an invalid product") from None
        if doc.get("product") != self.installation.product:
            raise BackupError(
                f"this backup is for product {shown(doc.get('product'))}, not {self.installation.product!r}"
            )
        with self._write_lock:
            if doc.get("kind") == "with-license":
                return self._restore_with_license(doc)
            if doc.get("kind") == "without-license":
                if self._store.get(AWAITING_RESTORE) is not None:
                    raise BackupError(
                        "this installation lost its state: only a --with-license backup made "
                        "here restores it; to start over instead, move the state directory away "
                        "and restore the portable backup into the new installation"
                    )
                return self._restore_portable(doc)
            raise BackupError("unknown backup kind")

    def _restore_with_license(self, doc: dict[str, Any]) -> AgentStatus:
        sealed = doc.get("sealed")
        if not isinstance(sealed, str):
            raise BackupError("the backup is damaged")
        try:
            plain = self._store.decrypt("backup", sealed)
        except StateError:
            raise BackupError(
                "this with-license backup was made by another installation and can be restored "
                "only there; to migrate, use a --without-license backup and import the license"
            ) from None
        content = json.loads(plain)
        meta: dict[str, str] = dict(content["meta"])
        current = self._store.get_all()
        if not self._store.seal_ok(current):
            # What is in force cannot be known, so nothing says what the restore may not
            # loosen (a deleted lock would simply be gone).
            raise BackupError(
                "the agent state was edited outside the agent, so a restore cannot tell what "
                "is in force; re-activate online (tessera agent activate), or move the state "
                "directory away and start a new installation"
            )
        # Trusted time and the grace period never move backwards through a restore.
        for name, pick in (("high_water", max), ("grace_start", min), ("installed_at", min)):
            values = [v for v in (_parse_ts(meta.get(name)), _parse_ts(current.get(name))) if v]
            if values:
                meta[name] = _ts(pick(values))
        _never_loosen(meta, current)
        rows = [SeatRow(s["feature"], s["subject"], s["assigned_at"]) for s in content["seats"]]
        # The backup's system_id, not this directory's: a with-license backup decrypts only
        # with this installation's secret, so it is this installation, and the server knows
        # it under that id (a state.db rebuilt after a loss would otherwise be refused).
        self._store.replace_everything(meta, rows, keep_meta=("product", "product_version"))
        return self._rebuild().status

    def _restore_portable(self, doc: dict[str, Any]) -> AgentStatus:
        settings = doc.get("settings")
        seats = doc.get("seats")
        if not isinstance(settings, dict) or not isinstance(seats, list):
            raise BackupError("the backup is damaged")
        rows: list[SeatRow] = []
        for item in seats:
            if not isinstance(item, dict):
                raise BackupError("the backup is damaged")
            feature, subject = item.get("feature"), item.get("subject")
            if not isinstance(feature, str) or not isinstance(subject, str):
                raise BackupError("the backup holds a malformed seat")
            try:
                _valid_feature(feature)
            except FormatError as exc:
                raise BackupError(f"the backup holds a malformed seat: {exc}") from None
            try:
                _check_subject(subject)
            except FormatError as exc:
                raise BackupError(f"the backup holds a malformed seat: {exc}") from None
            assigned = item.get("assigned_at")
            if assigned is None:
                assigned = _ts(self._clock.now())
            elif not isinstance(assigned, str) or _parse_ts(assigned) is None:
                raise BackupError(f"the backup holds a malformed seat: assigned_at {shown(assigned)}")
            rows.append(SeatRow(feature, subject, assigned))
        existing = self._store.seats()
        known = {(r.feature, r.subject) for r in existing}
        merged = existing + [r for r in rows if (r.feature, r.subject) not in known]
        updates = _portable_settings(settings)
        current = self._store.get_all()
        self._store.replace_everything(
            {**current, **{k: v for k, v in updates.items() if k not in current}}, merged
        )
        return self._rebuild().status

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        self.stop()
        self._store.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = self.status().state.value
        return f"Agent({str(self.state_dir)!r}, product={self.installation.product!r}, {state=!r})"


_LICENSE_FIELDS = (
    "license",
    "license_sha256",
    "license_serial",
    "license_revision",
    "identity",
    "identity_pending",
)
_CHECKIN_FIELDS = ("last_success", "last_failure", "failover_since", "failure_reason")


def _never_loosen(meta: dict[str, str], current: Mapping[str, str]) -> None:
    """Merge the state in force into a with-license backup being restored (in place).

    A backup is a snapshot of the past, and the past may be looser than the present: the
    vendor may have locked the installation, revoked or reissued its license, or published a
    newer blacklist since. Restoring is for recovering lost state, so it must never become a
    way to undo those. The backup brings back seats, keys, settings and its license; the
    state in force wins wherever it is stricter or newer.
    """

    def take_current(names: tuple[str, ...]) -> None:
        for name in names:
            if name in current:
                meta[name] = current[name]
            else:
                meta.pop(name, None)

    if current.get("locked") is not None:
        meta["locked"] = current["locked"]
    revoked = current.get("revoked_serial")
    if revoked is not None:
        meta["revoked_serial"] = revoked
        if current.get("revoked") is not None:
            meta["revoked"] = current["revoked"]
        if meta.get("license_serial") == revoked:
            for name in _LICENSE_FIELDS:
                meta.pop(name, None)
    if (
        current.get("license_serial") is not None
        and current.get("license_serial") == meta.get("license_serial")
        and _held_revision(current) > _held_revision(meta)
    ):
        take_current(_LICENSE_FIELDS)
    if current.get("blacklist") is not None and int(current.get("blacklist_sequence", "0")) >= int(
        meta.get("blacklist_sequence", "0") if meta.get("blacklist") is not None else "-1"
    ):
        take_current(("blacklist", "blacklist_sequence"))
    # The check-in record is the newer of the two: an older one would only shorten
    # failover, a newer one in the backup cannot exist unless the state was rolled back.
    ours, theirs = _parse_ts(current.get("last_success")), _parse_ts(meta.get("last_success"))
    if ours is not None and (theirs is None or ours >= theirs):
        take_current(_CHECKIN_FIELDS)


def _portable_settings(settings: Mapping[str, Any]) -> dict[str, str]:
    """The connection settings of a portable backup, checked as ``activate`` would use them.

    A portable backup is plain JSON that anyone may have edited: a ``http://`` URL would
    send the license key in clear on the next check-in, and a broken CA would only fail
    there, far from its cause.
    """
    updates: dict[str, str] = {}
    url = settings.get("server_url")
    if url is not None:
        if not isinstance(url, str):
            raise BackupError(f"the backup's server_url is not a URL (got {shown(url)})")
        try:
            check_server_url(url)  # what activate and connect accept, nothing more
        except FormatError as exc:
            raise BackupError(f"the backup's server_url: {exc}") from None
        updates["server_url"] = url
    ca = settings.get("server_ca")
    if ca is not None:
        if not isinstance(ca, str) or "-----BEGIN CERTIFICATE-----" not in ca:
            raise BackupError("the backup's server_ca is not a PEM certificate")
        try:
            pinned_ssl_context(ca.encode("ascii"))
        except (FormatError, UnicodeEncodeError):
            raise BackupError("the backup's server_ca is not a PEM certificate") from None
        updates["server_ca"] = ca
    return updates


def _about(text: str) -> tuple[str, str] | None:
    """Serial and licensee of a stored license whose signature held but which cannot be
    used here: the administrator still needs to know which license to have rehosted."""
    try:
        lic = parse(text.encode("utf-8")).document
    except (TesseraError, ValueError):
        return None
    return (lic.serial, lic.licensee) if isinstance(lic, License) else None


def _check_version(text: str) -> None:
    try:
        parse_version(text)
    except ValueError as exc:
        raise FormatError(f"invalid product version: {exc}") from None


def _is_version(text: str) -> bool:
    try:
        parse_version(text)
    except ValueError:
        return False
    return True


def _valid_feature(feature: str) -> bool:
    try:
        check_feature_code(feature)
    except ValueError:
        raise FormatError(f"invalid feature code {shown(feature)}") from None
    return True


def _replace(facts: Facts, **changes: Any) -> Facts:
    from dataclasses import replace

    return replace(facts, **changes)
