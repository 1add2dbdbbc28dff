"""``tessera server run``: load the data directory and serve with uvicorn (TLS 1.2+)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from sqlalchemy.exc import SQLAlchemyError
from uvicorn.supervisors import Multiprocess

from tessera.core.clock import SystemClock
from tessera.server.app import Interfaces, ServerState, create_app
from tessera.server.config import ConfigError, load_config
from tessera.server.migrate import SchemaError, check_and_upgrade
from tessera.server.portal import RecoveryPortal
from tessera.server.runlock import hold_run_lock
from tessera.server.storage import Database, describe_db_error, describe_db_url, sqlite_file

__all__ = ["TlsFloorConfig", "build_state", "relay_worker_app", "serve", "serve_relay", "worker_app"]


WORKER_ENV = "TESSERA_SERVER_DATA_DIR"
RELAY_WORKER_ENV = "TESSERA_RELAY_DATA_DIR"


class TlsFloorConfig(uvicorn.Config):
    """uvicorn's config with the TLS floor raised to 1.2 wherever the SSL context is made
    (in each worker process too, which is why this is a class and not a tweak after load)."""

    def load(self) -> None:
        super().load()
        if self.ssl is not None:
            self.ssl.minimum_version = ssl.TLSVersion.TLSv1_2


def build_state(data_dir: Path, *, migrate: bool = True) -> ServerState:
    config = load_config(data_dir)
    signing_key = config.load_signing_key()
    pepper = config.read_pepper()
    path = sqlite_file(config.database)
    if path is not None and not path.is_file():  # connecting would create it (mode 0644)
        raise SchemaError(
            f"the database at {config.database} holds no Tessera data (there is no file {path}): "
            "run `tessera server init` (or fix [server] database)"
        )
    try:
        db = Database(config.database)
    except ValueError as exc:
        raise ConfigError(f"{config.config_file}: [server] database: {exc}") from None
    if migrate:
        try:
            # Refuses a database init never made or a newer version's; an older one is
            # brought forward (a newer server version brings its migrations).
            check_and_upgrade(db)
        except SchemaError:
            db.dispose()
            raise
        except SQLAlchemyError as exc:
            db.dispose()
            raise ConfigError(describe_db_error(config.database, exc)) from None
    portal = None
    if config.portal is not None:
        try:
            portal = RecoveryPortal(config.portal)
        except (OSError, ValueError, ssl.SSLError) as exc:
            db.dispose()
            raise ConfigError(f"recovery portal: {exc}") from None
    return ServerState(
        db=db,
        signing_key=signing_key,
        pepper=pepper,
        clock=SystemClock(),
        portal=portal,
        lease_seconds=config.lease_seconds,
        webhook_settings=config.webhooks,
        two_step_roles=frozenset(config.two_step_roles),
    )


def _app_for(data_dir: Path, state: ServerState) -> FastAPI:
    config = load_config(data_dir)
    interfaces = Interfaces(
        admin_api=config.admin_api,
        offline_activation=config.offline_activation,
        web_portal=config.web_portal,
        metrics=config.metrics,
    )
    return create_app(state, interfaces)


def worker_app() -> FastAPI:
    """The app of one worker process (``--workers N``); the parent already migrated."""
    data_dir = Path(os.environ[WORKER_ENV])
    return _app_for(data_dir, build_state(data_dir, migrate=False))


def serve(data_dir: Path, host: str, port: int, *, tls: bool, workers: int = 1) -> None:
    """Serve until stopped. Several workers share one listening socket (and the database)."""
    data_dir = data_dir.resolve()
    state = build_state(data_dir)  # checks key, pepper and database before anything listens
    config = load_config(data_dir)
    options = _tls_options(config.server_cert, config.server_key) if tls else {}
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": "warning",
        "access_log": False,
        **options,
    }
    listener = _listen(host, port)
    lock = hold_run_lock(data_dir)  # `server hsm-import` refuses while it is held
    _announce(listener, tls=tls, data_dir=data_dir, database=state.db, workers=workers)
    try:
        if workers <= 1:
            server_config = TlsFloorConfig(_app_for(data_dir, state), **common)
            uvicorn.Server(server_config).run(sockets=[listener])
        else:
            state.db.dispose()
            os.environ[WORKER_ENV] = str(data_dir)
            if config.metrics:
                _metrics_directory(data_dir)
            server_config = TlsFloorConfig(
                "tessera.server.runner:worker_app", factory=True, workers=workers, **common
            )
            Multiprocess(server_config, sockets=[listener]).run()
    finally:
        listener.close()
        state.db.dispose()
        if lock is not None:
            lock.close()


def _announce(
    listener: socket.socket, *, tls: bool, data_dir: Path, database: Database, workers: int
) -> None:
    """One line on stderr once the port is bound: where the server listens and what it
    serves (uvicorn's own start-up lines are off with its log level at "warning"; without
    this an operator saw nothing at all)."""
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in str(host) else str(host)
    kind = "SQLite" if database.is_sqlite else "PostgreSQL"
    where = database.url if database.is_sqlite else describe_db_url(database.url)
    plural = f", {workers} workers" if workers > 1 else ""
    print(
        f"tessera server listening on {'https' if tls else 'http'}://{shown}:{port} "
        f"(data dir {data_dir}, database {kind} {where}{plural})",
        file=sys.stderr,
        flush=True,
    )


def _metrics_directory(data_dir: Path) -> None:
    """prometheus_client's multiprocess mode: each worker counts into files here and a
    scrape adds them up. Emptied first: counts of an earlier run must not come back."""
    from tessera.server.metrics import MULTIPROC_ENV

    folder = data_dir / "run" / "metrics"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(folder)


def serve_relay(data_dir: Path, host: str, port: int, *, tls: bool, workers: int = 1) -> None:
    """Serve a relay (``tessera.server.relay``) until stopped. A relay keeps no state, so
    several worker processes share its port with nothing to agree on: each terminates its
    share of the agents' TLS handshakes and keeps its own connections to the server."""
    from tessera.server.relay import Relay, load_relay_config

    data_dir = data_dir.resolve()
    config = load_relay_config(data_dir)
    relay = Relay(config)  # an unreadable CA file is a clear error before anything listens
    options = _tls_options(config.server_cert, config.server_key) if tls else {}
    listener = _listen(host, port)
    try:
        common: dict[str, Any] = {"host": host, "port": port, "log_level": "warning", "access_log": False}
        if workers <= 1:
            server_config = TlsFloorConfig(relay, lifespan="on", **common, **options)
            uvicorn.Server(server_config).run(sockets=[listener])
        else:
            os.environ[RELAY_WORKER_ENV] = str(data_dir)
            server_config = TlsFloorConfig(
                "tessera.server.runner:relay_worker_app",
                factory=True,
                workers=workers,
                lifespan="on",
                **common,
                **options,
            )
            Multiprocess(server_config, sockets=[listener]).run()
    finally:
        listener.close()


