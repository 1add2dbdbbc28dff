"""The readable, diff-able license file format ``tessera/1``: strict parser, canonical writer.

The signature covers the exact bytes above ``[SIGNATURE]``. Those bytes must be the
canonical serialization of the document they describe, so there is exactly one signed
spelling of every license: a changed space is as fatal as a changed count, and a parser in
another language needs no normalization rules. ``docs/license-format.md`` is the spec.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime

from tessera.core.errors import FormatError
from tessera.core.model import Binding, Entitlement, Identity, License, Location, MatchLevel
from tessera.core.versions import VersionRange

__all__ = [
    "FORMAT",
    "MAX_FILE_SIZE",
    "SignedDocument",
    "format_timestamp",
    "parse",
    "parse_locations",
    "parse_timestamp",
    "render",
    "serialize_body",
    "serialize_locations",
]

FORMAT = "tessera/1"
MAX_FILE_SIZE = 256 * 1024
KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")

_HEADER_RE = re.compile(r"^\[([A-Z]+)(?: ([^\]\s]+))?\]$")
_ENTRY_RE = re.compile(r"^([^\s=]+) = (\S(?:.*\S)?)$")
_COUNT_RE = re.compile(r"^(0|[1-9][0-9]{0,9})$")
_DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_TS_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")
_INT_RE = re.compile(r"^(0|[1-9][0-9]{0,9})$")

Document = License | Identity


@dataclass(frozen=True, slots=True)
class SignedDocument:
    """A parsed file: the document, the exact signed bytes, and who claims to have signed."""

    document: Document
    body: bytes
    key_id: str
    signature: bytes

    @property
    def kind(self) -> str:
        return "license" if isinstance(self.document, License) else "identity"


# ---------------------------------------------------------------------------- writing


def format_timestamp(value: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ``, to the second (the server signs one per check-in, so
    ``isoformat``, not the five times slower ``strftime``)."""
    return value.astimezone(UTC).replace(tzinfo=None, microsecond=0).isoformat() + "Z"


def _format_entitlement(e: Entitlement) -> str:
    expiry = "permanent" if e.expiry is None else e.expiry.isoformat()
    return f"{e.feature} = {e.count}, {expiry}\n"


def serialize_locations(locations: tuple[Location, ...]) -> str:
    """The ``[LOCATION ...]`` sections alone (the plaintext that sealing encrypts)."""
    out: list[str] = []
    for loc in locations:
        out.append(f"[LOCATION {loc.name}]\n")
        out.extend(_format_entitlement(e) for e in loc.entitlements)
    return "".join(out)


def _license_header(lic: License) -> list[tuple[str, str]]:
    rows: list[tuple[str, str | None]] = [
        ("format", FORMAT),
        ("licensee", lic.licensee),
        ("serial", lic.serial),
        ("product", lic.product),
        ("version", str(lic.version)),
        ("binding", lic.binding.value),
        ("locking-id", lic.locking_id),
        ("match", lic.match.value),
        ("instance-id", lic.instance_id),
        ("user-id", lic.user_id),
        ("agent-key", lic.agent_key),
        ("revision", str(lic.revision)),
        ("issued", format_timestamp(lic.issued)),
        ("connect", "on" if lic.connect else "off"),
        ("validation-hours", str(lic.validation_hours)),
        ("failover-days", str(lic.failover_days)),
        ("checkpoint-days", None if lic.checkpoint_days is None else str(lic.checkpoint_days)),
        ("emergency", ", ".join(lic.emergency) if lic.emergency else None),
        (
            "recovery-allowance",
            None if lic.recovery_allowance is None else str(lic.recovery_allowance),
        ),
        (
            "recovery-interval-days",
            None if lic.recovery_interval_days is None else str(lic.recovery_interval_days),
        ),
    ]
    return [(k, v) for k, v in rows if v is not None]


def _identity_header(par: Identity) -> list[tuple[str, str]]:
    return [
        ("format", FORMAT),
        ("licensee", par.licensee),
        ("serial", par.serial),
        ("product", par.product),
        ("version", str(par.version)),
        ("location", par.location),
        ("instance-id", par.instance_id),
        ("admin-secret", par.admin_secret),
        ("issued", format_timestamp(par.issued)),
    ]


