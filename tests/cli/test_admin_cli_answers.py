"""The admin client against a broken or impostor server: one line, exit 1, nothing written."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ..server.processes import clean_env, tessera
from .fake_server import fake_server

LID = "TL1-" + "A" * 40

VERBS = {
    "customer create": ["customer", "create", "ACME"],
    "product create": ["product", "create", "p2", "--name", "X", "--feature", "a"],
    "license issue": ["license", "issue", "--customer", "1", "--product", "p", "--feature", "a=1"],
    "license show": ["license", "show", "2026-000001"],
    "license update": ["license", "update", "2026-000001", "--machines", "3"],
    "blacklist add": ["blacklist", "add", LID],
    "license rehost": ["license", "rehost", "2026-000001", "--locking-id", LID, "-o", "out.lic"],
    "blacklist export": ["blacklist", "export", "-o", "out.lic"],
    "license activate-offline": ["license", "activate-offline", "req.json", "-o", "out.lic"],
    "order show": ["order", "show", "PO-1"],
    "order list": ["order", "list"],
    "webhook list": ["webhook", "list"],
    "webhook add": ["webhook", "add", "https://example.invalid/hook"],
    "license credential": ["license", "credential", "2026-000001", "--user", "ann", "-o", "out.lic"],
}


def _run(tmp_path: Path, args: list[str], answer: Any) -> subprocess.CompletedProcess[str]:
    (tmp_path / "req.json").write_text('{"request": 1}')
    with fake_server() as server:
        server.default = (200, answer)
        return tessera(*args, env=clean_env(**server.env()), cwd=tmp_path)


def _unexpected(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the server at http://127.0.0.1:"), lines
    assert "gave an unexpected answer (" in lines[0] and "Traceback" not in result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.mark.parametrize(
    ("answer", "as_json"),
    [([1, 2], True), (None, False), ("x", True), ({}, False)],
    ids=["list-json", "null", "string-json", "empty"],
)
@pytest.mark.parametrize("verb", sorted(VERBS))
def test_an_answer_of_the_wrong_shape_is_one_line(
    tmp_path: Path, verb: str, answer: Any, as_json: bool
) -> None:
    # --json used to print the junk with exit 0; without, a KeyError was "internal error", 70.
    args = VERBS[verb] + (["--json"] if as_json else [])
    _unexpected(_run(tmp_path, args, answer))
    assert not (tmp_path / "out.lic").exists()


@pytest.mark.parametrize(
    ("verb", "answer", "needle"),
    [
        ("customer create", {"id": "7"}, "'id' is text, expected a number"),
        ("customer create", {"id": True}, "'id' is true/false"),
        ("license issue", {"serial": "2026-1"}, "'key' is missing"),
        (
            "license activate-offline",
            {"serial": "2026-000001", "license": "not a license\n", "identity": None},
            "license file does not parse",
        ),
        (
            "license rehost",
            {"serial": "2026-000001", "slot": 1, "locking_id": LID, "reason": "r", "license": "junk"},
            "license file does not parse",
        ),
        (
            "blacklist export",
            {"sequence": 1, "containers": 0, "serials": 0, "file": "[BLACKLIST]\n"},
            "blacklist file does not parse",
        ),
        (
            "order show",
            {"number": "PO-1", "customer_id": 1, "status": "open", "created_at": "2026", "licenses": [1]},
            "licenses: item 0: expected an object, got a number",
        ),
        (
            "license show",
            {
                "serial": "2026-000001",
                "status": "active",
                "revision": 1,
                "licensee": "A",
                "product": "p",
                "machines_allowed": 1,
                "locations": {"main": {"a": 5}},
            },
            "locations.main.a",
        ),
    ],
)
def test_junk_inside_a_well_shaped_answer_is_refused(
    tmp_path: Path, verb: str, answer: Any, needle: str
) -> None:
    assert needle in _unexpected(_run(tmp_path, VERBS[verb], answer))
    assert not (tmp_path / "out.lic").exists()


@pytest.mark.parametrize(
    ("features", "said"), [({"a": ""}, "1 feature\n"), ({"a": "", "b": ""}, "2 features\n")]
)
def test_product_create_counts_in_english(tmp_path: Path, features: dict[str, str], said: str) -> None:
    result = _run(tmp_path, VERBS["product create"], {"code": "p6", "name": "X", "features": features})
    assert result.returncode == 0 and result.stdout == f"product p6 created with {said}", result


def test_blacklist_add_says_when_new_options_were_not_applied(tmp_path: Path) -> None:
    # The server keeps a whole-container entry as it is and answers with it.
    entry = {"locking_id": LID, "scope": "container", "since": "2026-01-02", "delay_days": 0, "reason": "r"}
    args = [*VERBS["blacklist add"], "--revoke-recovered-only", "--delay-days", "5"]
    result = _run(tmp_path, args, entry)
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "was blacklisted already (whole container, delay 0 days" in lines[0]
    assert "(recovered licenses only, delay 5 days) were not applied" in lines[0]
    as_json = _run(tmp_path, [*args, "--json"], entry)
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["applied"] is False
    same = _run(tmp_path, [*VERBS["blacklist add"], "--json"], entry)
    assert same.returncode == 0 and json.loads(same.stdout)["applied"] is True


LONG_LID = "TL1-" + "B" * 200
SHOW = {
    "serial": "2026-000001", "status": "active", "revision": 1, "licensee": "A", "product": "p",
    "machines_allowed": 1, "locations": {"main": {"a": {"count": 1, "expiry": None}}},
    "machines": [{"slot": 1, "locking_id": LONG_LID, "activated_at": "2026-01-01T00:00:00+00:00",
                  "last_checkin_at": None}],
}  # fmt: skip
ENTRY = {"locking_id": LONG_LID, "scope": "container", "since": "2026-01-02", "delay_days": 0, "reason": "r"}
HIT = {"at": "2026-01-02T00:00:00+00:00", "locking_id": LONG_LID, "serial": None, "how": "checkin",
       "action": "locked", "suppressed": 0}  # fmt: skip


@pytest.mark.parametrize(
    ("args", "answer"),
    [
        (VERBS["license show"], SHOW),
        (["blacklist", "list"], [ENTRY]),
        (["report", "blacklist-hits"], [HIT]),
    ],
    ids=["license-show", "blacklist-list", "blacklist-hits"],
)
def test_piped_tables_keep_locking_ids_whole(tmp_path: Path, args: list[str], answer: Any) -> None:
    """Support copies the ID from these tables into `license rehost`: it must not be cut."""
    (tmp_path / "req.json").write_text("{}")
    with fake_server() as server:
        server.default = (200, answer)
        result = tessera(*args, env=clean_env(**server.env(), COLUMNS="80"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert LONG_LID in result.stdout and "…" not in result.stdout


def test_help_is_not_read_as_markup_nor_cut() -> None:
    helped = tessera("--help", env=clean_env(COLUMNS="80"))
    assert "web portal ([interfaces] web_portal)" in helped.stdout
    option = tessera("blacklist", "add", "--help", env=clean_env(COLUMNS="80"))
    assert "--revoke-recovered-only" in option.stdout and "…" not in option.stdout
