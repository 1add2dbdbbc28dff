"""``tessera server init``: everything a new server needs, made once, never asking anything.

Creates the schema (Alembic), the vendor signing key (encrypted at rest), the pepper of
license-key digests, a private CA and server certificate, ``vendor.pub`` and the first
admin token. Re-initializing an initialized directory is refused: it would orphan every
license signed with the old key.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from tessera.core.errors import KeyFileError
from tessera.core.signing import Keyring, PublicKey, SigningKey
from tessera.server.config import (
    CONFIG_NAME,
    DEFAULT_SQLITE_SETTING,
    ConfigError,
    HsmConfig,
    ServerConfig,
    hsm_section,
    load_config,
    render_config,
    resolve_sqlite_url,
)
from tessera.server.files import write_file
from tessera.server.migrate import upgrade
from tessera.server.storage import (
    Database,
    describe_db_error,
    describe_db_url,
    normalize_db_url,
    sqlite_file,
)
from tessera.server.tls import make_tls_material
from tessera.server.tokens import INITIAL_TOKEN_NAME, Role, create_token

__all__ = ["AlreadyInitialized", "InitResult", "initialize"]


class AlreadyInitialized(Exception):
    pass


@dataclass(frozen=True, slots=True)
class InitResult:
    config: ServerConfig
    admin_token: str
    key_id: str
    passphrase_generated: bool


def initialize(
    data_dir: Path,
    db_url: str | None,
    now: datetime,
    hsm: HsmConfig | None = None,
    *,
    web_portal: bool = False,
) -> InitResult:
    """``hsm``: make the vendor key in that PKCS#11 token instead of ``vendor.key``
    (:mod:`tessera.server.hsm`); the token, its PIN and the free label are checked before
    anything is made."""
    data_dir = data_dir.resolve()
    if (data_dir / CONFIG_NAME).exists():
        raise AlreadyInitialized(f"{data_dir} is initialized already (refusing to replace its keys)")
    try:
        url = normalize_db_url(db_url) if db_url else f"sqlite:///{data_dir / 'tessera.db'}"
    except ValueError as exc:
        raise ConfigError(f"--db: {exc}") from None
    # A relative --db SQLite path means the working directory's file, as typed; tessera.toml
    # resolves relative paths against the data directory, so it gets the absolute one.
    url = resolve_sqlite_url(url, Path.cwd())
    config = ServerConfig(data_dir=data_dir, database=url, hsm=hsm, web_portal=web_portal)
    _refuse_existing_material(config)
    pin = None if hsm is None else _checked_pin(hsm)
    data_dir.mkdir(parents=True, exist_ok=True)
    os.makedirs(config.pepper_file.parent, mode=0o700, exist_ok=True)

    _create_private_sqlite_file(url)
    db = Database(url)
    try:
        try:
            _refuse_tessera_database(db)
            upgrade(db)
        except SQLAlchemyError as exc:
            raise ConfigError(describe_db_error(url, exc)) from None
        passphrase_text, generated = ("", False) if hsm is not None else _passphrase(config)
        if hsm is not None and pin is not None:
            public = _hsm_key(hsm, pin)
        else:
            key = SigningKey.generate()
            write_file(config.vendor_key, key.to_pem(passphrase_text.encode("utf-8")), 0o600)
            public = key.public
        write_file(config.vendor_pub, Keyring([public]).dumps().encode("ascii"))
        if not config.pepper_file.exists():
            write_file(config.pepper_file, secrets.token_bytes(32), 0o600)
        tls = make_tls_material(now)
        write_file(config.ca_cert, tls.ca_cert_pem)
        write_file(config.ca_key, tls.ca_key_pem, 0o600)
        write_file(config.server_cert, tls.server_cert_pem)
        write_file(config.server_key, tls.server_key_pem, 0o600)
        with db.write() as session:
            _, admin_token = create_token(session, name=INITIAL_TOKEN_NAME, role=Role.ADMIN, now=now)
    finally:
        db.dispose()
    # Written last: its presence means "initialized" (Makefile and re-init check it).
    setting = DEFAULT_SQLITE_SETTING if db_url is None else None
    write_file(config.config_file, render_config(config, setting).encode("utf-8"))
    return InitResult(config, admin_token, public.key_id, generated)


def _material(config: ServerConfig) -> tuple[Path, ...]:
    """What an initialized data directory holds besides tessera.toml: the vendor key and
    keyring, the CA and server certificate, the pepper, a generated passphrase and the
    default SQLite database."""
    return (
        config.vendor_key,
        config.vendor_pub,
        config.ca_cert,
        config.ca_key,
        config.server_cert,
        config.server_key,
        config.pepper_file,
        config.passphrase_file,
        config.data_dir / "tessera.db",
    )


def _refuse_existing_material(config: ServerConfig) -> None:
    """Refuse a data directory that holds any key material or database already.

    tessera.toml is written last, so its absence does not mean "empty": it may have been
    moved away, lost, or an earlier init may have stopped half-way. Writing over
    ``vendor.key`` would orphan every license signed with it (agents pin ``vendor.pub``)
    and a new CA would cut every agent off, so nothing is ever replaced: the operator
    restores tessera.toml, or clears the directory knowingly.
    """
    for path in _material(config):
        if path.exists() or path.is_symlink():
            raise AlreadyInitialized(
                f"{config.data_dir} holds {path.relative_to(config.data_dir)} already (refusing to "
                "replace its keys; restore its tessera.toml, or init another directory)"
            )


def _refuse_tessera_database(db: Database) -> None:
    """Refuse a database that holds a Tessera schema already (any ``alembic_version``).

    Its licenses are signed by the vendor key of the data directory it was made with; a
    second init with another data directory would add a new admin token and serve them with
    a new key and CA. There is no override on purpose: to serve that database again, use
    (or restore) its own data directory; to start afresh, give init an empty database.
    """
    from sqlalchemy import inspect

    with db.engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return
        row = connection.exec_driver_sql("SELECT version_num FROM alembic_version").first()
    shown = describe_db_url(db.url)
    revision = f" (schema revision {row[0]})" if row else ""
    raise AlreadyInitialized(
        f"the database {shown} holds Tessera data already{revision}: refusing to give it new keys; "
        "use its own data directory, or init with an empty database"
    )


def _passphrase(config: ServerConfig) -> tuple[str, bool]:
    """The vendor key file's passphrase, and whether it was generated: from the
    environment, else generated into the data directory (the security checklist then
    says so)."""
    passphrase_text = os.environ.get("TESSERA_KEY_PASSPHRASE") or ""
    named = os.environ.get("TESSERA_KEY_PASSPHRASE_FILE")
    if not passphrase_text and named:
        try:
            passphrase_text = Path(named).read_text(encoding="utf-8").strip()
        except OSError:
            raise ConfigError(f"TESSERA_KEY_PASSPHRASE_FILE {named} is not readable") from None
    if passphrase_text:
        return passphrase_text, False
    passphrase_text = secrets.token_urlsafe(32)
    write_file(config.passphrase_file, passphrase_text.encode("ascii") + b"\n", 0o600)
    return passphrase_text, True


def _checked_pin(hsm: HsmConfig) -> str:
    """The token's PIN, once the token is usable for a new vendor key."""
    from tessera.server.hsm import HsmError, check_token, read_pin

    try:
        pin = read_pin()
        check_token(hsm, pin)
    except HsmError as exc:
        raise ConfigError(f"HSM: {exc}") from None
    return pin


