"""The security checklist of a license server deployment (SPEC section 5, seed 002).

The seed's checklist is a form an installer fills in by hand: per hardening measure, what
to do, where it is described, the access rights it needs, whether it was executed, and the
customer's comments and reasons. Here the server fills in "executed" itself, from what it
can see: the data directory (files, their modes, ``tessera.toml``), the database (tokens,
webhook endpoints, the audit chain) and, given its URL, the running server (TLS). What it
cannot see it says so (``unchecked``) rather than guess; ``n/a`` is for a feature this
deployment does not use. The customer's comments come from a file of their own, so the
printed checklist is the complete document the seed asks for.

Nothing here writes: the audit reads files and the database and opens one TLS connection.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import stat
import tomllib
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from tessera.server.config import CONFIG_NAME, ServerConfig
from tessera.server.storage import sqlite_file

__all__ = [
    "EXECUTED",
    "MEASURE_IDS",
    "Check",
    "Measure",
    "Probe",
    "audit",
    "probe_server",
    "read_comments",
    "trust",
    "with_comments",
]

#: What "executed" can say. ``unchecked``: the audit could not tell (no URL to probe, the
#: database unreachable); ``n/a``: the deployment does not use what the measure protects.
EXECUTED: Final = ("yes", "no", "n/a", "unchecked")
#: Every measure, in the checklist's order (a comments file may name only these).
MEASURE_IDS: Final = (
    "tls",
    "vendor-key-encrypted",
    "key-passphrase-apart",
    "ca-key-offline",
    "secret-file-modes",
    "admin-api-off",
    "offline-activation-off",
    "web-portal-off",
    "portal-two-step",
    "metrics-off",
    "recovery-portal",
    "webhooks-https",
    "database-credentials",
    "initial-token-revoked",
    "audit-chain-intact",
)
_DATA_DIR_RIGHTS: Final = "shell on the server host, owner of the data directory"


@dataclass(frozen=True, slots=True)
class Measure:
    """One line of the checklist as the seed's form has it, plus what the audit found."""

    id: str
    title: str
    measure: str
    references: str
    access_rights: str
    executed: str
    finding: str
    comment: str = ""


@dataclass(frozen=True, slots=True)
class Check:
    """What an audit is asked to look at: a data directory, and optionally the running
    server (``url``, trusted through ``ca``, default the data directory's own CA)."""

    config: ServerConfig
    url: str | None = None
    ca: Path | None = None
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Probe:
    """What one TLS connection to the running server showed."""

    https: bool  # a TLS handshake with the pinned CA succeeded
    version: str | None  # the negotiated protocol, e.g. "TLSv1.3"
    plain_http_answered: bool  # the same port answered a plain HTTP request
    old_tls_refused: bool | None  # a TLS 1.1 handshake failed; None: not tried here
    error: str | None = None


def audit(check: Check, probe: Callable[[Check], Probe] | None = None) -> list[Measure]:
    """Every measure, with ``executed`` and ``finding`` filled in from the deployment."""
    config = check.config
    database = _database_facts(config)
    probed = None if check.url is None else (probe or probe_server)(check)
    return [
        _tls(check, probed),
        _vendor_key(config),
        _passphrase(config),
        _ca_key(config),
        _permissions(config),
        _interface(
            "admin-api-off",
            "Admin API switched off where not needed",
            config.admin_api,
            "Set `admin_api = false` in `[interfaces]` of tessera.toml on every server process "
            "that is not administered over HTTP (for example the one facing the internet), "
            "and administer through one that is reachable only internally.",
        ),
        _interface(
            "offline-activation-off",
            "Offline-activation endpoint switched off where not needed",
            config.offline_activation,
            "Set `offline_activation = false` in `[interfaces]` of tessera.toml when every "
            "customer activates online.",
        ),
        _interface(
            "web-portal-off",
            "Web portal switched off where not needed",
            config.web_portal,
            "Leave `web_portal = false` in `[interfaces]` of tessera.toml (the default) unless "
            "people use the portal; where they do, serve it over TLS only, on a process that "
            "is reachable only by them, and give each person an account of their own.",
        ),
        _two_step(config),
        _interface(
            "metrics-off",
            "Metrics endpoint switched off where not needed",
            config.metrics,
            "Leave `metrics = false` in `[interfaces]` of tessera.toml (the default) unless "
            "Prometheus scrapes this process; where it does, give it a readonly token of its "
            "own and let only the monitoring host reach the port.",
        ),
        _portal(config),
        _webhooks(database),
        _database_credentials(config),
        _initial_token(database),
        _audit_chain(database),
    ]


