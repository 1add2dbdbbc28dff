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
from tessera.core.fingerprint import LockingId
from tessera.core.model import SERIAL_RE, _check_timestamp
from tessera.core.signing import Keyring, SigningKey

__all__ = ["Blacklist", "BlacklistEntry", "SignedBlacklist", "parse_blacklist", "sign_blacklist"]

MAX_DELAY_DAYS = 3650


@dataclass(frozen=True, slots=True)
class BlacklistEntry:
    """One blacklisted container (Locking ID) or license (serial)."""

    subject: str
    since: date
    delay_days: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.delay_days, bool) or not 0 <= self.delay_days <= MAX_DELAY_DAYS:
            raise ValueError(f"invalid delay for {self.subject}: {self.delay_days!r}")
        if not isinstance(self.since, date) or isinstance(self.since, datetime):
            raise ValueError(f"invalid date for {self.subject}")

    def enforced_from(self) -> date:
        return self.since + timedelta(days=self.delay_days)

    def enforced_on(self, day: date) -> bool:
        return day >= self.enforced_from()


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
        object.__setattr__(self, "serials", tuple(sorted(self.serials, key=lambda e: e.subject)))
        for entries, what in ((self.containers, "container"), (self.serials, "serial")):
            subjects = [e.subject for e in entries]
            if len(set(subjects)) != len(subjects):
                raise ValueError(f"{what} listed twice")
        for e in self.containers:
            LockingId.parse(e.subject)
        for e in self.serials:
            if not SERIAL_RE.match(e.subject):
                raise ValueError(f"invalid serial number: {e.subject!r}")

    def container_entry(self, locking_id: str) -> BlacklistEntry | None:
        for e in self.containers:
            if e.subject == locking_id:
                return e
        return None

    def serial_entry(self, serial: str) -> BlacklistEntry | None:
        for e in self.serials:
            if e.subject == serial:
                return e
        return None

    def serialize_body(self) -> str:
        out = [
            "[BLACKLIST]\n",
            f"format = {FORMAT}\n",
            f"issued = {format_timestamp(self.issued)}\n",
            f"sequence = {self.sequence}\n",
            "[CONTAINERS]\n",
        ]
        out.extend(f"{e.subject} = {e.since.isoformat()}, {e.delay_days}\n" for e in self.containers)
        out.append("[SERIALS]\n")
        out.extend(f"{e.subject} = {e.since.isoformat()}, {e.delay_days}\n" for e in self.serials)
        return "".join(out)


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


def _entries(section_entries: list[tuple[str, str, int]], containers: bool) -> tuple[BlacklistEntry, ...]:
    out: list[BlacklistEntry] = []
    seen: dict[str, int] = {}
    for subject, raw, line in section_entries:
        if subject in seen:
            raise FormatError(f"{subject} listed twice (first on line {seen[subject]})", line)
        seen[subject] = line
        try:
            if containers:
                LockingId.parse(subject)
            elif not SERIAL_RE.match(subject):
                raise ValueError(f"invalid serial number {subject[:40]!r}")
            since, _, delay = raw.partition(", ")
            if not delay.isdigit() or (len(delay) > 1 and delay[0] == "0"):
                raise ValueError(f"expected 'since, delay-days', got {raw[:40]!r}")
            out.append(BlacklistEntry(subject, date.fromisoformat(since), int(delay)))
        except ValueError as exc:
            raise FormatError(str(exc), line) from None
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
    if fmt != FORMAT:
        raise FormatError(f"unsupported format (expected {FORMAT})", fmt_line)
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
            _entries(sections[1].entries, containers=True),
            _entries(sections[2].entries, containers=False),
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
