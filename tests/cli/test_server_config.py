"""``tessera.toml``: optional interfaces switched off really are gone; bad config is one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from ..server.processes import clean_env, init_data_dir, running_server, tessera


def test_interfaces_switched_off_in_the_config_are_not_served(tmp_path: Path) -> None:
    data_dir = tmp_path / "srv"
    info = init_data_dir(data_dir)
    config = data_dir / "tessera.toml"
    text = config.read_text()
    assert "admin_api = true" in text and "offline_activation = true" in text
    config.write_text(text.replace("admin_api = true", "admin_api = false"))
    with running_server(data_dir, tls=False) as url:
        headers = {"Authorization": f"Bearer {info['admin_token']}"}
        assert httpx.get(f"{url}/api/v1/licenses", headers=headers).status_code == 404
        assert httpx.post(f"{url}/api/v1/activate-offline", headers=headers, content=b"{}").status_code == 422
        assert httpx.post(f"{url}/api/v1/activate", content=b"{}").status_code == 422
    config.write_text(text.replace("admin_api = true", 'admin_api = "no"'))
    result = tessera("server", "run", "--data-dir", str(data_dir))
    assert result.returncode == 2 and result.stderr.strip().endswith("admin_api must be true or false")
    config.write_text("[server\n")
    result = tessera("server", "run", "--data-dir", str(data_dir))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_bad_tls_files_are_named(tmp_path: Path) -> None:
    """OpenSSL's own words were '[SSL] PEM lib (_ssl.c:3905)': no file, no reason."""
    data_dir = tmp_path / "srv"
    init_data_dir(data_dir)
    cert, key = data_dir / "tls" / "server.pem", data_dir / "tls" / "server.key"
    good_cert, good_key = cert.read_bytes(), key.read_bytes()
    ca_cert = (data_dir / "tls" / "ca.pem").read_bytes()
    for target, junk, needle in (
        (cert, b"garbage\n", f"TLS certificate {cert} is not a PEM certificate"),
        (key, b"garbage\n", f"TLS key {key} is not an unencrypted PEM private key"),
        (cert, ca_cert, f"TLS key {key} does not fit certificate {cert}"),
    ):
        cert.write_bytes(good_cert)
        key.write_bytes(good_key)
        target.write_bytes(junk)
        result = tessera("server", "run", "--data-dir", str(data_dir), "--port", "1")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0] == f"error: {needle}" or lines[0].startswith(f"error: {needle} ("), lines


def test_bad_database_settings_and_unknown_tables_are_one_line(tmp_path: Path) -> None:
    """These ended in 'internal error (ValueError ...)' exit 70, the wrong wording, or were
    silently ignored (an unknown table: a typo like [interface] switched nothing off)."""
    data_dir = tmp_path / "srv"
    init_data_dir(data_dir)
    config = data_dir / "tessera.toml"
    text = config.read_text()
    good = 'database = "sqlite:///tessera.db"'
    assert good in text
    prefix = f"error: {config}: "
    for replacement, message in (
        ('database = "mysql://x"', "[server] database: unsupported database 'mysql' (sqlite or postgresql)"),
        ('database = "not a url"', "[server] database is not a database URL"),
        ("database = 5", "[server] database must be a database URL string"),
        ('database = ""', "[server] database must be a database URL string"),
        ("", "[server] database is missing"),
        (good + "\nport = 7790", "[server] has unknown key 'port'"),
        (good + "\n[nothing]", "unknown table [nothing]"),
        (good + "\n[interface]\nadmin_api = false", "unknown table [interface]"),
    ):
        config.write_text(text.replace(good, replacement))
        result = tessera("server", "run", "--data-dir", str(data_dir), "--port", "1")
        assert result.returncode == 2, (replacement, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(prefix + message), (replacement, lines)
    config.write_text("[server]\ndatabase = 'sqlite:///x.db'\n[server.extra]\n")
    result = tessera("server", "run", "--data-dir", str(data_dir), "--port", "1")
    assert result.returncode == 2 and "[server] has unknown key 'extra'" in result.stderr


def test_run_says_where_it_listens(tmp_path: Path) -> None:
    """`server run` printed nothing at all on start."""
    data_dir = tmp_path / "srv"
    init_data_dir(data_dir)
    with running_server(data_dir, tls=False) as url:
        port = url.rsplit(":", 1)[1]
        log = (data_dir / f"server-{port}.log").read_text()
    assert (
        f"tessera server listening on http://127.0.0.1:{port} "
        f"(data dir {data_dir.resolve()}, database SQLite sqlite:///{data_dir.resolve() / 'tessera.db'})"
    ) in log, log


def test_a_bad_config_is_reported_before_the_server_is_loaded(tmp_path: Path) -> None:
    """`server run` imported the web framework and the database layer (about a second of
    CPU) before it read tessera.toml, so each mistake in it took that long to report."""
    data_dir = tmp_path / "srv"
    data_dir.mkdir()
    (data_dir / "tessera.toml").write_text('[server]\ndatabase = "sqlite:///tessera.db"\n[nothing]\n')
    probe = (
        "import sys\n"
        "from tessera.cli.main import run\n"
        f"sys.argv = ['tessera', 'server', 'run', '--data-dir', {str(data_dir)!r}, '--port', '1']\n"
        "try:\n"
        "    run()\n"
        "except SystemExit as exc:\n"
        "    loaded = [m for m in ('uvicorn', 'fastapi', 'sqlalchemy', 'alembic') if m in sys.modules]\n"
        "    print(exc.code, loaded)\n"
    )
    command = [sys.executable, "-c", probe]
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.strip() == "2 []", (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    config = data_dir / "tessera.toml"
    assert len(lines) == 1 and lines[0].startswith(f"error: {config}: unknown table [nothing]"), lines