def read_comments(text: str, known: Iterable[str]) -> dict[str, str]:
    """The customer's comments (TOML: a ``[comments]`` table of measure id = text);
    ``ValueError`` naming what is wrong."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not TOML: {exc}") from None
    unknown_tables = set(raw) - {"comments"}
    if unknown_tables:
        raise ValueError(f"unknown table [{sorted(unknown_tables)[0]}] (expected [comments])")
    comments = raw.get("comments", {})
    if not isinstance(comments, dict):
        raise ValueError("[comments] must be a table")
    ids = set(known)
    for key, value in comments.items():
        if key not in ids:
            raise ValueError(f"no measure {key!r} (known: {', '.join(sorted(ids))})")
        if not isinstance(value, str):
            raise ValueError(f"comment {key!r} must be a string")
    return dict(comments)


def with_comments(measures: list[Measure], comments: Mapping[str, str]) -> list[Measure]:
    return [replace(m, comment=comments.get(m.id, m.comment)) for m in measures]


# ------------------------------------------------------------------------------- the probe


def probe_server(check: Check) -> Probe:
    """Connect to ``check.url`` with TLS (pinning the CA), then once more in plain HTTP and
    once offering only TLS 1.1; the server should take only the first."""
    parts = urlsplit(check.url or "")
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    context = trust(check)
    try:
        with (
            socket.create_connection((host, port), timeout=check.timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            version = tls.version()
    except (OSError, ssl.SSLError) as exc:
        return Probe(False, None, _plain_http_answers(host, port, check.timeout), None, _reason(exc))
    return Probe(
        True,
        version,
        _plain_http_answers(host, port, check.timeout),
        _old_tls_refused(host, port, check.timeout),
    )


def trust(check: Check) -> ssl.SSLContext:
    """The TLS client context of the probe: the CA given, else the data directory's (what
    agents pin), else the system's. ``ValueError`` if the CA file is no certificate."""
    ca = check.ca or check.config.ca_cert
    if check.ca is None and not ca.exists():
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"{ca} is not a PEM CA certificate ({exc.strerror or exc})") from None