def _hsm_key(hsm: HsmConfig, pin: str) -> PublicKey:
    from tessera.server.hsm import HsmError, generate_key

    try:
        return generate_key(hsm, pin)
    except HsmError as exc:
        raise ConfigError(f"HSM: {exc}") from None


def _create_private_sqlite_file(url: str) -> None:
    """A new SQLite database file, readable by the server's account only (SQLite gives its
    -wal and -shm files the same mode). It holds token hashes, sealed webhook secrets and
    every customer's licenses; left to the umask it would usually be world-readable."""
    path = sqlite_file(url)
    if path is None:
        return
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


@dataclass(frozen=True, slots=True)
class Moved:
    """What ``server hsm-import`` did: the key id (unchanged) and the files it removed."""

    key_id: str
    removed: tuple[Path, ...]


def move_key_to_hsm(data_dir: Path, hsm: HsmConfig, *, remove_key_file: bool) -> Moved:
    """Put the data directory's ``vendor.key`` into the HSM and switch the server to it.

    The same key, not a new one: every license already issued and every agent's keyring
    stay valid. Checked first: the file key opens and is the one ``vendor.pub`` publishes,
    the token takes the PIN and the label is free. After the import the token must sign
    exactly as the file key does before ``[hsm]`` goes into tessera.toml. The key file
    (and a generated passphrase file) is removed only when asked: it is the key's last copy
    outside the token, so the operator decides where its backup lives.
    """
    from tessera.server.hsm import HsmError, import_key, open_signing_key

    data_dir = data_dir.resolve()
    config = load_config(data_dir)
    if config.hsm is not None:
        raise ConfigError(f"the vendor key of {data_dir} is in HSM token {config.hsm.token!r} already")
    key = config.load_signing_key()
    try:
        published = Keyring.loads(config.vendor_pub.read_text(encoding="ascii"))
    except (OSError, ValueError, KeyFileError) as exc:
        raise ConfigError(f"{config.vendor_pub}: {exc}") from None
    if key.key_id not in published:
        raise ConfigError(f"{config.vendor_key} is not the key {config.vendor_pub} publishes")
    pin = _checked_pin(hsm)
    try:
        import_key(hsm, pin, key)
        in_token = open_signing_key(hsm, pin)
    except HsmError as exc:
        raise ConfigError(f"HSM: {exc}") from None
    try:
        probe = b"tessera hsm-import probe"
        if in_token.key_id != key.key_id or in_token.sign(probe) != key.sign(probe):
            raise ConfigError(
                f"HSM: the key in token {hsm.token!r} does not sign as {config.vendor_key} does"
            )
    finally:
        in_token.close()
    text = config.config_file.read_text(encoding="utf-8")
    write_file(config.config_file, (text.rstrip("\n") + "\n\n" + hsm_section(hsm)).encode("utf-8"))
    load_config(data_dir)  # what was written reads back
    removed: list[Path] = []
    if remove_key_file:
        for path in (config.vendor_key, config.passphrase_file):
            if path.exists():
                path.unlink()
                removed.append(path)
    return Moved(key.key_id, tuple(removed))