def serialize_body(doc: Document) -> str:
    """The canonical text of everything above ``[SIGNATURE]``: the bytes that get signed."""
    if isinstance(doc, License):
        out = ["[LICENSE]\n"]
        out.extend(f"{k} = {v}\n" for k, v in _license_header(doc))
        if doc.sealed is not None:
            out.append(f"[SEALED]\naes-256-gcm = {doc.sealed}\n")
        else:
            out.append(serialize_locations(doc.locations))
        return "".join(out)
    out = ["[IDENTITY]\n"]
    out.extend(f"{k} = {v}\n" for k, v in _identity_header(doc))
    return "".join(out)


def render(doc: Document, key_id: str, signature: bytes) -> str:
    """The complete file: canonical body plus the signature block."""
    sig = base64.b64encode(signature).decode("ascii")
    return f"{serialize_body(doc)}[SIGNATURE]\nkey-id = {key_id}\ned25519 = {sig}\n"


# ---------------------------------------------------------------------------- reading


@dataclass(slots=True)
class _Section:
    name: str
    arg: str | None
    line: int
    entries: list[tuple[str, str, int]]


def _decode(data: bytes | str) -> str:
    if isinstance(data, str):
        text = data
        if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_SIZE:
            raise FormatError(f"file is larger than {MAX_FILE_SIZE // 1024} KiB")
    else:
        if len(data) > MAX_FILE_SIZE:
            raise FormatError(f"file is larger than {MAX_FILE_SIZE // 1024} KiB")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise FormatError("not UTF-8 text (binary data?)", line) from None
    if not text or text.isspace():  # as "not text.strip()", without the copy
        raise FormatError("file is empty")
    if "\x00" in text:
        raise FormatError("binary data (NUL byte)", text[: text.index("\x00")].count("\n") + 1)
    if text.startswith("\ufeff"):
        raise FormatError("byte-order mark before [LICENSE] (save the file as plain UTF-8)", 1)
    return text


def _split_sections(text: str) -> list[_Section]:
    lines = text.split("\n")
    if lines[-1] != "":
        raise FormatError("incomplete last line (file truncated?)", len(lines))
    lines.pop()
    sections: list[_Section] = []
    has_cr = "\r" in text
    for number, line in enumerate(lines, start=1):
        # Fast path for the common line: an entry inside a section. The checks below would
        # all pass for it (the entry pattern starts with a non-blank key, so only a comment
        # marker can still be wrong); any other line takes the full checks in their order.
        if not has_cr and sections and line[:1] not in ";#[" and (m := _ENTRY_RE.match(line)):
            sections[-1].entries.append((m.group(1), m.group(2), number))
            continue
        if has_cr and "\r" in line:
            raise FormatError("carriage return in line (convert the file to LF line endings)", number)
        if line.startswith("["):
            m = _HEADER_RE.match(line)
            if not m:
                raise FormatError(f"malformed section header {line[:60]!r}", number)
            sections.append(_Section(m.group(1), m.group(2), number, []))
            continue
        if not line.strip():
            raise FormatError("empty line", number)
        if line.lstrip().startswith((";", "#")):
            raise FormatError("comments are not allowed in a signed file", number)
        if not sections:
            raise FormatError("text before the first section", number)
        m = _ENTRY_RE.match(line)
        if not m:
            raise FormatError(f"expected 'key = value', got {line[:60]!r}", number)
        sections[-1].entries.append((m.group(1), m.group(2), number))
    if not sections:
        raise FormatError("no sections")
    return sections


def parse_timestamp(value: str) -> datetime:
    if not _TS_RE.match(value):
        raise ValueError(f"not a UTC timestamp: {value!r} (expected 2026-11-22T10:00:00Z)")
    # The pattern fixed the shape; fromisoformat checks the ranges, 6x faster than strptime,
    # and reads the "Z" as the UTC singleton itself (.replace(tzinfo=UTC) cost 1.5 us more).
    return datetime.fromisoformat(value)


def _parse_date(value: str) -> date:
    if not _DATE_RE.match(value):
        raise ValueError(f"not a date: {value!r} (expected YYYY-MM-DD or permanent)")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not a calendar date: {value!r}") from None


def _parse_int(value: str) -> int:
    if not _INT_RE.match(value):
        raise ValueError(f"not a whole number: {value!r}")
    return int(value)


