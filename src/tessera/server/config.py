"""The server's data directory and its config file ``tessera.toml``.

Layout (made by ``tessera server init``)::

    DATA_DIR/tessera.toml          what ``server run`` reads
    DATA_DIR/tessera.db            the SQLite database (unless --db names another)
    DATA_DIR/vendor.key            Ed25519 vendor signing key, passphrase-encrypted PKCS#8
    DATA_DIR/vendor.pub            the vendor keyring to ship with the product
    DATA_DIR/tls/ca.pem            the CA agents pin; tls/ca.key, tls/server.pem, tls/server.key
    DATA_DIR/secrets/pepper        HMAC pepper of license-key digests (0600)
    DATA_DIR/secrets/key-passphrase  only when TESSERA_KEY_PASSPHRASE was not given (0600)

The passphrase of the vendor key comes from ``TESSERA_KEY_PASSPHRASE``, else the file named
by ``TESSERA_KEY_PASSPHRASE_FILE``, else ``secrets/key-passphrase``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tessera.core.errors import KeyFileError
from tessera.core.signing import SigningKey

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_PORT",
    "DEFAULT_SQLITE_SETTING",
    "ConfigError",
    "HsmConfig",
    "PortalConfig",
    "ServerConfig",
    "WebhookSettings",
    "load_config",
    "read_passphrase",
    "render_config",
    "resolve_sqlite_url",
    "toml_string",
]

CONFIG_NAME = "tessera.toml"
DEFAULT_PORT = 7790


class ConfigError(Exception):
    """The data directory is missing, incomplete or unreadable."""


# The settings of the webhook and portal features live here, not in their modules, so that
# reading tessera.toml (every ``tessera server`` command, the CLI's start-up) does not
# import the HTTP client and the database layer those features run on.


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """Delivery policy (``[webhooks]`` in tessera.toml)."""

    retry_base_seconds: float = 10.0
    retry_max_seconds: float = 3600.0
    max_attempts: int = 12
    timeout_seconds: float = 10.0
    poll_seconds: float = 1.0


@dataclass(frozen=True, slots=True)
class PortalConfig:
    """Where the vendor's recovery portal is and how to reach it (``[recovery]``)."""

    url: str
    secret_file: Path
    timeout_seconds: float = 5.0
    ca_file: Path | None = None


#: The roles of API tokens and portal users (``tessera.server.tokens.Role``'s values; that
#: module needs the database models, this one must load without them).
ROLE_NAMES: Final = ("admin", "support", "sales", "partner", "customer", "readonly")
DEFAULT_TWO_STEP_ROLES: Final = ("admin",)


