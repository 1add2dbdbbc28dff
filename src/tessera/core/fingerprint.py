"""The Locking ID: a tolerant fingerprint of one machine.

Each hardware or system fact (machine-id, DMI UUID, board serial, MAC addresses, CPU, disks,
hostname) becomes one *component*: its kind plus the first 5 bytes of HMAC-SHA256 keyed
with a product-specific salt. No raw serial number or MAC address leaves the machine, and
the same machine has unrelated IDs for two vendors' products.

Matching weighs components (a machine-id says more than a CPU model) and accepts a machine
when enough weight still agrees: all of it (strict), two thirds (medium, the default) or
half (loose). So one replaced NIC or disk keeps the license; a new mainboard does not.

Reading facts never fails: in containers and VMs many sources are missing or unreadable,
and a missing source is simply not a component.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import os
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tessera.core.model import MatchLevel

__all__ = [
    "COMPONENT_KINDS",
    "Component",
    "LicensedMachine",
    "LockingId",
    "MatchResult",
    "collect_facts",
    "locking_id_for",
    "match_locking_ids",
]

_PREFIX = "TL1-"
_HASH_BYTES = 5

#: kind letter -> (description, weight)
COMPONENT_KINDS: dict[str, tuple[str, int]] = {
    "m": ("machine-id", 3),
    "u": ("DMI product UUID", 3),
    "b": ("mainboard serial", 2),
    "n": ("network interface", 2),
    "d": ("disk", 2),
    "c": ("CPU", 1),
    "h": ("hostname", 1),
}


_B32_DIGITS = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", "0123456789abcdefghijklmnopqrstuv")
_B32_RE = re.compile(r"[A-Z2-7]*")


def _canonical_chunks(text: str) -> list[bytes]:
    """The components' bytes (kind letter + digest) of a Locking ID in canonical form."""
    text = text.strip()
    if not text.startswith(_PREFIX) or len(text) > 400:
        raise ValueError("not a Locking ID (expected TL1-...)")
    raw, canonical = _b32decode(text[len(_PREFIX) :])
    step = 1 + _HASH_BYTES
    if not raw or len(raw) % step:
        raise ValueError("not a Locking ID (wrong length)")
    chunks = [raw[i : i + step] for i in range(0, len(raw), step)]
    for chunk in chunks:
        if chr(chunk[0]) not in COMPONENT_KINDS:
            raise ValueError("not a Locking ID (unknown component)")
    # Canonical means: the components strictly ascending (sorted, no duplicates; the
    # bytes of kind letter + digest order exactly as Component does) and the base32
    # spelled exactly as __str__ spells it (no stray bits after the last byte). Checked
    # on the parts, without re-encoding the whole ID through __post_init__ and __str__.
    if not canonical or any(a >= b for a, b in itertools.pairwise(chunks)):
        raise ValueError("not a Locking ID (not canonical)")
    return chunks