def _parse_onoff(value: str) -> bool:
    if value not in ("on", "off"):
        raise ValueError(f"expected on or off, got {value!r}")
    return value == "on"


def _parse_list(value: str) -> tuple[str, ...]:
    return tuple(value.split(", "))


def _parse_entitlement(feature: str, value: str) -> Entitlement:
    parts = value.split(", ")
    if len(parts) != 2:
        raise ValueError(f"expected 'count, expiry' for {feature}, got {value!r}")
    if not _COUNT_RE.match(parts[0]):
        raise ValueError(f"bad count {parts[0]!r} for {feature}")
    expiry = None if parts[1] == "permanent" else _parse_date(parts[1])
    return Entitlement(feature, int(parts[0]), expiry)


_LICENSE_KEYS: dict[str, tuple[str, Callable[[str], object]]] = {
    "format": ("format", str),
    "licensee": ("licensee", str),
    "serial": ("serial", str),
    "product": ("product", str),
    "version": ("version", VersionRange.parse),
    "binding": ("binding", Binding),
    "locking-id": ("locking_id", str),
    "match": ("match", MatchLevel),
    "instance-id": ("instance_id", str),
    "user-id": ("user_id", str),
    "agent-key": ("agent_key", str),
    "revision": ("revision", _parse_int),
    "issued": ("issued", parse_timestamp),
    "connect": ("connect", _parse_onoff),
    "validation-hours": ("validation_hours", _parse_int),
    "failover-days": ("failover_days", _parse_int),
    "checkpoint-days": ("checkpoint_days", _parse_int),
    "emergency": ("emergency", _parse_list),
    "recovery-allowance": ("recovery_allowance", _parse_int),
    "recovery-interval-days": ("recovery_interval_days", _parse_int),
}
_LICENSE_REQUIRED = [
    "format",
    "licensee",
    "serial",
    "product",
    "version",
    "binding",
    "match",
    "revision",
    "issued",
    "connect",
    "validation-hours",
    "failover-days",
]

_IDENTITY_KEYS: dict[str, tuple[str, Callable[[str], object]]] = {
    "format": ("format", str),
    "licensee": ("licensee", str),
    "serial": ("serial", str),
    "product": ("product", str),
    "version": ("version", VersionRange.parse),
    "location": ("location", str),
    "instance-id": ("instance_id", str),
    "admin-secret": ("admin_secret", str),
    "issued": ("issued", parse_timestamp),
}


def _read_header(
    section: _Section,
    table: dict[str, tuple[str, Callable[[str], object]]],
    required: list[str] | tuple[str, ...],
) -> tuple[dict[str, object], dict[str, int]]:
    values: dict[str, object] = {}
    lines: dict[str, int] = {}
    for key, raw, line in section.entries:
        if key not in table:
            raise FormatError(f"unknown key {key!r} in [{section.name}]", line)
        if key in lines:
            raise FormatError(f"duplicate key {key!r} (first on line {lines[key]})", line)
        attr, convert = table[key]
        try:
            values[attr] = convert(raw)
        except ValueError as exc:
            raise FormatError(f"{key}: {exc}", line) from None
        lines[key] = line
    for key in required:
        if key not in lines:
            raise FormatError(f"[{section.name}] lacks the required key {key!r}", section.line)
    if values.pop("format") != FORMAT:
        raise FormatError(f"unsupported format (expected {FORMAT})", lines["format"])
    return values, lines


def _build(kind: type[Document], values: dict[str, object], lines: dict[str, int], at: int) -> Document:
    try:
        return kind(**values)  # type: ignore[arg-type]
    except ValueError as exc:
        message = str(exc)
        # Name the line of the key the complaint is about, where one can be found.
        for key, line in lines.items():
            if key.replace("-", " ") in message or key in message:
                raise FormatError(message, line) from None
        raise FormatError(message, at) from None


