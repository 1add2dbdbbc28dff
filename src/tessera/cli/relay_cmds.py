"""``tessera relay init|run`` and ``tessera server relay-cert``: a split deployment, the
server inside, the relay in the DMZ (``tessera.server.relay``, ``docs/server.md``)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import typer

from tessera.cli._common import cli_path, console, emit_json, fail, write_file_atomic
from tessera.cli.apps import app, server_app
from tessera.server.config import DEFAULT_PORT, ConfigError

__all__ = ["relay_app"]

relay_app = typer.Typer(
    help="The relay: the internet-facing part of a split deployment (holds no keys, no database).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(relay_app, name="relay")

DEFAULT_RELAY_DIR = Path("./relay")


@relay_app.command("init")
def init(
    upstream: str = typer.Option(..., "--upstream", help="The license server: https://HOST:PORT."),
    upstream_ca: Path = typer.Option(
        ..., "--upstream-ca", help="The server's CA certificate (its tls/ca.pem), pinned.", parser=cli_path
    ),
    data_dir: Path = typer.Option(
        DEFAULT_RELAY_DIR, "--data-dir", help="Where the relay keeps its files.", parser=cli_path
    ),
    cert: Path | None = typer.Option(
        None,
        "--cert",
        help="The relay's certificate from 'tessera server relay-cert' (with --key and --ca).",
        parser=cli_path,
    ),
    key: Path | None = typer.Option(None, "--key", help="That certificate's key.", parser=cli_path),
    ca: Path | None = typer.Option(
        None, "--ca", help="The CA that signed it (the server's tls/ca.pem).", parser=cli_path
    ),
    hostname: list[str] = typer.Option(
        [],
        "--hostname",
        help="A host name or IP address agents reach the relay by (its own certificate; repeatable).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Make a relay's data directory: the server's URL and CA, the relay's TLS files."""
    from tessera.server.relay import initialize_relay
    from tessera.server.tls import check_hostname

    given = [option for option, value in (("--cert", cert), ("--key", key), ("--ca", ca)) if value]
    if given and len(given) != 3:
        fail("--cert, --key and --ca go together (from 'tessera server relay-cert')")
    if given and hostname:
        fail("--hostname names the relay's own certificate; with --cert the names are in that certificate")
    names: list[str] = []
    for name in hostname:
        try:
            names.append(check_hostname(name.strip()))
        except ValueError as exc:
            fail(f"--hostname {exc}")
    certificate = (cert, key, ca) if cert and key and ca else None
    try:
        config = initialize_relay(
            data_dir, upstream, upstream_ca, datetime.now(UTC), certificate=certificate, hostnames=names
        )
    except ConfigError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {data_dir}: {exc.strerror or exc}")
    if as_json:
        emit_json(
            {
                "data_dir": str(config.data_dir),
                "config": str(config.config_file),
                "upstream": config.upstream,
                "ca": str(config.ca_cert),
            }
        )
        return
    console.print(f"initialized relay {config.data_dir}")
    console.print(f"upstream         {config.upstream} (CA pinned: {config.upstream_ca})")
    console.print(f"TLS CA           {config.ca_cert} (agents pin this)")


@relay_app.command("run")
def run(
    data_dir: Path = typer.Option(
        DEFAULT_RELAY_DIR, "--data-dir", help="An initialized relay directory.", parser=cli_path
    ),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(DEFAULT_PORT, "--port", min=1, max=65535),
    no_tls: bool = typer.Option(False, "--no-tls", help="Plain HTTP, for behind a TLS-terminating proxy."),
    workers: int = typer.Option(
        1, "--workers", min=1, max=64, help="Worker processes sharing the port (one per core)."
    ),
) -> None:
    """Forward the agents' Connect requests to the license server (HTTPS, TLS 1.2+)."""
    from tessera.server.runner import serve_relay

    try:
        serve_relay(data_dir, host, port, tls=not no_tls, workers=workers)
    except ConfigError as exc:
        fail(str(exc))


@server_app.command("relay-cert")
def relay_cert(
    hostname: list[str] = typer.Option(
        ..., "--hostname", help="A host name or IP address agents reach the relay by (repeatable)."
    ),
    out: Path = typer.Option(
        ..., "-o", "--output", help="Directory for relay.pem and relay.key.", parser=cli_path
    ),
    data_dir: Path = typer.Option(
        Path("./var"), "--data-dir", help="The server's data directory.", parser=cli_path
    ),
    force: bool = typer.Option(False, "--force", help="Replace a relay.pem and relay.key already in -o."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """A certificate for a relay, signed by this server's CA: agents that pin the server's
    CA trust the relay unchanged. Copy the two files and tls/ca.pem to the relay.

    It names exactly the --hostname values (host names or IP addresses): no loopback
    address unless one is given, since every agent pinning the CA trusts it for each name."""
    from tessera.server.config import load_config
    from tessera.server.tls import check_hostname, issue_server_certificate

    names: list[str] = []
    for given in hostname:
        try:
            name = check_hostname(given.strip())
        except ValueError as exc:
            fail(f"--hostname {exc}")
        if name not in names:
            names.append(name)
    try:
        config = load_config(data_dir)
    except ConfigError as exc:
        fail(str(exc))
    try:
        ca_pem = config.ca_cert.read_bytes()
        ca_key_pem = config.ca_key.read_bytes()
    except OSError as exc:
        fail(f"the server's CA is not readable ({exc.filename}: {exc.strerror})")
    cert_file, key_file = out.resolve() / "relay.pem", out.resolve() / "relay.key"
    if not force:
        # Like server init: a key in use by a relay is never replaced by accident.
        for existing in (key_file, cert_file):
            if existing.exists() or existing.is_symlink():
                fail(f"{existing} exists already (use --force to replace it)")
    try:
        cert_pem, key_pem = issue_server_certificate(ca_pem, ca_key_pem, names, datetime.now(UTC))
    except ValueError as exc:
        fail(f"{config.ca_cert}: {exc}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create {out}: {exc.strerror}")
    write_file_atomic(cert_file, cert_pem, force=force)
    write_file_atomic(key_file, key_pem, 0o600, force=force)
    if as_json:
        emit_json({"cert": str(cert_file), "key": str(key_file), "ca": str(config.ca_cert), "names": names})
        return
    console.print(f"relay certificate {cert_file} for {', '.join(names)}")
    console.print(f"its key           {key_file} (keep it private; copy it to the relay only)")
    console.print(f"the CA            {config.ca_cert} (tessera relay init --ca)")
