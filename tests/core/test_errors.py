"""How an error message repeats what a user typed: recognizably, never whole when long."""

from __future__ import annotations

from tessera.core.errors import SHOWN_CHARS, clipped, shown


def test_shown_quotes_short_values_and_cuts_long_ones() -> None:
    assert shown("bob") == "'bob'"
    assert shown(42) == "42"
    assert shown("x" * SHOWN_CHARS) == repr("x" * SHOWN_CHARS)
    assert shown("x" * 100_000) == repr("x" * SHOWN_CHARS + "…")
    assert shown("a\nb" * 50_000).count("\n") == 0  # escaped: the line stays one line
    assert len(shown(["y" * 1000])) == SHOWN_CHARS + 1


def test_clipped_cuts_and_escapes_unquoted_text() -> None:
    assert clipped("/srv/state") == "/srv/state"
    assert clipped("z" * 500, 10) == "z" * 10 + "…"
    assert clipped("a\nb") == "a\\nb"