def _read_locations(sections: list[_Section]) -> tuple[Location, ...]:
    locations: list[Location] = []
    seen: dict[str, int] = {}
    for section in sections:
        if section.arg is None:
            raise FormatError("[LOCATION] needs a name, e.g. [LOCATION main]", section.line)
        if section.arg in seen:
            raise FormatError(
                f"location {section.arg!r} listed twice (first on line {seen[section.arg]})",
                section.line,
            )
        seen[section.arg] = section.line
        entitlements: list[Entitlement] = []
        first: dict[str, int] = {}
        for feature, raw, line in section.entries:
            if feature in first:
                raise FormatError(f"duplicate feature {feature!r} (first on line {first[feature]})", line)
            first[feature] = line
            try:
                entitlements.append(_parse_entitlement(feature, raw))
            except ValueError as exc:
                raise FormatError(str(exc), line) from None
        try:
            locations.append(Location(section.arg, tuple(entitlements)))
        except ValueError as exc:
            raise FormatError(str(exc), section.line) from None
    return tuple(locations)


def parse_locations(text: str) -> tuple[Location, ...]:
    """Parse bare ``[LOCATION ...]`` sections (the plaintext inside a sealed license)."""
    sections = _split_sections(text)
    for section in sections:
        if section.name != "LOCATION":
            raise FormatError(f"unexpected section [{section.name}]", section.line)
    return _read_locations(sections)


def _parse_signature(section: _Section) -> tuple[str, bytes]:
    if section.arg is not None:
        raise FormatError("[SIGNATURE] takes no name", section.line)
    keys = [k for k, _, _ in section.entries]
    if keys != ["key-id", "ed25519"]:
        line = section.entries[0][2] if section.entries else section.line
        for (k, _, ln), want in zip(section.entries, ["key-id", "ed25519"], strict=False):
            if k != want:
                line = ln
                break
        raise FormatError("[SIGNATURE] must hold exactly 'key-id' then 'ed25519'", line)
    (_, key_id, key_line), (_, sig, sig_line) = section.entries
    if not KEY_ID_RE.match(key_id):
        raise FormatError(f"malformed key-id {key_id[:40]!r} (16 hex digits)", key_line)
    try:
        signature = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError("signature is not base64", sig_line) from None
    if len(signature) != 64:
        raise FormatError("signature has the wrong length for Ed25519", sig_line)
    return key_id, signature


def _check_canonical(text: str, body: str) -> None:
    if text == body:
        return
    got, want = text.split("\n"), body.split("\n")
    for number, (g, w) in enumerate(zip(got, want, strict=False), start=1):
        if g != w:
            raise FormatError(f"not in canonical form (expected {w[:70]!r})", number)
    number = min(len(got), len(want))
    raise FormatError("not in canonical form (lines missing or extra)", number)


def parse(data: bytes | str) -> SignedDocument:
    """Parse a signed license (``.lic``) or identity (``.par``) file.

    Checks syntax, value ranges and canonical form; it does *not* check the signature (see
    :func:`tessera.core.verify.verify_signature`). Raises :class:`FormatError` naming the line.
    """
    text = _decode(data)
    signed = _parse_canonical(text)
    if signed is not None:
        return signed
    return _parse_strict(text)


def _parse_strict(text: str) -> SignedDocument:
    """The reference parser: every rule in order, each failure named with its line."""
    sections = _split_sections(text)
    first = sections[0]
    if first.name not in ("LICENSE", "IDENTITY") or first.arg is not None:
        raise FormatError(f"file must start with [LICENSE] or [IDENTITY], not [{first.name}]", first.line)
    signature_at = next((i for i, s in enumerate(sections) if s.name == "SIGNATURE"), None)
    if signature_at is None:
        raise FormatError("missing [SIGNATURE] section (unsigned file?)")
    if signature_at != len(sections) - 1:
        extra = sections[signature_at + 1]
        raise FormatError(f"[{extra.name}] after [SIGNATURE]", extra.line)
    key_id, signature = _parse_signature(sections[-1])
    middle = sections[1:-1]

    doc: Document
    if first.name == "LICENSE":
        values, lines = _read_header(first, _LICENSE_KEYS, _LICENSE_REQUIRED)
        for section in middle:
            if section.name not in ("LOCATION", "SEALED"):
                raise FormatError(f"unknown section [{section.name}]", section.line)
        sealed = [s for s in middle if s.name == "SEALED"]
        if sealed:
            if len(middle) != 1:
                raise FormatError("[SEALED] cannot be mixed with [LOCATION] sections", middle[1].line)
            s = sealed[0]
            if s.arg is not None or [k for k, _, _ in s.entries] != ["aes-256-gcm"]:
                raise FormatError("[SEALED] must hold exactly 'aes-256-gcm'", s.line)
            values["sealed"] = s.entries[0][1]
        else:
            if not middle:
                raise FormatError("a license needs at least one [LOCATION name] section")
            values["locations"] = _read_locations(middle)
        doc = _build(License, values, lines, first.line)
    else:
        values, lines = _read_header(first, _IDENTITY_KEYS, list(_IDENTITY_KEYS))
        if middle:
            raise FormatError(f"unknown section [{middle[0].name}] in an identity file", middle[0].line)
        doc = _build(Identity, values, lines, first.line)

    # Everything above the one line that is exactly "[SIGNATURE]" (checked above: a header
    # without a name, the only SIGNATURE section, never on line 1); a slice, not a re-join.
    body_text = text[: text.index("\n[SIGNATURE]\n") + 1]
    _check_canonical(body_text, serialize_body(doc))
    return SignedDocument(doc, body_text.encode("utf-8"), key_id, signature)


