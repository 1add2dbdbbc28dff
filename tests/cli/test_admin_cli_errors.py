"""The admin client's failures before and without a server: one line, the right exit code."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ..server.processes import clean_env, free_port, tessera
from .fake_server import fake_server


def _error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.mark.parametrize(
    ("args", "env", "code", "needle"),
    [
        (["customer", "create", "x"], {}, 2, "--url is required"),
        (
            ["customer", "create", "x"],
            {"TESSERA_URL": "https://127.0.0.1:1"},
            2,
            "--token is required",
        ),
        (
            ["customer", "create", "x"],
            {"TESSERA_URL": "ftp://h", "TESSERA_TOKEN": "t"},
            2,
            "https://",
        ),
        (
            [
                "license",
                "issue",
                "--customer",
                "1",
                "--product",
                "p",
                "--feature",
                "a=1,2027-02-30",
            ],
            {"TESSERA_URL": "https://127.0.0.1:1", "TESSERA_TOKEN": "t"},
            2,
            "not a date",
        ),
        (
            ["license", "show", "2026-000001"],
            {
                "TESSERA_URL": "https://127.0.0.1:1",
                "TESSERA_TOKEN": "t",
                "TESSERA_CA": "/nonexistent/ca.pem",
            },
            2,
            "--ca",
        ),
        (
            ["license", "show", "2026-000001"],
            {"TESSERA_URL": "UNREACHABLE", "TESSERA_TOKEN": "t"},
            1,
            "cannot reach",
        ),
        *[
            (["license", "show", "2026-000001"], {"TESSERA_URL": bad, "TESSERA_TOKEN": "t"}, 2, "--url")
            for bad in (
                "https://127.0.0.1:abc",
                "http://127.0.0.1:99999",
                "https://",
                "http://:7790",
                "https://127.0.0.1:0",
                "https://host name:7790",
            )
        ],
        (
            ["license", "show", "2026-000001"],
            {"TESSERA_URL": "https://127.0.0.1:1", "TESSERA_TOKEN": "t", "TESSERA_CA": "/tmp"},
            2,
            "--ca /tmp is a directory, not a CA certificate file",
        ),
        (
            ["webhook", "deliveries", "--status", "bogus"],
            {"TESSERA_URL": "https://127.0.0.1:1", "TESSERA_TOKEN": "t"},
            2,
            "--status must be one of pending, delivered, failed, cancelled, not 'bogus'",
        ),
        (["server", "run", "--data-dir", "nowhere"], {}, 2, "not an initialized data directory"),
        (
            ["server", "init", "--data-dir", "d", "--db", "mysql://u@h/db"],
            {},
            2,
            "unsupported database",
        ),
    ],
)
def test_admin_cli_errors(
    tmp_path: Path, args: list[str], env: dict[str, str], code: int, needle: str
) -> None:
    if env.get("TESSERA_URL") == "UNREACHABLE":
        env = {**env, "TESSERA_URL": f"http://127.0.0.1:{free_port()}"}
    assert needle in _error(tessera(*args, env=clean_env(**env), cwd=tmp_path), code)
    assert not (tmp_path / "d" / "tessera.toml").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["license", "rehost", "2026-000001", "--locking-id", "TL1-AAAAAAAA", "-o", "OUT"],
        ["license", "activate-offline", "req.json", "-o", "OUT"],
        ["blacklist", "export", "-o", "OUT"],
        ["license", "credential", "2026-000001", "--user", "ann", "-o", "OUT"],
    ],
)
@pytest.mark.parametrize("where", ["/proc/nope/x.lic", "DIR", "missing/x.lic", "earlier.lic"])
def test_unwritable_output_is_refused_before_any_request(tmp_path: Path, args: list[str], where: str) -> None:
    """A rehost, a bound slot or a blacklist sequence number cannot be taken back, so a path
    the CLI cannot write must be refused before the server hears of it; so is an existing
    file (an earlier license or credential), which only --force replaces."""
    (tmp_path / "req.json").write_text('{"request": 1}')
    (tmp_path / "DIR").mkdir()
    (tmp_path / "earlier.lic").write_text("earlier work")
    args = [str(tmp_path / where) if a == "OUT" else a for a in args]
    with fake_server() as server:
        result = tessera(*args, env=clean_env(**server.env()), cwd=tmp_path)
        line = _error(result, 2)
        assert where.split("/")[0] in line or "is a directory" in line
        assert server.requests == []  # neither TLS connection got as far as a request
    assert (tmp_path / "earlier.lic").read_text() == "earlier work"
    if where == "earlier.lic":
        assert "exists already (use --force to replace it)" in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["license", "update", "S", "--feature", "uniplex=1", "--feature", "uniplex=2"],
            "feature uniplex is given twice",
        ),
        (
            ["license", "issue", "--customer", "1", "--product", "p", "--feature", "a=1", "--feature", "a=2"],
            "feature a is given twice",
        ),
        (["product", "create", "p2", "--name", "X", "--feature", "a", "--feature", "a=dup"], "given twice"),
        (
            [
                "license",
                "issue",
                "--customer",
                "1",
                "--product",
                "p",
                "--feature",
                "a=1",
                "--emergency-feature",
                "b",
            ],
            "--emergency-feature b: not among the license's features",
        ),
        (
            ["license", "update", "S", "--remove-feature", "uniplex", "--feature", "uniplex=3"],
            "feature uniplex is both removed (--remove-feature) and set (--feature)",
        ),
        (
            ["license", "issue", "--customer", "1", "--product", "p", "--feature", "a=1", "--feature", "b=0"],
            "--feature 'b=0': a new license grants at least 1",
        ),
        (
            [
                "license",
                "issue-bulk",
                "--customer",
                "1",
                "--product",
                "p",
                "--feature",
                "a=0,2099-01-01",
                "--count",
                "2",
                "-o",
                "out.jsonl",
            ],
            "--feature 'a=0,2099-01-01': a new license grants at least 1",
        ),
        (
            [
                "license",
                "issue",
                "--customer",
                "1",
                "--product",
                "p",
                "--feature",
                "a=1",
                "--no-connect",
                "--checkpoint-days",
                "3",
            ],
            "--checkpoint-days: a checkpoint license is renewed by check-ins; not with --no-connect",
        ),
        (
            [
                "license",
                "issue-bulk",
                "--count",
                "2",
                "--customer",
                "1",
                "--product",
                "p",
                "--feature",
                "a=1",
                "--binding",
                "user",
                "--checkpoint-days",
                "3",
                "-o",
                "out.jsonl",
            ],
            "--checkpoint-days: a user-bound license never checks in",
        ),
    ],
)
def test_contradicting_options_are_refused_before_any_request(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    with fake_server() as server:
        assert needle in _error(tessera(*args, env=clean_env(**server.env()), cwd=tmp_path), 2)
        assert server.requests == []  # neither TLS connection got as far as a request


def test_tls_refusals_say_whether_a_ca_was_pinned(tmp_path: Path) -> None:
    """QA: the CLIs said "not signed by the pinned CA" when no CA was pinned (the system's
    CA store was used); and "(check --ca)" after OpenSSL's own words either way."""
    (tmp_path / "other").mkdir()
    with fake_server(tmp_path) as server, fake_server(tmp_path / "other"):
        server.default = (200, {"code": "cortex", "name": "Cortex", "features": {}})
        env = clean_env(**server.env())
        unpinned = _error(tessera("product", "show", "cortex", env=env), 1)
        assert "not trusted by this machine's CA store" in unpinned and "--ca" in unpinned, unpinned
        assert "pinned" not in unpinned.replace("no CA was pinned", "")
        foreign = _error(
            tessera(
                "product", "show", "cortex", env={**env, "TESSERA_CA": str(tmp_path / "other" / "ca.pem")}
            ),
            1,
        )
        assert "is not signed by the CA of --ca" in foreign, foreign
        assert server.requests == []  # neither TLS connection got as far as a request
        right = tessera("product", "show", "cortex", env={**env, "TESSERA_CA": str(tmp_path / "ca.pem")})
        assert right.returncode == 0, right.stderr
