"""``tessera server init`` and ``tessera server run``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import typer

from tessera.cli._common import console, emit_json, fail
from tessera.cli.apps import server_app
from tessera.server.config import DEFAULT_PORT, ConfigError

__all__ = ["init", "run"]

DEFAULT_DATA_DIR = Path("./var")


@server_app.command("init")
def init(
    data_dir: Path = typer.Option(DEFAULT_DATA_DIR, "--data-dir", help="Where the server keeps its state."),
    db: str | None = typer.Option(
        None,
        "--db",
        help="Database URL (default: SQLite in DATA_DIR; or postgresql+psycopg://...).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Create schema, vendor key, TLS CA + certificate and the first admin token (never asks)."""
    from tessera.server.setup import AlreadyInitialized, initialize

    try:
        result = initialize(data_dir, db, datetime.now(UTC))
    except AlreadyInitialized as exc:
        fail(str(exc))
    except ConfigError as exc:
        fail(str(exc))
    config = result.config
    if as_json:
        emit_json(
            {
                "admin_token": result.admin_token,
                "vendor_key": str(config.vendor_pub),
                "ca": str(config.ca_cert),
                "key_id": result.key_id,
                "data_dir": str(config.data_dir),
                "config": str(config.config_file),
                "passphrase_file": (str(config.passphrase_file) if result.passphrase_generated else None),
            }
        )
        return
    console.print(f"initialized {config.data_dir}")
    console.print(f"vendor keyring   {config.vendor_pub} (key id {result.key_id}; ship it with the product)")
    console.print(f"TLS CA           {config.ca_cert} (agents pin this)")
    if result.passphrase_generated:
        console.print(f"key passphrase   {config.passphrase_file} (generated; keep it safe)")
    console.print(f"admin token      {result.admin_token}")
    console.print("the admin token is shown only this once")


@server_app.command("run")
def run(
    data_dir: Path = typer.Option(DEFAULT_DATA_DIR, "--data-dir", help="An initialized data directory."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(DEFAULT_PORT, "--port", min=1, max=65535),
    no_tls: bool = typer.Option(False, "--no-tls", help="Plain HTTP, for behind a TLS-terminating proxy."),
    workers: int = typer.Option(
        1, "--workers", min=1, max=64, help="Worker processes sharing the port (one per core)."
    ),
) -> None:
    """Serve the Connect protocol and the admin API (HTTPS, TLS 1.2+ by default)."""
    from tessera.server.runner import serve

    try:
        serve(data_dir, host, port, tls=not no_tls, workers=workers)
    except ConfigError as exc:
        fail(str(exc))