@dataclass(frozen=True, slots=True)
class HsmConfig:
    """Where the vendor key lives when it lives in an HSM (``[hsm]``; PKCS#11)."""

    #: The PKCS#11 module (shared library) of the HSM, e.g. SoftHSM's libsofthsm2.so.
    module: Path
    #: The token's label, and the label of the key pair in it.
    token: str
    key: str = "tessera-vendor"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    data_dir: Path
    database: str
    #: Optional interfaces; each can be switched off in ``[interfaces]`` of tessera.toml.
    admin_api: bool = True
    offline_activation: bool = True
    #: The web portal for people (``/portal``): off unless switched on.
    web_portal: bool = False
    #: Prometheus metrics at ``/metrics`` (a token of role admin/support/readonly): off.
    metrics: bool = False
    #: The vendor's recovery portal (``[recovery]``; off unless configured).
    portal: PortalConfig | None = None
    #: How long a lease of a user-bound license lasts without a heartbeat (``[leases]``).
    lease_seconds: int = 300
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    #: The vendor key in an HSM instead of ``vendor.key`` (``[hsm]``, written by init).
    hsm: HsmConfig | None = None
    #: Web portal users of these roles must sign in with a code from an authenticator app
    #: too (``[web_portal] two_step_roles``): until they set it up, their only page is
    #: their account's. Admins by default: an admin's password alone opens everything.
    two_step_roles: tuple[str, ...] = DEFAULT_TWO_STEP_ROLES

    @property
    def config_file(self) -> Path:
        return self.data_dir / CONFIG_NAME

    @property
    def vendor_key(self) -> Path:
        return self.data_dir / "vendor.key"

    @property
    def vendor_pub(self) -> Path:
        return self.data_dir / "vendor.pub"

    @property
    def ca_cert(self) -> Path:
        return self.data_dir / "tls" / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.data_dir / "tls" / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.data_dir / "tls" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.data_dir / "tls" / "server.key"

    @property
    def pepper_file(self) -> Path:
        return self.data_dir / "secrets" / "pepper"

    @property
    def passphrase_file(self) -> Path:
        return self.data_dir / "secrets" / "key-passphrase"

    def read_pepper(self) -> bytes:
        try:
            pepper = self.pepper_file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {self.pepper_file}: {exc.strerror}") from None
        if len(pepper) < 32:
            raise ConfigError(f"{self.pepper_file} is damaged (too short)")
        return pepper

    def load_signing_key(self) -> SigningKey:
        if self.hsm is not None:
            from tessera.server.hsm import HsmError, open_signing_key

            try:
                return open_signing_key(self.hsm)
            except HsmError as exc:
                raise ConfigError(f"HSM: {exc}") from None
        try:
            pem = self.vendor_key.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {self.vendor_key}: {exc.strerror}") from None
        try:
            return SigningKey.from_pem(pem, read_passphrase(self))
        except KeyFileError as exc:
            raise ConfigError(f"{self.vendor_key}: {exc}") from None


def read_passphrase(config: ServerConfig) -> bytes:
    value = os.environ.get("TESSERA_KEY_PASSPHRASE")
    if value:
        return value.encode("utf-8")
    named = os.environ.get("TESSERA_KEY_PASSPHRASE_FILE")
    path = Path(named) if named else config.passphrase_file
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        raise ConfigError(
            "the vendor key's passphrase is unknown: set TESSERA_KEY_PASSPHRASE "
            f"or TESSERA_KEY_PASSPHRASE_FILE ({path} is not readable)"
        ) from None
    if not text:
        raise ConfigError(f"passphrase file {path} is empty")
    return text.encode("utf-8")


#: What ``server init`` writes for its default SQLite database: relative, so a copied or
#: moved data directory (``cp -a var var2``) uses its own database, not the original's.
DEFAULT_SQLITE_SETTING: Final = "sqlite:///tessera.db"


