"""What the admin CLI puts into a URL path: one segment per identifier, whatever is typed."""

from __future__ import annotations

import pytest

from tessera.cli._common import EXIT_BAD_INPUT, CliError
from tessera.cli.admin import _seg


def test_a_slash_in_an_identifier_is_bad_input() -> None:
    # The server decodes %2F before routing: `license show 2026-000001/revisions` printed
    # the revisions list.
    for value in ("2026-000001/revisions", "a/b", "/", "..", ""):
        with pytest.raises(CliError) as caught:
            _seg(value)
        assert caught.value.code == EXIT_BAD_INPUT


def test_other_characters_are_quoted() -> None:
    assert _seg("2026-000001") == "2026-000001"
    assert _seg("a?b#c d%") == "a%3Fb%23c%20d%25"