# ---------------------------------------------------------------------------- fast path
#
# Almost every file read is a good one, and a good file is canonical: its body is exactly
# what serialize_body() writes for the document it describes. _parse_canonical() reads such
# a file in one pass, checking each line against the single spelling the writer gives it,
# instead of tokenizing every line generally, building the document and then re-rendering
# it to compare. It accepts a subset of what _parse_strict() accepts, with the same result
# (tests/core/test_fileformat_canonical.py checks this differentially): it gives up (None) at the first
# thing it does not expect, and the strict parser then finds the error and names its line.
# The documents are built with the same validating constructors either way.
#
# Why each accepted line is canonical: header keys must come in the writer's order (the
# order of _LICENSE_KEYS / _IDENTITY_KEYS), each at most once, and the writer writes exactly
# the keys whose value is set. Plain strings are written as read, on/off as read, and the
# emergency list is split and joined on ", "; every other header value goes through a twin
# of its strict converter (_CANONICAL) that also demands it read back exactly as written
# (integers, enum values, the version range, the issued time). Section headers are matched
# literally, and an entitlement line's count and date must read back as written too. No
# value can start or end with a blank (the strict "key = value" pattern): every converter
# or model check refuses one (check_text strips; the others allow no blanks at all).


def _canonical_int(value: str) -> int:
    """_parse_int for the fast path: the number must read back as written."""
    number = int(value) if len(value) <= 10 else -1
    if number < 0 or str(number) != value:
        raise ValueError(value)
    return number


@functools.lru_cache(maxsize=128)  # bounded: a product has a handful of ranges
def _canonical_version(value: str) -> VersionRange:
    """VersionRange.parse for the fast path: only the canonical spelling of a range."""
    version = VersionRange.parse(value)
    if str(version) != value:
        raise ValueError(value)  # not cached: lru_cache keeps results only
    return version


def _canonical_timestamp(value: str) -> datetime:
    """parse_timestamp for the fast path: only the spelling format_timestamp() writes.

    That is strftime, whose %Y does not pad years before 1000 on every platform: those are
    left to the strict parser's exact comparison. From 1000 on, isoformat() (faster) gives
    the same fields, all zero-padded.
    """
    issued = parse_timestamp(value)
    if issued.year < 1000 or issued.isoformat() != value[:-1] + "+00:00":
        raise ValueError(value)
    return issued


# The converters of the fast path: each accepts exactly the spelling the writer gives its
# value (a subset of what the strict converter accepts, with the same result).
_CANONICAL: dict[str, Callable[[str], object]] = {
    "version": _canonical_version,
    "binding": {b.value: b for b in Binding}.__getitem__,
    "match": {m.value: m for m in MatchLevel}.__getitem__,
    "revision": _canonical_int,
    "issued": _canonical_timestamp,
    "validation-hours": _canonical_int,
    "failover-days": _canonical_int,
    "checkpoint-days": _canonical_int,
    "recovery-allowance": _canonical_int,
    "recovery-interval-days": _canonical_int,
}
_Rows = dict[str, tuple[int, str, Callable[[str], object]]]


def _rows(table: dict[str, tuple[str, Callable[[str], object]]]) -> _Rows:
    """key -> (rank in the writer's order, attribute, canonical converter)."""
    return {
        key: (rank, attr, _CANONICAL.get(key, convert))
        for rank, (key, (attr, convert)) in enumerate(table.items())
    }


