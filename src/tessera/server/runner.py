"""``tessera server run``: load the data directory and serve with uvicorn (TLS 1.2+)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import uvicorn
from sqlalchemy.exc import SQLAlchemyError

from tessera.core.clock import SystemClock
from tessera.server.app import Interfaces, ServerState, create_app
from tessera.server.config import ConfigError, load_config
from tessera.server.migrate import upgrade
from tessera.server.storage import Database, describe_db_error

__all__ = ["build_state", "serve"]


def build_state(data_dir: Path) -> ServerState:
    config = load_config(data_dir)
    signing_key = config.load_signing_key()
    pepper = config.read_pepper()
    db = Database(config.database)
    try:
        upgrade(db)  # a newer server version brings its migrations; idempotent otherwise
    except SQLAlchemyError as exc:
        db.dispose()
        raise ConfigError(describe_db_error(config.database, exc)) from None
    return ServerState(db=db, signing_key=signing_key, pepper=pepper, clock=SystemClock())


def serve(data_dir: Path, host: str, port: int, *, tls: bool) -> None:
    state = build_state(data_dir)
    config = load_config(data_dir)
    app = create_app(
        state, Interfaces(admin_api=config.admin_api, offline_activation=config.offline_activation)
    )
    options: dict[str, object] = {}
    if tls:
        for path in (config.server_cert, config.server_key):
            if not path.is_file():
                raise ConfigError(
                    f"TLS file {path} is missing (or use --no-tls behind a TLS proxy)"
                )
        options.update(
            ssl_certfile=str(config.server_cert),
            ssl_keyfile=str(config.server_key),
            ssl_version=ssl.PROTOCOL_TLS_SERVER,
        )
    server_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        **options,  # type: ignore[arg-type]
    )
    server = uvicorn.Server(server_config)
    if tls:
        # uvicorn builds the SSLContext in Config.load(); raise its floor to TLS 1.2.
        server_config.load()
        assert server_config.ssl is not None
        server_config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
    listener = _listen(host, port)
    try:
        server.run(sockets=[listener])
    finally:
        listener.close()
        state.db.dispose()


def _listen(host: str, port: int) -> socket.socket:
    """Bind here (not in uvicorn) so a busy port is one clear error line, not a log record."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    try:
        return socket.create_server(address, family=family, backlog=2048)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