def resolve_sqlite_url(url: str, data_dir: Path) -> str:
    """A SQLite URL with a relative path (``sqlite:///tessera.db``) made absolute against
    the data directory; every other URL unchanged. SQLite itself would resolve it against
    the working directory of whoever runs the server."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url.startswith(prefix + "/"):
        return url
    path, sep, query = url[len(prefix) :].partition("?")
    if not path or path == ":memory:" or path.startswith("file:"):
        return url
    return f"{prefix}{data_dir / path}{sep}{query}"


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(config: ServerConfig, database: str | None = None) -> str:
    """tessera.toml for ``config``; ``database``: the setting to write instead of
    ``config.database`` (init's relative default)."""
    roles = ", ".join(toml_string(role) for role in config.two_step_roles)
    return (
        "# Tessera license server (written by `tessera server init`).\n"
        "[server]\n"
        f"database = {toml_string(database or config.database)}\n"
        "\n"
        "# Optional interfaces; switch off what this deployment does not need.\n"
        "[interfaces]\n"
        f"admin_api = {'true' if config.admin_api else 'false'}\n"
        f"offline_activation = {'true' if config.offline_activation else 'false'}\n"
        f"web_portal = {'true' if config.web_portal else 'false'}\n"
        f"metrics = {'true' if config.metrics else 'false'}\n"
        "\n"
        "# Web portal users of these roles must sign in with a code from an authenticator app\n"
        "# as well as their password (any of: admin, support, sales, partner, customer, readonly).\n"
        "[web_portal]\n"
        f"two_step_roles = [{roles}]\n"
    ) + ("" if config.hsm is None else "\n" + hsm_section(config.hsm))


def hsm_section(hsm: HsmConfig) -> str:
    """The ``[hsm]`` table of tessera.toml (``server init`` and ``server hsm-import``)."""
    return (
        "# The vendor key lives in this HSM (PKCS#11); its PIN comes from TESSERA_HSM_PIN\n"
        "# or the file TESSERA_HSM_PIN_FILE names, never from here.\n"
        "[hsm]\n"
        f"module = {toml_string(str(hsm.module))}\n"
        f"token = {toml_string(hsm.token)}\n"
        f"key = {toml_string(hsm.key)}\n"
    )


def load_config(data_dir: Path) -> ServerConfig:
    path = data_dir / CONFIG_NAME
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{data_dir} is not an initialized data directory (run `tessera server init`)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    unknown_tables = sorted(set(raw) - KNOWN_TABLES)
    if unknown_tables:
        raise ConfigError(
            f"{path}: unknown table [{unknown_tables[0]}] (known: {', '.join(sorted(KNOWN_TABLES))})"
        )
    server = _table(raw, "server", path, {"database"})
    database = _database_setting(server.get("database"), path)
    interfaces = raw.get("interfaces", {})
    if not isinstance(interfaces, dict):
        raise ConfigError(f"{path}: [interfaces] must be a table")
    switches: dict[str, bool] = {}
    for name, default in (
        ("admin_api", True),
        ("offline_activation", True),
        ("web_portal", False),
        ("metrics", False),
    ):
        value = interfaces.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: [interfaces] {name} must be true or false")
        switches[name] = value
    unknown = set(interfaces) - set(switches)
    if unknown:
        raise ConfigError(f"{path}: [interfaces] has unknown key {sorted(unknown)[0]!r}")
    portal = _portal_config(raw.get("recovery", {}), path, data_dir.resolve())
    web = _table(raw, "web_portal", path, {"two_step_roles"})
    two_step = web.get("two_step_roles", list(DEFAULT_TWO_STEP_ROLES))
    if not isinstance(two_step, list) or not all(isinstance(r, str) and r in ROLE_NAMES for r in two_step):
        raise ConfigError(
            f"{path}: [web_portal] two_step_roles must be a list of roles ({', '.join(ROLE_NAMES)})"
        )
    leases = _table(raw, "leases", path, {"duration_seconds"})
    lease_seconds = _number(leases, "duration_seconds", 300, (1, 86400), path, whole=True)
    hooks = _table(raw, "webhooks", path, set(WebhookSettings.__dataclass_fields__))
    d = WebhookSettings()
    settings = WebhookSettings(
        retry_base_seconds=_number(hooks, "retry_base_seconds", d.retry_base_seconds, (0.01, 86400), path),
        retry_max_seconds=_number(hooks, "retry_max_seconds", d.retry_max_seconds, (0.01, 604800), path),
        max_attempts=int(_number(hooks, "max_attempts", d.max_attempts, (1, 1000), path, whole=True)),
        timeout_seconds=_number(hooks, "timeout_seconds", d.timeout_seconds, (0.1, 300), path),
        poll_seconds=_number(hooks, "poll_seconds", d.poll_seconds, (0.05, 3600), path),
    )  # fmt: skip
    return ServerConfig(
        data_dir=data_dir.resolve(),
        database=resolve_sqlite_url(database, data_dir.resolve()),
        hsm=_hsm_config(raw, path),
        portal=portal,
        lease_seconds=int(lease_seconds),
        webhooks=settings,
        two_step_roles=tuple(dict.fromkeys(two_step)),
        **switches,
    )


#: The tables tessera.toml may hold. Anything else (``[interface]`` for ``[interfaces]``)
#: is refused like an unknown key: silently ignored, a typo switches nothing off.
KNOWN_TABLES: Final = frozenset(
    {"server", "interfaces", "web_portal", "leases", "webhooks", "recovery", "hsm"}
)
#: URL schemes ``[server] database`` may use (``postgres://`` and ``postgresql://`` mean
#: psycopg 3, the only PostgreSQL driver installed).
DATABASE_SCHEMES: Final = frozenset(
    {"sqlite", "sqlite+pysqlite", "postgresql", "postgres", "postgresql+psycopg"}
)


def _database_setting(value: object, path: Path) -> str:
    """``[server] database``, checked here (without SQLAlchemy, which this module must not
    import): a URL of another database, or no URL, used to end in "internal error"."""
    if value is None:
        raise ConfigError(f"{path}: [server] database is missing")
    example = "sqlite:///tessera.db or postgresql://user@host/db"
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}: [server] database must be a database URL string ({example})")
    scheme, sep, _ = value.partition("://")
    if not sep:
        raise ConfigError(f"{path}: [server] database is not a database URL ({example})")
    if scheme.lower() not in DATABASE_SCHEMES:
        raise ConfigError(
            f"{path}: [server] database: unsupported database {scheme!r} (sqlite or postgresql)"
        )
    return value