def _b32decode(body: str) -> tuple[bytes, bool]:
    """Unpadded RFC 4648 base32 (as ``__str__`` writes it): the bytes, and whether ``body``
    is their canonical spelling (the bits after the last whole byte are zero).

    The standard library's decoder is a Python loop and was the dearest step of parsing an
    ID, which the server does on every request; ``int(..., 32)`` on the same digits is C.
    """
    if len(body) % 8 in (1, 3, 6) or not _B32_RE.fullmatch(body):
        raise ValueError("not a Locking ID (bad characters)")
    if not body:
        return b"", True
    bits = len(body) * 5
    stray = bits % 8
    value = int(body.translate(_B32_DIGITS), 32)
    return (value >> stray).to_bytes(bits // 8, "big"), not value & ((1 << stray) - 1)


@dataclass(frozen=True, slots=True, order=True)
class Component:
    kind: str
    digest: bytes

    @property
    def weight(self) -> int:
        return COMPONENT_KINDS[self.kind][1]

    def __repr__(self) -> str:
        return f"Component({self.kind}:{self.digest.hex()})"


@dataclass(frozen=True, slots=True)
class LockingId:
    """A set of hashed components, spelled ``TL1-<base32>``."""

    components: tuple[Component, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "components", tuple(sorted(set(self.components))))
        if not self.components:
            raise ValueError("a Locking ID needs at least one component")

    def __str__(self) -> str:
        raw = b"".join(self.keys)
        return _PREFIX + base64.b32encode(raw).decode("ascii").rstrip("=")

    @classmethod
    def parse(cls, text: str) -> LockingId:
        chunks = _canonical_chunks(text)
        result = object.__new__(cls)  # already sorted and unique: skip __post_init__'s sort
        object.__setattr__(result, "components", tuple(Component(chr(c[0]), c[1:]) for c in chunks))
        return result

    @staticmethod
    def check(text: str) -> None:
        """Raise ``ValueError`` unless :meth:`parse` would accept ``text``, without building
        the ID: a server checks every request's ID but rarely needs its parts."""
        _canonical_chunks(text)

    @property
    def weight(self) -> int:
        return sum(c.weight for c in self.components)

    @property
    def keys(self) -> tuple[bytes, ...]:
        """Each component as one ``bytes`` (kind letter + digest), what
        :meth:`LicensedMachine.matches` looks up."""
        return tuple(c.kind.encode("ascii") + c.digest for c in self.components)


@dataclass(frozen=True, slots=True)
class MatchResult:
    matched: int
    total: int
    required: int
    level: MatchLevel

    @property
    def ok(self) -> bool:
        return self.matched >= self.required

    def __str__(self) -> str:
        verdict = "matches" if self.ok else "does not match"
        return (
            f"{verdict}: {self.matched} of {self.total} weight agree, "
            f"{self.level.value} needs {self.required}"
        )


def _required(total: int, level: MatchLevel) -> int:
    if level is MatchLevel.STRICT:
        return total
    if level is MatchLevel.MEDIUM:
        return -(-total * 2 // 3)
    return -(-total // 2)


def match_locking_ids(
    licensed: LockingId | str, current: LockingId | str, level: MatchLevel = MatchLevel.MEDIUM
) -> MatchResult:
    """Does the machine ``current`` still count as the machine ``licensed`` was made for?"""
    lic = LockingId.parse(licensed) if isinstance(licensed, str) else licensed
    cur = LockingId.parse(current) if isinstance(current, str) else current
    present = set(cur.components)
    matched = sum(c.weight for c in lic.components if c in present)
    total = lic.weight
    return MatchResult(matched, total, _required(total, MatchLevel(level)), MatchLevel(level))


class LicensedMachine:
    """A licensed Locking ID made ready to be matched against many machines, with the
    verdicts of :func:`match_locking_ids`.

    A license server compares a newly activating machine with every machine bound to the
    license (is it one of them, its hardware changed a little?): thousands of pairs on a
    site license. :func:`match_locking_ids` spends most of a pair's time hashing
    :class:`Component` objects (their hash is Python code) and summing weights it could
    have summed once; here the weights are summed once and keyed by plain ``bytes``
    (:attr:`LockingId.keys`), so a pair is a few dictionary lookups.
    """

    __slots__ = ("_required", "_weights")

    def __init__(self, licensed: LockingId) -> None:
        self._weights = dict(zip(licensed.keys, (c.weight for c in licensed.components), strict=True))
        total = licensed.weight
        self._required = {level: _required(total, level) for level in MatchLevel}

    def matches(self, current: Iterable[bytes], level: MatchLevel = MatchLevel.MEDIUM) -> bool:
        """Does the machine whose :attr:`LockingId.keys` are ``current`` count as this one?"""
        weights = self._weights
        matched = 0
        for key in current:
            weight = weights.get(key)
            if weight is not None:
                matched += weight
        return matched >= self._required[level]

    def __repr__(self) -> str:
        return f"LicensedMachine({len(self._weights)} components, weight {self._required[MatchLevel.STRICT]})"


# ---------------------------------------------------------------------------- facts


def _read(path: str) -> str | None:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace").strip()
    except (OSError, ValueError):
        return None
    return text or None


_BOGUS = {
    "",
    "none",
    "default string",
    "to be filled by o.e.m.",
    "not specified",
    "not applicable",
    "system serial number",
    "0",
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "03000200-0400-0500-0006-000700080009",
}
_VIRTUAL_NIC = re.compile(r"^(lo|veth|docker|br-|virbr|vnet|tun|tap|wg|zt|cni|flannel|cali|kube)")


def _usable(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return None if value.lower() in _BOGUS else value


def _macs(net_dir: str) -> list[str]:
    try:
        names = sorted(os.listdir(net_dir))
    except OSError:
        return []
    out: list[str] = []
    for name in names:
        if _VIRTUAL_NIC.match(name):
            continue
        mac = _read(f"{net_dir}/{name}/address")
        if not mac or mac == "00:00:00:00:00:00" or len(mac) != 17:
            continue
        # Locally administered addresses are made up by software (containers, VMs, bonds).
        try:
            if int(mac[:2], 16) & 0x02:
                continue
        except ValueError:
            continue
        out.append(mac.lower())
    return sorted(set(out))[:4]


def _cpu(cpuinfo: str) -> str | None:
    text = _read(cpuinfo)
    if not text:
        return None
    model = None
    count = 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Processor", "cpu model") and model is None:
            model = value.strip()
        if key == "processor":
            count += 1
    return f"{model}|{count}" if model else None


def _disks(block_dir: str) -> list[str]:
    try:
        names = sorted(os.listdir(block_dir))
    except OSError:
        return []
    out = []
    for name in names:
        if name.startswith(("loop", "ram", "zram", "dm-", "md", "sr", "nbd")):
            continue
        for rel in ("device/serial", "device/wwid", "wwid"):
            serial = _usable(_read(f"{block_dir}/{name}/{rel}"))
            if serial:
                out.append(serial)
                break
    return sorted(set(out))[:2]


def collect_facts(root: str = "/") -> list[tuple[str, str]]:
    """The raw facts of this machine as ``(kind, value)`` pairs; never raises.

    ``root`` lets tests point the reader at a fake ``/etc``, ``/sys`` and ``/proc`` tree.
    The values stay in this process: only their salted hashes form a Locking ID.
    """
    base = root.rstrip("/")
    facts: list[tuple[str, str]] = []
    readers: list[tuple[str, Callable[[], Iterable[str | None]]]] = [
        ("m", lambda: [_read(f"{base}/etc/machine-id") or _read(f"{base}/var/lib/dbus/machine-id")]),
        ("u", lambda: [_read(f"{base}/sys/class/dmi/id/product_uuid")]),
        ("b", lambda: [_read(f"{base}/sys/class/dmi/id/board_serial")]),
        ("n", lambda: _macs(f"{base}/sys/class/net")),
        ("d", lambda: _disks(f"{base}/sys/block")),
        ("c", lambda: [_cpu(f"{base}/proc/cpuinfo")]),
        ("h", lambda: [_read(f"{base}/etc/hostname") or (socket.gethostname() if base == "" else None)]),
    ]
    for kind, reader in readers:
        try:
            values = list(reader())
        except Exception:  # a fingerprint source must never take the product down
            continue
        for value in values:
            usable = _usable(value)
            if usable:
                facts.append((kind, usable.lower() if kind in ("u", "n") else usable))
    return facts


def locking_id_for(facts: Iterable[tuple[str, str]], product: str) -> LockingId:
    """Hash ``facts`` with the product's salt into a Locking ID."""
    salt = b"tessera-locking-id/1\x00" + product.encode("utf-8")
    components = []
    for kind, value in facts:
        if kind not in COMPONENT_KINDS:
            continue
        digest = hmac.new(salt, kind.encode() + b"\x00" + value.encode("utf-8"), hashlib.sha256)
        components.append(Component(kind, digest.digest()[:_HASH_BYTES]))
    if not components:
        # Nothing readable at all (a very locked-down sandbox): fall back to the hostname
        # so the product still runs; the binding is then as weak as the environment.
        fallback = socket.gethostname() or "unknown-host"
        digest = hmac.new(salt, b"h\x00" + fallback.encode(), hashlib.sha256)
        components.append(Component("h", digest.digest()[:_HASH_BYTES]))
    return LockingId(tuple(components))
