"""The fast reader of canonical files agrees with the strict parser, byte for byte.

``parse()`` first tries ``_parse_canonical()``, which reads a canonical file in one pass and
gives up (None) on anything unusual; the strict parser then decides and names the line. That
is only sound if the fast reader never accepts what the strict one refuses, and never reads
a file differently: these tests compare the two on good files and on many near-misses.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tessera.core import SigningKey, sign_document
from tessera.core.errors import FormatError
from tessera.core.fileformat import _decode, _parse_canonical, _parse_strict, parse
from tessera.core.model import Identity, License

from .strategies import documents
from .test_fileformat import sample

KEY = SigningKey.from_raw(bytes(range(32)))

# Characters that sit on the edges of the rules: spaces of every kind, separators, line
# ends, digits that are not ASCII, brackets, the signs of a timestamp.
TRICKY = [" ", "  ", "\t", "\u00a0", "\u2003", "\x0b", "\x1c", "\x85", "\r", "=", " = ", ",", ", "]
TRICKY += ["0", "9", "\u0661", "\uff11", "[", "]", "Z", "T", ":", "-", ".", "*", "/", "+", "x", "é", ""]


def outcome(read: Any, text: str) -> object:
    try:
        return read(text)
    except FormatError as exc:
        return ("error", exc.line, str(exc))


def assert_agree(text: str) -> None:
    decoded = outcome(_decode, text)  # parse() decodes first, for both readers
    if not isinstance(decoded, str):
        assert outcome(parse, text) == decoded
        return
    strict = outcome(_parse_strict, decoded)
    fast = _parse_canonical(decoded)
    if fast is not None:
        assert fast == strict, "the fast reader read a file differently from the strict parser"
    try:
        assert outcome(parse, text) == strict
    except FormatError:
        raise AssertionError("parse() raised outside the strict parser") from None


def signed(doc: License | Identity) -> str:
    return sign_document(doc, KEY)


@given(documents)
def test_every_canonical_file_takes_the_fast_path_with_the_same_result(doc: License | Identity) -> None:
    text = signed(doc)
    fast = _parse_canonical(text)
    assert fast is not None
    assert fast == _parse_strict(text)
    assert fast.document == doc


def test_a_sealed_license_takes_the_fast_path() -> None:
    text = signed(sample().evolve(locations=(), sealed="QUJDRA=="))
    fast = _parse_canonical(text)
    assert fast is not None and fast == _parse_strict(text)


@given(documents, st.data())
def test_a_changed_line_is_read_alike_by_both(doc: License | Identity, data: st.DataObject) -> None:
    lines = signed(doc).split("\n")
    i = data.draw(st.integers(0, len(lines) - 2))
    line = lines[i]
    at = data.draw(st.integers(0, len(line)))
    kind = data.draw(st.sampled_from(["insert", "replace", "delete-char", "random", "drop", "dup", "swap"]))
    if kind == "insert":
        lines[i] = line[:at] + data.draw(st.sampled_from(TRICKY)) + line[at:]
    elif kind == "replace":
        lines[i] = line[:at] + data.draw(st.sampled_from(TRICKY)) + line[at + 1 :]
    elif kind == "delete-char":
        lines[i] = line[:at] + line[at + 1 :]
    elif kind == "random":
        lines[i] = data.draw(st.text(max_size=60))
    elif kind == "drop":
        del lines[i]
    elif kind == "dup":
        lines.insert(i, line)
    else:
        j = data.draw(st.integers(0, len(lines) - 2))
        lines[i], lines[j] = lines[j], line
    assert_agree("\n".join(lines))


EDGE_LINES = [
    ("issued", "issued = 0999-01-01T00:00:00Z"),  # strftime does not pad the year everywhere
    ("issued", "issued = 2026-11-22T24:00:00Z"),
    ("issued", "issued = 2026-11-22T10:00:00+00:00"),
    ("issued", "issued = 2026-11-22t10:00:00z"),
    ("version", "version = >= 4.1"),
    ("version", "version = 4.*,<5"),
    ("version", "version = 04.*"),
    ("revision", "revision = 01"),
    ("revision", "revision = +1"),
    ("revision", "revision = 1_0"),
    ("revision", "revision = \u0661"),
    ("connect", "connect = On"),
    ("binding", "binding = MACHINE"),
    ("licensee", "licensee = myCompany, City "),
    ("licensee", "licensee =  myCompany, City"),
    ("licensee", "licensee = my\u00a0Company"),
    ("backup", "backup = 1,2027-01-15"),
    ("backup", "backup = 1, 2027-01-15, 2027-01-16"),
    ("backup", "backup = 01, 2027-01-15"),
    ("backup", "backup = 1000000001, 2027-01-15"),
    ("backup", "backup = 1, 2027-1-15"),
    ("backup", "backup = 1, permanent "),
    ("backup", "backup = 1, Permanent"),
    ("backup", "backup = 1, 20270115"),
    ("backup", "backup = 1, 2027-01-15\r"),
    ("backup", "backup\t= 1, 2027-01-15"),
    ("[LOCATION", "[LOCATION  abc]"),
    ("[LOCATION", "[LOCATION abc ]"),
    ("[LOCATION", "[LOCATION]"),
    ("[LOCATION", "[location abc]"),
    ("key-id", "key-id = " + "A" * 16),
    ("ed25519", "ed25519 = " + "A" * 86 + "=="),
    ("ed25519", "ed25519 =  " + "A" * 86 + "=="),
]


def test_edge_lines_are_read_alike_by_both() -> None:
    text = signed(sample())
    lines = text.split("\n")
    for prefix, new in EDGE_LINES:
        i = next(n for n, line in enumerate(lines) if line.startswith(prefix))
        edited = "\n".join([*lines[:i], new, *lines[i + 1 :]])
        assert_agree(edited)


def test_whole_file_edits_are_read_alike_by_both() -> None:
    text = signed(sample())
    body, _, block = text.partition("[SIGNATURE]\n")
    variants = [
        text + "\n",
        text + "[LOCATION x]\nfoo = 1, permanent\n",
        text[:-1],
        text.replace("\n", "\r\n"),
        "\ufeff" + text,
        body + "[SIGNATURE]\n" + block.replace("key-id", "ed25519", 1),
        body + body + "[SIGNATURE]\n" + block,
        body + "[SIGNATURE]\n" + block + "[SIGNATURE]\n" + block,
        body + "[SIGNATURE]\n" + block.replace("\ned25519", "\nextra = 1\ned25519"),
        text.replace("[LICENSE]", "[IDENTITY]"),
        text.replace("[LICENSE]", "[LICENSE x]"),
        body.replace("[LOCATION abc]\n", "[LOCATION abc]\n[SEALED]\naes-256-gcm = QUJD\n")
        + "[SIGNATURE]\n"
        + block,
        body.split("[LOCATION")[0] + "[SEALED]\naes-256-gcm = QUJD\n[LOCATION abc]\n[SIGNATURE]\n" + block,
        body.split("[LOCATION")[0] + "[SIGNATURE]\n" + block,
        body + "[LOCATION abc]\n[SIGNATURE]\n" + block,
        body + "[LOCATION empty]\n[SIGNATURE]\n" + block,
    ]
    for variant in variants:
        assert_agree(variant)
