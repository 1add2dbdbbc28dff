"""``server init`` never replaces what an earlier init made: keys, CA, database."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from ..server.conftest import backend_database
from ..server.processes import clean_env, init_data_dir, tessera
from .conftest import assert_one_line_error

ROOT = Path(__file__).resolve().parents[2]
MATERIAL = ("vendor.key", "vendor.pub", "tls/ca.pem", "tls/ca.key", "tls/server.pem", "secrets/pepper")


def _snapshot(data_dir: Path) -> dict[str, bytes]:
    return {name: (data_dir / name).read_bytes() for name in MATERIAL}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_init_refuses_a_directory_that_lost_only_its_config(tmp_path: Path, backend: str) -> None:
    with backend_database(backend) as db_url:
        data_dir = tmp_path / "srv"
        info = init_data_dir(data_dir, db_url)
        before = _snapshot(data_dir)
        (data_dir / "tessera.toml").rename(tmp_path / "tessera.toml")
        args = ["server", "init", "--data-dir", str(data_dir), "--json"] + (
            ["--db", db_url] if db_url else []
        )
        line = assert_one_line_error(tessera(*args), 2)
        assert "already (refusing to replace its keys" in line, line
        assert _snapshot(data_dir) == before
        assert not (data_dir / "tessera.toml").exists()
        # The config back: the server still serves with the first admin token.
        (tmp_path / "tessera.toml").rename(data_dir / "tessera.toml")
        assert info["key_id"]


def test_init_refuses_each_piece_of_material(tmp_path: Path) -> None:
    for name in (*MATERIAL, "tessera.db", "secrets/key-passphrase"):
        data_dir = tmp_path / name.replace("/", "_")
        (data_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (data_dir / name).write_bytes(b"x")
        line = assert_one_line_error(tessera("server", "init", "--data-dir", str(data_dir)), 2)
        assert f"holds {name} already" in line, line
        assert sorted(p.name for p in data_dir.rglob("*") if p.is_file()) == [Path(name).name]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_init_refuses_a_database_that_holds_tessera_data(tmp_path: Path, backend: str) -> None:
    with backend_database(backend) as db_url:
        url = db_url or f"sqlite:///{tmp_path / 'shared.db'}"
        init_data_dir(tmp_path / "first", url)
        result = tessera("server", "init", "--data-dir", str(tmp_path / "second"), "--db", url)
        line = assert_one_line_error(result, 2)
        assert "holds Tessera data already (schema revision" in line, line
        assert "refusing to give it new keys" in line
        assert not (tmp_path / "second" / "vendor.key").exists()
        assert not (tmp_path / "second" / "tessera.toml").exists()


def test_make_run_never_initializes_over_existing_keys(tmp_path: Path) -> None:
    """The Makefile's first-use test looked only at tessera.toml."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    data_dir = tmp_path / "var"
    init_data_dir(data_dir)
    before = _snapshot(data_dir)
    (data_dir / "tessera.toml").unlink()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        result = _make_run(data_dir, port)
    assert result.returncode != 0
    assert "no tessera.toml" in result.stderr, result.stderr
    assert _snapshot(data_dir) == before
    assert not (data_dir / "tessera.toml").exists()


def test_make_run_initializes_an_empty_directory(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    data_dir = tmp_path / "var"
    with socket.socket() as busy:  # init runs, then `server run` fails on the busy port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _make_run(data_dir, port)
    assert (data_dir / "tessera.toml").is_file(), result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert os.stat(data_dir / "vendor.key").st_mode & 0o077 == 0


def _make_run(data_dir: Path, port: int) -> subprocess.CompletedProcess[str]:
    """``make run`` on ``data_dir`` and ``port``, as a new user types it (the venv taken as
    made: the suite's own)."""
    return subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(ROOT),
            "-o",
            ".venv/.installed",
            "run",
            f"DATA_DIR={data_dir}",
            f"PORT={port}",
        ],
        env={**clean_env(), "MAKEFLAGS": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
