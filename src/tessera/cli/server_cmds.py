"""``tessera server init`` and ``tessera server run``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import typer

from tessera.cli._common import cli_path, console, emit_json, fail
from tessera.cli.apps import server_app
from tessera.server.config import DEFAULT_PORT, ConfigError

__all__ = ["init", "run"]

DEFAULT_DATA_DIR = Path("./var")


@server_app.command("init")
def init(
    data_dir: Path = typer.Option(
        DEFAULT_DATA_DIR, "--data-dir", help="Where the server keeps its state.", parser=cli_path
    ),
    db: str | None = typer.Option(
        None,
        "--db",
        help="Database URL (default: SQLite in DATA_DIR; or postgresql+psycopg://...).",
    ),
    hsm_module: Path | None = typer.Option(
        None,
        "--hsm-module",
        help="Make the vendor key in an HSM: its PKCS#11 module (with --hsm-token).",
        parser=cli_path,
    ),
    hsm_token: str | None = typer.Option(None, "--hsm-token", help="The HSM token's label."),
    hsm_key: str = typer.Option("tessera-vendor", "--hsm-key", help="The vendor key's label in the token."),
    web_portal: bool = typer.Option(
        False, "--web-portal", help="Switch the web portal (/portal) on; off by default."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Create schema, vendor key, TLS CA + certificate and the first admin token (never asks).

    With --hsm-module and --hsm-token the vendor key is made inside that PKCS#11 token and
    never leaves it; the token's PIN comes from TESSERA_HSM_PIN or TESSERA_HSM_PIN_FILE.
    """
    from tessera.server.config import HsmConfig
    from tessera.server.setup import AlreadyInitialized, initialize

    if (hsm_module is None) != (hsm_token is None):
        fail("--hsm-module and --hsm-token go together")
    hsm = None
    if hsm_module is not None and hsm_token is not None:
        if not hsm_token.strip() or not hsm_key.strip():
            fail("--hsm-token and --hsm-key must not be empty")
        hsm = HsmConfig(module=hsm_module.absolute(), token=hsm_token, key=hsm_key)
    try:
        result = initialize(data_dir, db, datetime.now(UTC), hsm, web_portal=web_portal)
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
                "hsm": None if hsm is None else {"token": hsm.token, "key": hsm.key},
                "ca": str(config.ca_cert),
                "key_id": result.key_id,
                "data_dir": str(config.data_dir),
                "config": str(config.config_file),
                "passphrase_file": (str(config.passphrase_file) if result.passphrase_generated else None),
                "web_portal": config.web_portal,
            }
        )
        return
    console.print(f"initialized {config.data_dir}")
    console.print(f"vendor keyring   {config.vendor_pub} (key id {result.key_id}; ship it with the product)")
    if hsm is not None:
        console.print(f"vendor key       in HSM token {hsm.token!r}, label {hsm.key!r} (never leaves it)")
    console.print(f"TLS CA           {config.ca_cert} (agents pin this)")
    if result.passphrase_generated:
        console.print(f"key passphrase   {config.passphrase_file} (generated; keep it safe)")
    if config.web_portal:
        console.print("web portal       on at /portal (add people with `tessera user create`)")
    console.print(f"admin token      {result.admin_token}")
    console.print("the admin token is shown only this once")


@server_app.command("hsm-import")
def hsm_import(
    data_dir: Path = typer.Option(
        DEFAULT_DATA_DIR, "--data-dir", help="The server's data directory.", parser=cli_path
    ),
    hsm_module: Path = typer.Option(..., "--hsm-module", help="The HSM's PKCS#11 module.", parser=cli_path),
    hsm_token: str = typer.Option(..., "--hsm-token", help="The HSM token's label."),
    hsm_key: str = typer.Option("tessera-vendor", "--hsm-key", help="The label the key gets in the token."),
    remove_key_file: bool = typer.Option(
        False,
        "--remove-key-file",
        help="Delete vendor.key (and a generated passphrase file) once the token signs with it. "
        "Keep a backup of the key elsewhere first: it is its last copy outside the token.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Move the existing vendor key into an HSM (PKCS#11); the server then signs there.

    The same key moves, so every license issued and every agent's keyring stay valid. Run
    it with the server stopped; the PIN comes from TESSERA_HSM_PIN or TESSERA_HSM_PIN_FILE,
    the key file's passphrase as for `server run`.
    """
    from tessera.server.config import HsmConfig
    from tessera.server.runlock import server_running
    from tessera.server.setup import move_key_to_hsm

    if not hsm_token.strip() or not hsm_key.strip():
        fail("--hsm-token and --hsm-key must not be empty")
    # A running server keeps signing with the file key and would not see [hsm] until its
    # restart; with --remove-key-file it would lose the key it signs with.
    if server_running(data_dir.resolve()):
        fail(f"the server of {data_dir.resolve()} is running: stop it first, then run `server hsm-import`")
    hsm = HsmConfig(module=hsm_module.absolute(), token=hsm_token, key=hsm_key)
    try:
        moved = move_key_to_hsm(data_dir, hsm, remove_key_file=remove_key_file)
    except ConfigError as exc:
        fail(str(exc))
    if as_json:
        emit_json(
            {
                "key_id": moved.key_id,
                "hsm": {"token": hsm.token, "key": hsm.key},
                "removed": [str(p) for p in moved.removed],
            }
        )
        return
    console.print(f"vendor key {moved.key_id} is in HSM token {hsm.token!r}, label {hsm.key!r}", markup=False)
    for path in moved.removed:
        console.print(f"removed {path}", markup=False)
    if not moved.removed:
        console.print(
            "vendor.key is still in the data directory: once its backup is safe elsewhere, delete it "
            "(the security checklist reports it until then)",
            markup=False,
        )


@server_app.command("run")
def run(
    data_dir: Path = typer.Option(
        DEFAULT_DATA_DIR, "--data-dir", help="An initialized data directory.", parser=cli_path
    ),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(DEFAULT_PORT, "--port", min=1, max=65535),
    no_tls: bool = typer.Option(False, "--no-tls", help="Plain HTTP, for behind a TLS-terminating proxy."),
    workers: int = typer.Option(
        1, "--workers", min=1, max=64, help="Worker processes sharing the port (one per core)."
    ),
) -> None:
    """Serve the Connect protocol and the admin API (HTTPS, TLS 1.2+ by default)."""
    from tessera.server.config import load_config

    try:
        # A mistake in tessera.toml is reported before the server's imports (web framework,
        # database layer, migrations: about a second of CPU), not after them.
        load_config(data_dir.resolve())
        from tessera.server.runner import serve

        serve(data_dir, host, port, tls=not no_tls, workers=workers)
    except ConfigError as exc:
        fail(str(exc))