def _plain_http_answers(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            raw.sendall(f"GET /api/v1/health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            return raw.recv(16).startswith(b"HTTP/")
    except OSError:
        return False


def _old_tls_refused(host: str, port: int, timeout: float) -> bool | None:
    """Whether a TLS 1.1 handshake fails at the server; None if this machine's OpenSSL
    cannot even offer TLS 1.1 (then the probe proves nothing)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():  # offering TLS 1.1 is deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            context.minimum_version = ssl.TLSVersion.TLSv1_1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        return None
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return False
    except ssl.SSLError as exc:
        if "NO_PROTOCOLS_AVAILABLE" in str(exc) or "no protocols available" in str(exc):
            return None  # refused here, before anything went out
        return True
    except OSError:
        return True  # the server dropped the connection


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {exc.verify_message}"
    return str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)


# ------------------------------------------------------------------------------- measures


def _tls(check: Check, probe: Probe | None) -> Measure:
    base = Measure(
        "tls",
        "Connect and admin API only over TLS 1.2 or newer",
        "Run `tessera server run` without `--no-tls` (TLS 1.2 is its floor), or terminate "
        "TLS 1.2+ in a proxy in front of it; agents pin the server's CA.",
        "docs/server.md (data directory, TLS); docs/protocol.md",
        "network access to the server; the CA certificate agents pin",
        "unchecked",
        "not probed: give the server's URL (--url) to check the running server",
    )
    if probe is None:
        return base
    url = check.url or ""
    if not url.startswith("https://") or not probe.https:
        reason = probe.error or "the URL is not https://"
        plain = "; it answers plain HTTP" if probe.plain_http_answered else ""
        return replace(base, executed="no", finding=f"no TLS at {url}: {reason}{plain}")
    problems = []
    if probe.version not in ("TLSv1.2", "TLSv1.3"):
        problems.append(f"it negotiated {probe.version}")
    if probe.plain_http_answered:
        problems.append("the same port also answers plain HTTP")
    if probe.old_tls_refused is False:
        problems.append("it accepted a TLS 1.1 handshake")
    if problems:
        return replace(base, executed="no", finding=f"{url}: " + "; ".join(problems))
    old = {
        True: "TLS 1.1 refused",
        None: "TLS 1.1 not tried (this machine's OpenSSL does not offer it)",
    }[probe.old_tls_refused]
    return replace(base, executed="yes", finding=f"{url}: {probe.version} with the pinned CA; {old}")


def _vendor_key(config: ServerConfig) -> Measure:
    base = Measure(
        "vendor-key-encrypted",
        "Vendor signing key encrypted at rest",
        "Keep vendor.key as passphrase-encrypted PKCS#8 (what `tessera server init` and "
        "`tessera keys` write).",
        "docs/server.md (data directory); `tessera keys`",
        _DATA_DIR_RIGHTS,
        "no",
        "",
    )
    if config.hsm is not None:
        where = f"HSM token {config.hsm.token!r}, key {config.hsm.key!r}"
        if config.vendor_key.exists():
            return replace(base, finding=f"{config.vendor_key} lies in the data directory beside {where}")
        return replace(base, executed="yes", finding=f"in {where}: it cannot be exported")
    try:
        head = config.vendor_key.read_bytes()[:64]
    except OSError as exc:
        return replace(base, executed="unchecked", finding=f"cannot read {config.vendor_key}: {exc.strerror}")
    if head.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----"):
        return replace(base, executed="yes", finding=f"{config.vendor_key}: encrypted PKCS#8")
    return replace(base, finding=f"{config.vendor_key} is not an encrypted private key")


def _passphrase(config: ServerConfig) -> Measure:
    base = Measure(
        "key-passphrase-apart",
        "Vendor key passphrase kept apart from the key",
        "Move the passphrase out of the data directory into the host's secret store and hand "
        "it to the server as TESSERA_KEY_PASSPHRASE or TESSERA_KEY_PASSPHRASE_FILE; delete "
        "secrets/key-passphrase.",
        "docs/server.md (data directory)",
        _DATA_DIR_RIGHTS,
        "yes",
        "no passphrase file in the data directory",
    )
    if config.passphrase_file.exists():
        return replace(
            base,
            executed="no",
            finding=f"{config.passphrase_file} holds the passphrase beside the key it unlocks",
        )
    if config.hsm is not None:
        return replace(
            base, executed="n/a", finding="the vendor key is in an HSM, its PIN in TESSERA_HSM_PIN(_FILE)"
        )
    return base


def _ca_key(config: ServerConfig) -> Measure:
    base = Measure(
        "ca-key-offline",
        "TLS CA private key kept off the server",
        "Move tls/ca.key to offline storage after `tessera server init`: the server never "
        "needs it to run, and whoever holds it can impersonate the server to every agent.",
        "docs/server.md (data directory)",
        _DATA_DIR_RIGHTS,
        "yes",
        "no CA private key in the data directory",
    )
    if config.ca_key.exists():
        return replace(base, executed="no", finding=f"{config.ca_key} is on the server")
    return base


def _permissions(config: ServerConfig) -> Measure:
    base = Measure(
        "secret-file-modes",
        "Secrets readable by the server's account only",
        "chmod 600 on the keys, the secrets and the SQLite database; chmod go-w on the data directory.",
        "docs/server.md (data directory)",
        _DATA_DIR_RIGHTS,
        "yes",
        "",
    )
    secrets = [
        config.vendor_key,
        config.server_key,
        config.ca_key,
        config.pepper_file,
        config.passphrase_file,
    ]
    if config.portal is not None:
        secrets.append(config.portal.secret_file)
    database = sqlite_file(config.database)
    if database is not None:
        secrets.append(database)
    problems = []
    checked = 0
    for path in secrets:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror}")
            continue
        checked += 1
        if mode & 0o077:
            problems.append(f"{path} is mode {stat.S_IMODE(mode):o}")
    for directory in (config.data_dir, config.data_dir / "secrets", config.data_dir / "tls"):
        with contextlib.suppress(FileNotFoundError):
            mode = directory.stat().st_mode
            if mode & 0o022:
                problems.append(f"{directory} is writable by others (mode {stat.S_IMODE(mode):o})")
    if problems:
        return replace(base, executed="no", finding="; ".join(problems))
    return replace(base, finding=f"{checked} secret files, owner only; directories not writable by others")


def _interface(ident: str, title: str, enabled: bool, measure: str) -> Measure:
    return Measure(
        ident,
        title,
        measure,
        f"{CONFIG_NAME} [interfaces]; docs/server.md (data directory)",
        _DATA_DIR_RIGHTS,
        "no" if enabled else "yes",
        "on" if enabled else "switched off",
    )


def _two_step(config: ServerConfig) -> Measure:
    """Web portal admins sign in with a second factor: an admin's password alone would
    open every license, token and user of the vendor."""
    roles = config.two_step_roles
    base = Measure(
        "portal-two-step",
        "Two-step sign-in required for web portal administrators",
        "Keep `admin` (the default) in `two_step_roles` of `[web_portal]` in tessera.toml, "
        "and add `support` and `sales`, whose users change licenses too.",
        f"{CONFIG_NAME} [web_portal]; docs/portal.md",
        _DATA_DIR_RIGHTS,
        "n/a",
        "the web portal is off",
    )
    if not config.web_portal:
        return base
    listed = ", ".join(roles) if roles else "no role"
    if "admin" not in roles:
        return replace(base, executed="no", finding=f"required for {listed}; not for admin")
    return replace(base, executed="yes", finding=f"required for {listed}")


def _portal(config: ServerConfig) -> Measure:
    base = Measure(
        "recovery-portal",
        "Recovery portal callback over HTTPS with a private secret",
        "Give `portal_url` as https:// and keep `portal_secret_file` mode 600.",
        f"{CONFIG_NAME} [recovery]; docs/recovery.md",
        _DATA_DIR_RIGHTS,
        "n/a",
        "no recovery portal configured",
    )
    portal = config.portal
    if portal is None:
        return base
    problems = []
    if not portal.url.startswith("https://"):
        problems.append(f"{portal.url} is not https://")
    try:
        if portal.secret_file.stat().st_mode & 0o077:
            problems.append(f"{portal.secret_file} is readable by others")
    except OSError as exc:
        problems.append(f"{portal.secret_file}: {exc.strerror}")
    if problems:
        return replace(base, executed="no", finding="; ".join(problems))
    return replace(base, executed="yes", finding=f"{portal.url}; secret owner only")


@dataclass(frozen=True, slots=True)
class _DatabaseFacts:
    error: str | None = None
    plain_webhooks: tuple[str, ...] = ()
    webhooks: int = 0
    initial_token_active: bool = False
    audit_rows: int = 0
    audit_problems: tuple[str, ...] = ()


def _database_facts(config: ServerConfig) -> _DatabaseFacts:
    from tessera.server.audit import verify_chain
    from tessera.server.models import ApiToken, WebhookEndpoint
    from tessera.server.storage import Database, describe_db_error
    from tessera.server.tokens import INITIAL_TOKEN_NAME

    path = sqlite_file(config.database)
    if path is not None and not path.is_file():
        return _DatabaseFacts(error=f"the database file {path} does not exist")  # never create it
    try:
        db = Database(config.database, pool_size=1)
    except (ValueError, SQLAlchemyError) as exc:
        return _DatabaseFacts(error=f"cannot open the database: {exc}")
    try:
        with db.read() as session:
            urls = session.execute(select(WebhookEndpoint.url).where(WebhookEndpoint.active)).scalars().all()
            initial = session.execute(
                select(func.count())
                .select_from(ApiToken)
                .where(ApiToken.name == INITIAL_TOKEN_NAME, ApiToken.revoked.is_(False))
            ).scalar_one()
            chain = verify_chain(session)
    except SQLAlchemyError as exc:
        return _DatabaseFacts(error=describe_db_error(config.database, exc))
    finally:
        db.dispose()
    return _DatabaseFacts(
        plain_webhooks=tuple(u for u in urls if not u.startswith("https://")),
        webhooks=len(urls),
        initial_token_active=initial > 0,
        audit_rows=chain.rows,
        audit_problems=tuple(chain.problems),
    )


def _webhooks(facts: _DatabaseFacts) -> Measure:
    base = Measure(
        "webhooks-https",
        "Webhooks delivered over HTTPS only",
        "Register webhook endpoints with https:// URLs (plain http is accepted only to a "
        "loopback address, for a relay on the same host).",
        "docs/webhooks.md",
        "admin token",
        "yes",
        "",
    )
    if facts.error:
        return replace(base, executed="unchecked", finding=facts.error)
    if not facts.webhooks:
        return replace(base, executed="n/a", finding="no active webhook endpoints")
    if facts.plain_webhooks:
        return replace(base, executed="no", finding="plain http: " + ", ".join(facts.plain_webhooks))
    return replace(base, finding=f"{facts.webhooks} active endpoints, all https://")


def _database_credentials(config: ServerConfig) -> Measure:
    base = Measure(
        "database-credentials",
        "Database password outside the config file, encrypted connection off the host",
        "Leave the password out of the database URL in tessera.toml (use ~/.pgpass or "
        "PGPASSFILE) and add `sslmode=verify-full` (or `require`) when PostgreSQL is on "
        "another host.",
        f"{CONFIG_NAME} [server] database; docs/server.md (data directory)",
        _DATA_DIR_RIGHTS + "; the database's administrator",
        "yes",
        "",
    )
    try:
        url = make_url(config.database)
    except Exception:
        return replace(base, executed="unchecked", finding="the database URL cannot be parsed")
    if url.get_backend_name() == "sqlite":
        return replace(base, executed="n/a", finding="SQLite on this host: no password, no network")
    problems = []
    if url.password:
        problems.append("the URL in tessera.toml holds the password")
    host = url.host or ""
    sslmode = str(url.query.get("sslmode", ""))
    if host and not _is_loopback(host) and sslmode not in ("require", "verify-ca", "verify-full"):
        problems.append(f"{host} is another host and sslmode is {sslmode or 'not set'}")
    if problems:
        return replace(base, executed="no", finding="; ".join(problems))
    where = f"{host or 'local socket'}" + (f", sslmode={sslmode}" if sslmode else "")
    return replace(base, finding=f"no password in the URL; {where}")


def _initial_token(facts: _DatabaseFacts) -> Measure:
    base = Measure(
        "initial-token-revoked",
        "The token printed by `server init` replaced by named, scoped tokens",
        "Create a named token per person or integration with the least role it needs "
        "(`tessera token create`), then revoke the 'initial-admin' token.",
        "docs/server.md (admin API); `tessera token`",
        "admin token",
        "yes",
        "the initial admin token is revoked",
    )
    if facts.error:
        return replace(base, executed="unchecked", finding=facts.error)
    if facts.initial_token_active:
        return replace(base, executed="no", finding="the 'initial-admin' token is still active")
    return base


def _audit_chain(facts: _DatabaseFacts) -> Measure:
    base = Measure(
        "audit-chain-intact",
        "Audit log intact",
        "Verify the hash chain regularly (`tessera audit verify`) and keep its head, so that "
        "a removed or edited entry shows.",
        "docs/server.md (admin API); `tessera audit verify`",
        "token of role readonly, support or admin",
        "yes",
        "",
    )
    if facts.error:
        return replace(base, executed="unchecked", finding=facts.error)
    if facts.audit_problems:
        first = facts.audit_problems[0]
        more = len(facts.audit_problems) - 1
        return replace(base, executed="no", finding=first + (f" (and {more} more problems)" if more else ""))
    return replace(base, finding=f"{facts.audit_rows} entries, every link verified")


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.startswith("/"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