def _hsm_config(raw: dict[str, object], path: Path) -> HsmConfig | None:
    if "hsm" not in raw:
        return None
    section = _table(raw, "hsm", path, {"module", "token", "key"})
    values = {}
    for name in ("module", "token", "key"):
        value = section.get(name, "tessera-vendor" if name == "key" else None)
        if not isinstance(value, str) or not value or len(value) > 4096:
            raise ConfigError(f"{path}: [hsm] {name} must be a non-empty string")
        values[name] = value
    return HsmConfig(module=Path(values["module"]), token=values["token"], key=values["key"])


def _portal_config(section: object, path: Path, data_dir: Path) -> PortalConfig | None:
    """``[recovery]``: portal_url, portal_secret_file, portal_timeout_seconds, portal_ca."""
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [recovery] must be a table")
    known = {"portal_url", "portal_secret_file", "portal_timeout_seconds", "portal_ca"}
    unknown = set(section) - known
    if unknown:
        raise ConfigError(f"{path}: [recovery] has unknown key {sorted(unknown)[0]!r}")
    url = section.get("portal_url")
    if url is None:
        return None
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise ConfigError(f"{path}: [recovery] portal_url must be an https:// URL")
    secret = section.get("portal_secret_file")
    if not isinstance(secret, str) or not secret:
        raise ConfigError(f"{path}: [recovery] portal_secret_file is missing")
    timeout = section.get("portal_timeout_seconds", 5)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 60:
        raise ConfigError(f"{path}: [recovery] portal_timeout_seconds must be 0-60")
    ca = section.get("portal_ca")
    if ca is not None and not isinstance(ca, str):
        raise ConfigError(f"{path}: [recovery] portal_ca must be a path")
    return PortalConfig(
        url=url,
        secret_file=data_dir / secret,
        timeout_seconds=float(timeout),
        ca_file=None if ca is None else data_dir / ca,
    )


def _table(raw: dict[str, object], name: str, path: Path, known: set[str]) -> dict[str, object]:
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"{path}: [{name}] has unknown key {sorted(unknown)[0]!r}")
    table["__name__"] = name
    return table


def _number(
    table: dict[str, object],
    key: str,
    default: float,
    bounds: tuple[float, float],
    path: Path,
    *,
    whole: bool = False,
) -> float:
    value = table.get(key, default)
    low, high = bounds
    if (
        isinstance(value, bool)
        or not isinstance(value, int if whole else (int, float))
        or not low <= value <= high
    ):
        kind = "a whole number" if whole else "a number"
        raise ConfigError(f"{path}: [{table['__name__']}] {key} must be {kind} from {low} to {high}")
    return int(value) if whole else float(value)
