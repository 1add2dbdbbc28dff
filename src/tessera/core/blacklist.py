"""The signed blacklist file a vendor ships with the next product version.

When a container was recovered into a new one, the old container must stop working. One of
the three ways the news reaches it is a list, signed by the vendor, that the product carries
and the agent enforces, optionally only after a delay (so the blacklisted customer cannot
tell which recovery caught them)::

    [BLACKLIST]
    format = tessera/1
    issued = 2026-11-22T10:00:00Z
    sequence = 7
    [CONTAINERS]
    TL1-MN5F5RR7ZNUDCUDRKWSW3QJFJJ3AG = 2026-11-20, 14
    [SERIALS]
    2026-000123 = 2026-11-21, 0
    [SIGNATURE]
    key-id = ...
    ed25519 = ...

``[CONTAINERS]`` lists whole containers (Locking IDs), ``[SERIALS]`` licenses revoked only
(the "revoke only the recovered licenses" rule); each entry says since when and after how
many days of delay it is enforced. ``sequence`` grows with every export so that an agent
can refuse to go back to an older list (a replay that would lift a blacklisting).
The lexical rules and the signature are those of the license format.

A ``tessera/1`` serial entry (``since`` a day) reaches every copy of the license issued
before that day: a copy the old machine got on the day of the move escapes it, and the
license's other machines lose copies they rightly hold. ``format = tessera/2`` adds the
entry that names the old container and the moment of the move, so it reaches exactly the
copies bound to the container the license left::

    2026-000124 = 2026-11-21T15:04:05Z, 0, TL1-MN5F5RR7ZNUDCUDRKWSW3QJFJJ3AG

A file is written as ``tessera/2`` only when it holds such an entry (its canonical form):
shipped agents read only ``tessera/1`` and refuse anything else by its ``format`` line, so a
file that needs nothing new keeps working on them. ``docs/recovery.md`` is the spec.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from tessera.core.errors import FormatError
from tessera.core.fileformat import (
    FORMAT,
    _decode,
    _parse_signature,
    _split_sections,
    format_timestamp,
    parse_timestamp,
)
from tessera.core.fingerprint import LockingId, match_locking_ids
from tessera.core.model import SERIAL_RE, License, _check_timestamp
from tessera.core.signing import Keyring, SigningKey

__all__ = [
    "FORMAT_2",
    "Blacklist",
    "BlacklistEntry",
    "SignedBlacklist",
    "parse_blacklist",
    "sign_blacklist",
]

MAX_DELAY_DAYS = 3650
#: The format that adds [SERIALS] entries scoped to the container a license moved away from.
FORMAT_2 = "tessera/2"


@dataclass(frozen=True, slots=True)
class BlacklistEntry:
    """One blacklisted container (Locking ID) or license (serial).

    A serial entry with ``locking_id`` and ``moved`` (``tessera/2``) withdraws only the
    copies bound to that container and issued by the time of the move (see :meth:`reaches`);
    without them (``tessera/1``) every copy issued before ``since``. ``since`` is then the
    day of ``moved``: the delay counts in days either way.
    """

    subject: str
    since: date
    delay_days: int = 0
    locking_id: str | None = None
    moved: datetime | None = None

    def __post_init__(self) -> None:
        if isinstance(self.delay_days, bool) or not 0 <= self.delay_days <= MAX_DELAY_DAYS:
            raise ValueError(f"invalid delay for {self.subject}: {self.delay_days!r}")
        if not isinstance(self.since, date) or isinstance(self.since, datetime):
            raise ValueError(f"invalid date for {self.subject}")
        if (self.locking_id is None) != (self.moved is None):
            raise ValueError(f"{self.subject}: a container and the time of the move go together")
        if self.moved is not None and self.locking_id is not None:
            _check_timestamp(self.moved, "time of the move")
            if self.moved.date() != self.since:
                raise ValueError(f"{self.subject}: since must be the day of the move")
            LockingId.parse(self.locking_id)

    @classmethod
    def moved_away(cls, serial: str, locking_id: str, moved: datetime, delay_days: int = 0) -> BlacklistEntry:
        """The ``tessera/2`` entry of a license moved away from ``locking_id`` at ``moved``."""
        return cls(serial, moved.date(), delay_days, locking_id, moved)

    def enforced_from(self) -> date:
        return self.since + timedelta(days=self.delay_days)

    def enforced_on(self, day: date) -> bool:
        return day >= self.enforced_from()

    def reaches(self, lic: License) -> bool:
        """Does this serial entry withdraw the copy ``lic``?

        A ``tessera/2`` entry matches the copy's Locking ID as the [CONTAINERS] check does,
        tolerantly at the license's match level: an older copy, from before the machine's
        hardware drifted and it was activated again, is still the old machine's. The time
        is to the second, and the second of the move itself is ambiguous: the old machine's
        last copy may be issued in it (a race the customer can stage on purpose), and so is
        the new machine's first. The old one is bound to exactly the listed Locking ID (the
        server lists the one it stored), the new one never is (a move to the same Locking ID
        is refused), but a support rehost may pick a target that matches the old one
        tolerantly; so an exact match counts up to and including that second, a tolerant
        one only before it. A copy without a Locking ID (instance-bound) has no container
        to match: only a ``tessera/1`` entry reaches it.
        """
        if lic.serial != self.subject:
            return False
        if self.locking_id is None or self.moved is None:
            return lic.issued.date() < self.since
        if lic.locking_id is None:
            return False
        if lic.locking_id == self.locking_id:
            return lic.issued <= self.moved
        if lic.issued >= self.moved:
            return False
        try:
            return match_locking_ids(self.locking_id, lic.locking_id, lic.match).ok
        except ValueError:  # not a Locking ID the agent could be running under
            return False

    def _serial_key(self) -> tuple[str, bool, str, datetime | None]:
        return (self.subject, self.locking_id is not None, self.locking_id or "", self.moved)


@dataclass(frozen=True, slots=True)
class Blacklist:
    issued: datetime
    sequence: int
    containers: tuple[BlacklistEntry, ...] = ()
    serials: tuple[BlacklistEntry, ...] = ()

    def __post_init__(self) -> None:
        _check_timestamp(self.issued, "issued time")
        if isinstance(self.sequence, bool) or not 1 <= self.sequence <= 10**12:
            raise ValueError(f"invalid sequence: {self.sequence!r}")
        object.__setattr__(self, "containers", tuple(sorted(self.containers, key=lambda e: e.subject)))
        # A license may have left several containers (a machine each): one entry per move.
        object.__setattr__(self, "serials", tuple(sorted(self.serials, key=BlacklistEntry._serial_key)))
        subjects = [e.subject for e in self.containers]
        if len(set(subjects)) != len(subjects):
            raise ValueError("container listed twice")
        keys = [(e.subject, e.locking_id, e.moved) for e in self.serials]
        if len(set(keys)) != len(keys):
            raise ValueError("serial listed twice")
        for e in self.containers:
            if e.locking_id is not None:
                raise ValueError(f"container entry {e.subject} names no other container")
            LockingId.parse(e.subject)
        for e in self.serials:
            if not SERIAL_RE.match(e.subject):
                raise ValueError(f"invalid serial number: {e.subject!r}")

    @property
    def format(self) -> str:
        """``tessera/2`` only when an entry needs it, so shipped agents keep reading the rest."""
        return FORMAT_2 if any(e.locking_id is not None for e in self.serials) else FORMAT

    def container_entry(self, locking_id: str) -> BlacklistEntry | None:
        for e in self.containers:
            if e.subject == locking_id:
                return e
        return None

    def serial_entry(self, serial: str) -> BlacklistEntry | None:
        """The first of :meth:`serial_entries`, if any."""
        return next(iter(self.serial_entries(serial)), None)

    def serial_entries(self, serial: str) -> tuple[BlacklistEntry, ...]:
        return tuple(e for e in self.serials if e.subject == serial)

    def withdrawing(self, lic: License) -> BlacklistEntry | None:
        """The serial entry that withdraws the copy ``lic`` first (earliest enforced), if any."""
        reaching = [e for e in self.serials if e.reaches(lic)]
        return min(reaching, key=BlacklistEntry.enforced_from) if reaching else None

    def serialize_body(self) -> str:
        out = [
            "[BLACKLIST]\n",
            f"format = {self.format}\n",
            f"issued = {format_timestamp(self.issued)}\n",
            f"sequence = {self.sequence}\n",
            "[CONTAINERS]\n",
        ]
        out.extend(f"{e.subject} = {e.since.isoformat()}, {e.delay_days}\n" for e in self.containers)
        out.append("[SERIALS]\n")
        out.extend(_serial_line(e) for e in self.serials)
        return "".join(out)


def _serial_line(e: BlacklistEntry) -> str:
    if e.locking_id is None or e.moved is None:
        return f"{e.subject} = {e.since.isoformat()}, {e.delay_days}\n"
    return f"{e.subject} = {format_timestamp(e.moved)}, {e.delay_days}, {e.locking_id}\n"


@dataclass(frozen=True, slots=True)
class SignedBlacklist:
    blacklist: Blacklist
    body: bytes
    key_id: str
    signature: bytes

    def verify(self, keyring: Keyring) -> Blacklist:
        keyring.verify(self.key_id, self.signature, self.body)
        return self.blacklist


def sign_blacklist(blacklist: Blacklist, key: SigningKey) -> str:
    body = blacklist.serialize_body()
    sig = base64.b64encode(key.sign(body.encode("utf-8"))).decode("ascii")
    return f"{body}[SIGNATURE]\nkey-id = {key.key_id}\ned25519 = {sig}\n"


def _entries(
    section_entries: list[tuple[str, str, int]], containers: bool, version: int
) -> tuple[BlacklistEntry, ...]:
    out: list[BlacklistEntry] = []
    seen: dict[tuple[str, str | None, datetime | None], int] = {}
    moved_shape = not containers and version == 2
    shape = "'moved, delay-days, Locking ID' or 'since, delay-days'" if moved_shape else "'since, delay-days'"
    for subject, raw, line in section_entries:
        try:
            if containers:
                LockingId.parse(subject)
            elif not SERIAL_RE.match(subject):
                raise ValueError(f"invalid serial number {subject[:40]!r}")
            fields = raw.split(", ")
            delay = fields[1] if len(fields) in ((2, 3) if moved_shape else (2,)) else ""
            if not delay.isdigit() or (len(delay) > 1 and delay[0] == "0"):
                raise ValueError(f"expected {shape}, got {raw[:40]!r}")
            if len(fields) == 3:
                entry = BlacklistEntry.moved_away(subject, fields[2], parse_timestamp(fields[0]), int(delay))
            else:
                entry = BlacklistEntry(subject, date.fromisoformat(fields[0]), int(delay))
        except ValueError as exc:
            raise FormatError(str(exc), line) from None
        key = (subject, entry.locking_id, entry.moved)
        if key in seen:
            what = subject if entry.locking_id is None else f"{subject} moved from {entry.locking_id[:24]}"
            raise FormatError(f"{what} listed twice (first on line {seen[key]})", line)
        seen[key] = line
        out.append(entry)
    return tuple(out)


def parse_blacklist(data: bytes | str) -> SignedBlacklist:
    """Parse a blacklist file strictly (the signature is checked by :meth:`SignedBlacklist.verify`)."""
    text = _decode(data)
    sections = _split_sections(text)
    names = [s.name for s in sections]
    if names != ["BLACKLIST", "CONTAINERS", "SERIALS", "SIGNATURE"]:
        for s, want in zip(sections, ["BLACKLIST", "CONTAINERS", "SERIALS", "SIGNATURE"], strict=False):
            if s.name != want:
                raise FormatError(f"expected [{want}], found [{s.name}]", s.line)
        raise FormatError("a blacklist has [BLACKLIST], [CONTAINERS], [SERIALS] and [SIGNATURE]")
    if any(s.arg is not None for s in sections):
        bad = next(s for s in sections if s.arg is not None)
        raise FormatError(f"[{bad.name}] takes no name", bad.line)
    head = sections[0]
    keys = [k for k, _, _ in head.entries]
    if keys != ["format", "issued", "sequence"]:
        raise FormatError("[BLACKLIST] must hold exactly format, issued, sequence", head.line)
    (_, fmt, fmt_line), (_, issued, issued_line), (_, seq, seq_line) = head.entries
    if fmt not in (FORMAT, FORMAT_2):
        raise FormatError(f"unsupported format (expected {FORMAT} or {FORMAT_2})", fmt_line)
    version = 2 if fmt == FORMAT_2 else 1
    try:
        issued_at = parse_timestamp(issued)
    except ValueError as exc:
        raise FormatError(str(exc), issued_line) from None
    if not seq.isdigit() or seq.startswith("0") or len(seq) > 12:
        raise FormatError(f"bad sequence {seq[:20]!r}", seq_line)
    key_id, signature = _parse_signature(sections[3])
    try:
        blacklist = Blacklist(
            issued_at,
            int(seq),
            _entries(sections[1].entries, containers=True, version=version),
            _entries(sections[2].entries, containers=False, version=version),
        )
    except ValueError as exc:
        raise FormatError(str(exc)) from None
    body_text = "".join(line + "\n" for line in text.split("\n")[: sections[3].line - 1])
    expected = blacklist.serialize_body()
    if body_text != expected:
        for number, (got, want) in enumerate(
            zip(body_text.split("\n"), expected.split("\n"), strict=False), start=1
        ):
            if got != want:
                raise FormatError(f"not in canonical form (expected {want[:70]!r})", number)
        raise FormatError("not in canonical form")
    return SignedBlacklist(blacklist, body_text.encode("utf-8"), key_id, signature)
