"""Product version ranges, as written in a license's ``version`` field.

A range is one or more comma-separated clauses that must all hold:
``4.*`` (any 4.x.y), ``4.2`` (exactly 4.2, i.e. 4.2.0), ``>=4.1``, ``<5``, ``==4.2.1``, ``*``.
Versions compare as tuples of integers, missing parts counting as zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tessera.core.errors import shown

__all__ = ["Version", "VersionRange", "parse_version"]

_VERSION = re.compile(r"^(0|[1-9][0-9]{0,8})(\.(0|[1-9][0-9]{0,8})){0,3}$")
_CLAUSE = re.compile(r"^(?:(?P<op>>=|<=|==|>|<)?(?P<ver>[0-9][0-9.]*?)(?P<wild>\.\*)?|(?P<all>\*))$")

Version = tuple[int, ...]


def parse_version(text: str) -> Version:
    """Parse ``4.2.1``; raise ``ValueError`` for anything else."""
    if not _VERSION.match(text):
        raise ValueError(f"not a version number: {shown(text)} (expected e.g. 4.2.1)")
    return tuple(int(p) for p in text.split("."))


def _pad(v: Version, n: int) -> Version:
    return v + (0,) * (n - len(v))


def _cmp(a: Version, b: Version) -> int:
    n = max(len(a), len(b))
    pa, pb = _pad(a, n), _pad(b, n)
    return (pa > pb) - (pa < pb)


@dataclass(frozen=True, slots=True)
class _Clause:
    op: str  # one of ==, >=, <=, >, <, prefix, all
    version: Version

    def holds(self, v: Version) -> bool:
        if self.op == "all":
            return True
        if self.op == "prefix":
            return _pad(v, len(self.version))[: len(self.version)] == self.version
        c = _cmp(v, self.version)
        return {
            "==": c == 0,
            ">=": c >= 0,
            "<=": c <= 0,
            ">": c > 0,
            "<": c < 0,
        }[self.op]

    def __str__(self) -> str:
        text = ".".join(str(p) for p in self.version)
        if self.op == "all":
            return "*"
        if self.op == "prefix":
            return f"{text}.*"
        if self.op == "==":
            return text
        return f"{self.op}{text}"


@dataclass(frozen=True, slots=True)
class VersionRange:
    """An immutable, canonical version range; ``str()`` gives its canonical spelling."""

    clauses: tuple[_Clause, ...]

    @classmethod
    def parse(cls, text: str) -> VersionRange:
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or any(not p for p in parts):
            raise ValueError(f"not a version range: {shown(text)} (expected e.g. 4.* or >=4.1, <5)")
        clauses: list[_Clause] = []
        for part in parts:
            m = _CLAUSE.match(part)
            if not m:
                raise ValueError(f"not a version range clause: {shown(part)}")
            if m.group("all"):
                clauses.append(_Clause("all", ()))
                continue
            version = parse_version(m.group("ver"))
            if m.group("wild"):
                if m.group("op"):
                    raise ValueError(f"a wildcard cannot follow an operator: {shown(part)}")
                clauses.append(_Clause("prefix", version))
            else:
                clauses.append(_Clause(m.group("op") or "==", version))
        return cls(tuple(clauses))

    def contains(self, version: str | Version) -> bool:
        v = parse_version(version) if isinstance(version, str) else version
        return all(c.holds(v) for c in self.clauses)

    def __str__(self) -> str:
        return ", ".join(str(c) for c in self.clauses)

    def __repr__(self) -> str:
        return f"VersionRange({str(self)!r})"
