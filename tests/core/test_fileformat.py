from __future__ import annotations

import contextlib
from datetime import UTC, date, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.core import SigningKey, sign_document
from tessera.core.errors import FormatError
from tessera.core.fileformat import parse, serialize_body
from tessera.core.model import Entitlement, License, Location
from tessera.core.versions import VersionRange

from .strategies import documents

KEY = SigningKey.from_raw(bytes(range(32)))


def sample() -> License:
    return License(
        licensee="myCompany, City",
        serial="2026-000123",
        product="cortex",
        version=VersionRange.parse("4.*"),
        issued=datetime(2026, 11, 22, 10, 0, tzinfo=UTC),
        locking_id="TL1-MN5F5RR7ZNUDCUDRKWSW3QJFJJ3AG",
        locations=(
            Location(
                "abc",
                (
                    Entitlement("backup", 1, date(2027, 1, 15)),
                    Entitlement("uniplex", 5, date(2027, 1, 15)),
                    Entitlement("ctxjs", 1, None),
                ),
            ),
        ),
    )


def signed_text() -> str:
    return sign_document(sample(), KEY)


@given(documents)
def test_parse_serialize_round_trip(doc: License) -> None:
    text = sign_document(doc, KEY)
    parsed = parse(text)
    assert parsed.document == doc
    assert parsed.body == serialize_body(doc).encode()
    assert parse(text.encode()).document == doc


def test_sample_file_reads_like_the_spec() -> None:
    text = signed_text()
    assert text.startswith("[LICENSE]\nformat = tessera/1\nlicensee = myCompany, City\n")
    assert "[LOCATION abc]\nbackup = 1, 2027-01-15\nuniplex = 5, 2027-01-15\nctxjs = 1, permanent\n" in text
    assert text.endswith("\n") and "\n[SIGNATURE]\nkey-id = " in text


def _replace_line(text: str, number: int, new: str | None) -> str:
    lines = text.split("\n")
    if new is None:
        del lines[number - 1]
    else:
        lines[number - 1] = new
    return "\n".join(lines)


def _line_of(text: str, prefix: str) -> int:
    return next(i for i, line in enumerate(text.split("\n"), 1) if line.startswith(prefix))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: _replace_line(t, _line_of(t, "backup"), "backup = x, 2027-01-15"), "bad count"),
        (lambda t: _replace_line(t, _line_of(t, "backup"), "backup = 1, 2027-02-30"), "calendar date"),
        (lambda t: _replace_line(t, _line_of(t, "backup"), "backup = 1, 15.01.2027"), "not a date"),
        (lambda t: _replace_line(t, _line_of(t, "backup"), "backup = -1, permanent"), "bad count"),
        (lambda t: _replace_line(t, _line_of(t, "backup"), "uniplex = 1, permanent"), "duplicate feature"),
        (lambda t: _replace_line(t, _line_of(t, "product"), "colour = blue"), "unknown key 'colour'"),
        (lambda t: _replace_line(t, _line_of(t, "product"), "serial = 2026-000124"), "duplicate key"),
        (lambda t: _replace_line(t, _line_of(t, "[LOCATION"), "[EXTRAS abc]"), "unknown section"),
        (lambda t: _replace_line(t, _line_of(t, "backup"), "backup=1, permanent"), "expected 'key = value'"),
        (lambda t: _replace_line(t, _line_of(t, "backup"), ""), "empty line"),
        (lambda t: _replace_line(t, _line_of(t, "backup"), "; comment"), "comments"),
        (lambda t: _replace_line(t, _line_of(t, "issued"), "issued = 2026-11-22 10:00"), "timestamp"),
        (lambda t: _replace_line(t, _line_of(t, "binding"), "binding = dongle"), "binding"),
        (lambda t: _replace_line(t, _line_of(t, "ed25519"), "ed25519 = !!!"), "base64"),
        (lambda t: _replace_line(t, _line_of(t, "key-id"), "key-id = xyz"), "key-id"),
        (lambda t: _replace_line(t, _line_of(t, "product"), None), "lacks the required key 'product'"),
    ],
)
def test_malformed_files_name_the_line(edit, message: str) -> None:  # type: ignore[no-untyped-def]
    text = signed_text()
    bad = edit(text)
    with pytest.raises(FormatError) as info:
        parse(bad)
    assert message in str(info.value)
    assert info.value.line is not None
    assert str(info.value).startswith(f"line {info.value.line}: ")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\x00\x01\x02binary", "binary"),
        (b"\xff\xfe\x00garbage", "UTF-8"),
        (b"[LICENSE]\nformat = tessera/1", "incomplete last line"),
        (b"hello world\n", "text before the first section"),
        (b"[LICENSE]\r\nformat = tessera/1\r\n", "carriage return"),
        (b"x" * (300 * 1024), "larger than"),
    ],
)
def test_unreadable_input(data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse(data)


def test_missing_signature() -> None:
    text = signed_text()
    body = text[: text.index("[SIGNATURE]")]
    with pytest.raises(FormatError, match="missing \\[SIGNATURE\\]"):
        parse(body)


def test_section_after_signature_is_rejected() -> None:
    with pytest.raises(FormatError, match="after \\[SIGNATURE\\]"):
        parse(signed_text() + "[LOCATION x]\nfoo = 1, permanent\n")


def test_truncated_file_is_rejected() -> None:
    text = signed_text()
    for cut in (10, len(text) // 2, len(text) - 5):
        with pytest.raises(FormatError):
            parse(text[:cut])


def test_non_canonical_order_is_rejected() -> None:
    text = signed_text()
    lines = text.split("\n")
    a, b = _line_of(text, "serial") - 1, _line_of(text, "product") - 1
    lines[a], lines[b] = lines[b], lines[a]
    with pytest.raises(FormatError, match="canonical"):
        parse("\n".join(lines))


@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_parser(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        parse(data)


@given(st.data())
def test_random_line_edits_never_crash_the_parser(data: st.DataObject) -> None:
    lines = signed_text().split("\n")
    i = data.draw(st.integers(0, len(lines) - 1))
    lines[i] = data.draw(st.text(max_size=80))
    with contextlib.suppress(FormatError):
        parse("\n".join(lines))
