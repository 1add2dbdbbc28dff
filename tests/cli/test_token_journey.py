"""``tessera token list`` and ``tessera token revoke`` against a real server process: the
security checklist's ``initial-token-revoked`` turns to yes once the token of ``server init``
is revoked through the product (SQLite, and PostgreSQL when configured)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ..server.conftest import backend_database
from ..server.processes import clean_env, init_data_dir, running_server, tessera
from .conftest import assert_one_line_error


def _initial_token_measure(data_dir: Path) -> str:
    result = tessera("security", "checklist", "--data-dir", str(data_dir), "--format", "json")
    assert result.returncode == 0, result.stderr
    every = {m["id"]: m for m in json.loads(result.stdout)["measures"]}
    executed: str = every["initial-token-revoked"]["executed"]
    return executed


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_revoking_the_initial_token_satisfies_the_checklist(tmp_path: Path, backend: str) -> None:
    with backend_database(backend) as db_url:
        data_dir = tmp_path / "var"
        info = init_data_dir(data_dir, db_url)
        assert _initial_token_measure(data_dir) == "no"
        ca = str(data_dir / "tls" / "ca.pem")
        with running_server(data_dir, ca=ca) as url:
            env = clean_env(TESSERA_URL=url, TESSERA_TOKEN=info["admin_token"], TESSERA_CA=ca)

            def cli(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
                return tessera(*args, env={**env, **({"TESSERA_TOKEN": token} if token else {})})

            made = cli("token", "create", "--role", "admin", "--name", "ops", "--json")
            assert made.returncode == 0, made.stderr
            ops = json.loads(made.stdout)["token"]
            listed = cli("token", "list", "--json")
            assert listed.returncode == 0, listed.stderr
            tokens = {t["name"]: t for t in json.loads(listed.stdout)["tokens"]}
            assert set(tokens) == {"initial-admin", "ops"}
            assert info["admin_token"] not in listed.stdout and ops not in listed.stdout
            table = cli("token", "list")
            assert table.returncode == 0 and "initial-admin" in table.stdout and "active" in table.stdout

            initial = tokens["initial-admin"]["id"]
            # Refused: an unknown id (404, exit 1), not an id (exit 2); nothing changes.
            assert "not found" in assert_one_line_error(cli("token", "revoke", "999999"), 1)
            assert_one_line_error(cli("token", "revoke", "abc"), 2)
            assert_one_line_error(cli("token", "revoke", "0"), 2)

            revoked = cli("token", "revoke", str(initial), token=ops)
            assert revoked.returncode == 0, revoked.stderr
            assert f"token {initial} (initial-admin) revoked" in revoked.stdout
            assert "no longer works" not in revoked.stdout
            assert "not authorized" in assert_one_line_error(cli("token", "list"), 1)
            after = json.loads(cli("token", "list", "--json", token=ops).stdout)["tokens"]
            assert {t["name"]: t["revoked"] for t in after} == {"initial-admin": True, "ops": False}
            # The last admin token cannot go (nobody could make another one).
            ops_id = tokens["ops"]["id"]
            assert "last active admin token" in assert_one_line_error(
                cli("token", "revoke", str(ops_id), token=ops), 1
            )
        assert _initial_token_measure(data_dir) == "yes"