_LICENSE_ROWS = _rows(_LICENSE_KEYS)
_LICENSE_REQUIRED_ATTRS = frozenset(_LICENSE_KEYS[key][0] for key in _LICENSE_REQUIRED)
_IDENTITY_ROWS = _rows(_IDENTITY_KEYS)
_IDENTITY_REQUIRED_ATTRS = frozenset(attr for attr, _ in _IDENTITY_KEYS.values())
_SIGNATURE_MARK = "\n[SIGNATURE]\nkey-id = "


def _parse_canonical(text: str) -> SignedDocument | None:
    """The document of a canonical, well-formed file; None for anything else."""
    try:
        return _read_canonical(text)
    except (ValueError, TypeError, KeyError, IndexError, FormatError):
        return None  # whatever it is, the strict parser reports it properly


def _read_canonical(text: str) -> SignedDocument | None:
    if "\r" in text:
        return None
    cut = text.find(_SIGNATURE_MARK)
    if cut < 0:
        return None
    # The signature block: exactly "key-id = <16 hex>\ned25519 = <base64>\n" after the mark.
    key_id, nl, rest = text[cut + len(_SIGNATURE_MARK) :].partition("\n")
    if not nl or not rest.startswith("ed25519 = ") or not rest.endswith("\n"):
        return None
    sig = rest[10:-1]
    if "\n" in sig or not KEY_ID_RE.match(key_id):
        return None
    signature = binascii.a2b_base64(sig, strict_mode=True)  # b64decode(validate=True), inlined
    if len(signature) != 64:
        return None

    body = text[: cut + 1]
    lines = body.split("\n")
    lines.pop()  # the body ends with a newline: the last piece is empty
    head = lines[0]
    if head == "[LICENSE]":
        rows, required = _LICENSE_ROWS, _LICENSE_REQUIRED_ATTRS
    elif head == "[IDENTITY]":
        rows, required = _IDENTITY_ROWS, _IDENTITY_REQUIRED_ATTRS
    else:
        return None

    values: dict[str, object] = {}
    last_rank = -1
    count = len(lines)
    i = 1
    while i < count:
        line = lines[i]
        if line[:1] == "[":
            break
        key, _, raw = line.partition(" = ")
        row = rows.get(key)
        if row is None or row[0] <= last_rank or not raw:
            return None
        last_rank, attr, convert = row
        values[attr] = convert(raw)
        i += 1
    if not required <= values.keys() or values.pop("format") != FORMAT:
        return None

    doc: Document
    if head == "[IDENTITY]":
        if i != count:
            return None
        doc = Identity(**values)  # type: ignore[arg-type]
    elif i < count and lines[i] == "[SEALED]":
        if i + 2 != count or not lines[i + 1].startswith("aes-256-gcm = "):
            return None
        values["sealed"] = lines[i + 1][14:]
        doc = License(**values)  # type: ignore[arg-type]
    else:
        if i == count:
            return None
        locations: list[Location] = []
        while i < count:
            line = lines[i]
            if not line.startswith("[LOCATION ") or line[-1] != "]":
                return None
            name = line[10:-1]
            i += 1
            entitlements: list[Entitlement] = []
            while i < count and lines[i][:1] != "[":
                # "<feature> = <count>, <YYYY-MM-DD or permanent>": the count and the date
                # must read back as written (no sign, blank, leading zero, other digits;
                # the one date spelling), the feature is checked by Entitlement.
                feature, _, value = lines[i].partition(" = ")
                number, _, expiry = value.partition(", ")
                amount = int(number) if len(number) <= 10 else -1
                if amount < 0 or str(amount) != number:
                    return None
                if expiry == "permanent":
                    entitlements.append(Entitlement(feature, amount, None))
                else:
                    day = date.fromisoformat(expiry)
                    if day.isoformat() != expiry:
                        return None
                    entitlements.append(Entitlement(feature, amount, day))
                i += 1
            locations.append(Location(name, tuple(entitlements)))
        values["locations"] = tuple(locations)
        doc = License(**values)  # type: ignore[arg-type]
    return SignedDocument(doc, body.encode("utf-8"), key_id, signature)