def relay_worker_app() -> Any:
    """The relay of one worker process (``tessera relay run --workers N``)."""
    from tessera.server.relay import Relay, load_relay_config

    return Relay(load_relay_config(Path(os.environ[RELAY_WORKER_ENV])))


def _tls_options(cert: Path, key: Path) -> dict[str, Any]:
    """uvicorn's TLS settings for ``cert`` and ``key``; ConfigError if either is missing."""
    for path in (cert, key):
        if not path.is_file():
            raise ConfigError(f"TLS file {path} is missing (or use --no-tls behind a TLS proxy)")
    _check_tls_files(cert, key)
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(key), "ssl_version": ssl.PROTOCOL_TLS_SERVER}


def _check_tls_files(cert: Path, key: Path) -> None:
    """Load the pair here: uvicorn's own failure is OpenSSL's '[SSL] PEM lib (_ssl.c:...)',
    which names neither the file nor what is wrong with it."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        x509.load_pem_x509_certificate(cert.read_bytes())
    except OSError as exc:
        raise ConfigError(f"TLS certificate {cert} cannot be read: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"TLS certificate {cert} is not a PEM certificate") from None
    try:
        load_pem_private_key(key.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"TLS key {key} cannot be read: {exc.strerror}") from None
    except (ValueError, TypeError):  # TypeError: encrypted, and uvicorn has no passphrase
        raise ConfigError(f"TLS key {key} is not an unencrypted PEM private key") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(f"TLS key {key} does not fit certificate {cert} ({exc.reason or exc})") from None


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
