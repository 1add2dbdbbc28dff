"""The admin client: ``product``, ``customer``, ``partner``, ``token`` and server-side
``license`` verbs, talking to the server's REST API.

Connection: ``--url/--token/--ca`` or ``TESSERA_URL``, ``TESSERA_TOKEN``, ``TESSERA_CA``.
Exit codes: 0 done; 1 the server refused or does not know the thing, cannot be
reached, or gave an answer that is not what the API promises (the input was fine: it is
the server's fault, like an unreachable one); 2 bad usage or input (the server's 422
names the field).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import ssl
import time
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import quote, urlsplit

import typer
from rich.table import Table

from tessera.cli._common import (
    EXIT_BAD_INPUT,
    EXIT_DENIED,
    FORCE,
    CliError,
    check_writable,
    cli_path,
    console,
    emit_json,
    fail,
    print_table,
    read_input_file,
    write_file_atomic,
)
from tessera.cli.apps import app, license_app
from tessera.cli.keys import load_keyring

if TYPE_CHECKING:
    import httpx

    from tessera.core.signing import Keyring

__all__ = [
    "AdminClient",
    "audit_app",
    "customer_app",
    "parse_entitlement",
    "partner_app",
    "product_app",
    "token_app",
]

_settings: dict[str, Any] = {"no_args_is_help": True, "pretty_exceptions_enable": False}
product_app = typer.Typer(help="Products and their features (admin API).", **_settings)
customer_app = typer.Typer(help="Customers (licensees).", **_settings)
partner_app = typer.Typer(help="Partners and their feature namespaces.", **_settings)
token_app = typer.Typer(help="API tokens and roles.", **_settings)
audit_app = typer.Typer(help="The hash-chained audit log of license changes.", **_settings)
app.add_typer(product_app, name="product")
app.add_typer(customer_app, name="customer")
app.add_typer(partner_app, name="partner")
app.add_typer(token_app, name="token")
app.add_typer(audit_app, name="audit")

URL = typer.Option(None, "--url", envvar="TESSERA_URL", help="Server URL, e.g. https://host:7790.")
TOKEN = typer.Option(None, "--token", envvar="TESSERA_TOKEN", help="API token.")
CA = typer.Option(
    None, "--ca", envvar="TESSERA_CA", help="CA certificate to trust (pinned).", parser=cli_path
)
JSON = typer.Option(False, "--json", help="Print one JSON object.")
VENDOR_KEY = typer.Option(
    None,
    "--vendor-key",
    envvar="TESSERA_VENDOR_KEY",
    help="Vendor keyring (vendor.pub): check the signature of files the server sends.",
    parser=cli_path,
)

#: The license template's options, shared by `license issue` and `license issue-bulk`.
CUSTOMER = typer.Option(..., "--customer", help="Customer id.")
PRODUCT = typer.Option(..., "--product", help="Product code.")
FEATURES = typer.Option(..., "--feature", help="CODE=COUNT[,EXPIRY], repeatable.")
LOCATION = typer.Option("main", "--location", help="Location (site) of these features.")
BINDING = typer.Option("machine", "--binding", help="machine, instance or user.")
MACHINES = typer.Option(1, "--machines", help="How many machines may be bound.")
VERSIONS = typer.Option("*", "--version", help="Licensed product versions, e.g. 4.*.")
FAILOVER_DAYS = typer.Option(30, "--failover-days")
CHECKPOINT_DAYS = typer.Option(None, "--checkpoint-days")
EMERGENCY_FEATURES = typer.Option([], "--emergency-feature", help="Repeatable.")
NO_CONNECT = typer.Option(False, "--no-connect", help="No periodic validation.")
VALIDATION_HOURS = typer.Option(24, "--validation-hours", help="Check-in interval.")
MATCH = typer.Option("medium", "--match", help="Locking ID tolerance: strict, medium, loose.")
RECOVERY_ALLOWANCE = typer.Option(None, "--recovery-allowance")
RECOVERY_INTERVAL_DAYS = typer.Option(None, "--recovery-interval-days")
ON_RECOVERY = typer.Option(
    "blacklist",
    "--on-recovery",
    help="After a recovery: blacklist the old container, or revoke only this license there.",
)
ORDER = typer.Option(None, "--order", help="The order the license fulfils.")
SEAL = typer.Option(False, "--seal", help="Encrypt entitlements to the license key.")

NULL = type(None)


class ListOf:
    """An answer that is a list whose every item has the shape ``item``."""

    def __init__(self, item: dict[str, Any]) -> None:
        self.item = item


#: What a verb needs from an answer: an object whose keys have these types (a tuple of
#: types means any of them; one with ``NULL`` may also be left out), or a list of such.
Shape = dict[str, Any] | ListOf


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {int: "a number", float: "a number", str: "text", dict: "an object", list: "a list"}.get(
        type(value), type(value).__name__
    )


def _is(value: Any, want: type) -> bool:
    if want is int:  # True is an int to Python, not to the API
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, want)


def shape_problem(answer: Any, shape: Shape) -> str | None:
    """Why ``answer`` does not have ``shape``, or None: the verbs index into answers, and a
    broken or impostor server must get one line, not a KeyError or a junk file."""
    if isinstance(shape, ListOf):
        if not isinstance(answer, list):
            return f"expected a list, got {_kind(answer)}"
        for i, item in enumerate(answer):
            problem = shape_problem(item, shape.item)
            if problem:
                return f"item {i}: {problem}"
        return None
    if not isinstance(answer, dict):
        return f"expected an object, got {_kind(answer)}"
    for key, want in shape.items():
        if isinstance(want, ListOf):
            problem = shape_problem(answer.get(key), want)
            if problem:
                return f"{key}: {problem}"
            continue
        wants = want if isinstance(want, tuple) else (want,)
        if key not in answer:
            if NULL in wants:
                continue
            return f"{key!r} is missing"
        if not any(_is(answer[key], w) for w in wants):
            return f"{key!r} is {_kind(answer[key])}, expected {' or '.join(_kind_of(w) for w in wants)}"
    return None


def _kind_of(want: type) -> str:
    return {NULL: "null", bool: "true/false", int: "a number", str: "text", dict: "an object"}.get(
        want, "a list" if want is list else want.__name__
    )


_ENTITLEMENT_RE = re.compile(r"^([^=,\s]+)=([0-9]{1,10})(?:,([0-9]{4}-[0-9]{2}-[0-9]{2}|permanent))?$")


class AdminClient:
    """A thin httpx client that turns every failure into one line and an exit code."""

    def __init__(self, url: str | None, token: str | None, ca: Path | None) -> None:
        if not url:
            fail("--url is required (or set TESSERA_URL)")
        if not url.startswith(("https://", "http://")):
            fail(f"--url must start with https:// or http://, not {url!r}")
        _check_url(url)
        if not token:
            fail("--token is required (or set TESSERA_TOKEN)")
        verify: ssl.SSLContext | bool = True
        if ca is not None:
            if ca.is_dir():
                fail(f"--ca {ca} is a directory, not a CA certificate file")
            if not ca.exists():
                fail(f"--ca {ca} does not exist")
            if not ca.is_file():
                fail(f"--ca {ca} is not a regular file")
            try:
                verify = ssl.create_default_context(cafile=str(ca))
            except (ssl.SSLError, OSError):
                fail(f"--ca {ca} is not a PEM CA certificate")
            verify.minimum_version = ssl.TLSVersion.TLSv1_2
        import httpx  # here, not at the top: every other verb starts faster without it

        self.url = url.rstrip("/")
        #: The CA file trusted alone (None: the system's store), for the TLS error's words.
        self._ca = ca
        try:
            self._client = httpx.Client(
                base_url=self.url,
                verify=verify,
                timeout=30.0,
                headers={"Authorization": f"Bearer {token}"},
            )
        except httpx.InvalidURL as exc:
            fail(f"--url {url!r} is not a valid URL: {_first_line(exc)}")

    def unexpected(self, why: str) -> NoReturn:
        fail(f"the server at {self.url} gave an unexpected answer ({why})", EXIT_DENIED)

    def request(self, method: str, path: str, *, expect: Shape | None = None, **kwargs: Any) -> Any:
        """The answer's JSON; with ``expect``, only an answer of that shape."""
        import httpx

        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            from tessera.core.tlsfailure import describe_tls_failure

            pinned = f"the CA of --ca ({self._ca})" if self._ca is not None else None
            tls = describe_tls_failure(
                exc,
                pinned=pinned,
                unpinned_hint="pass the server's CA certificate (its tls/ca.pem) with --ca or TESSERA_CA",
            )
            if tls is not None:
                fail(f"TLS failure talking to {self.url}: {tls}", EXIT_DENIED)
            fail(f"cannot reach the server at {self.url}: {_first_line(exc)}", EXIT_DENIED)
        except httpx.TimeoutException:
            fail(f"the server at {self.url} did not answer in time", EXIT_DENIED)
        except httpx.InvalidURL as exc:
            fail(f"--url {self.url!r} is not a valid URL: {_first_line(exc)}")
        except httpx.HTTPError as exc:
            fail(f"talking to {self.url} failed: {_first_line(exc)}", EXIT_DENIED)
        if response.status_code >= 400:
            _refused(response)
        try:
            answer = response.json()
        except ValueError:
            fail(f"the server at {self.url} sent a response that is not JSON", EXIT_DENIED)
        if expect is not None:
            problem = shape_problem(answer, expect)
            if problem:
                self.unexpected(problem)
        return answer

    def license_file(self, text: str, serial: str, keyring: Keyring | None, what: str = "license") -> str:
        """A license (or identity) file from an answer, checked before it reaches the disk:
        it parses, is the kind and serial asked for and, with the vendor keyring, is signed."""
        from tessera.core.errors import TesseraError
        from tessera.core.fileformat import parse
        from tessera.core.model import Identity, License
        from tessera.core.verify import verify_signature

        kind = Identity if what == "identity" else License
        try:
            signed = parse(text)
        except TesseraError as exc:
            self.unexpected(f"its {what} file does not parse: {exc}")
        if not isinstance(signed.document, kind) or signed.document.serial != serial:
            self.unexpected(f"its {what} file is not the {what} of {serial}")
        if keyring is not None:
            try:
                verify_signature(signed, keyring)
            except TesseraError as exc:
                self.unexpected(f"its {what} file is not signed by the vendor key: {exc}")
        return text


def _check_url(url: str) -> None:
    """Refuse a URL that can never work before any request: a bad port or a missing host
    otherwise surfaced as 'cannot reach' (exit 1) or an httpx InvalidURL (exit 70)."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number in 0-65535
    except ValueError as exc:
        fail(f"--url {url!r} is not a valid URL: {exc}")
    if not parts.hostname:
        fail(f"--url {url!r} has no host name")
    if port == 0:
        fail(f"--url {url!r}: port 0 is not a port a server listens on")
    if any(c.isspace() for c in url) or not url.isprintable():
        fail(f"--url {url!r} contains spaces or control characters")
    if parts.query or parts.fragment:
        fail(f"--url {url!r}: give the server's address only (no ?query or #fragment)")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _refused(response: httpx.Response) -> NoReturn:
    try:
        detail: Any = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):  # FastAPI validation errors: name the field
        parts = []
        for item in detail[:3]:
            loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
            parts.append(f"{loc}: {item.get('msg', 'invalid')}" if loc else str(item.get("msg")))
        detail = "; ".join(parts)
    if not isinstance(detail, str) or not detail:
        detail = response.reason_phrase or "error"
    status = response.status_code
    if status == 401:
        fail(f"not authorized: {detail}", EXIT_DENIED)
    if status == 403:
        fail(f"refused: {detail}", EXIT_DENIED)
    if status == 404:
        fail(f"not found: {detail}", EXIT_DENIED)
    if status == 422:
        fail(f"invalid input: {detail}", EXIT_BAD_INPUT)
    fail(f"server answered {status}: {detail}", EXIT_DENIED)


_PRODUCT: dict[str, Any] = {"code": str, "name": str, "features": dict}
_BULK: dict[str, Any] = {"licenses": list, "first_serial": str, "last_serial": str, "count": int}
_LICENSE_ROW: dict[str, Any] = {
    "serial": str, "status": str, "revision": int, "licensee": str, "product": str,
    "machines_allowed": int,
}  # fmt: skip
_MACHINE: dict[str, Any] = {
    "slot": int,
    "locking_id": str,
    "activated_at": str,
    "last_checkin_at": (str, NULL),
}
#: ``license show`` and ``license update``: what the table and the summary line read.
LICENSE_VIEW: dict[str, Any] = {
    **_LICENSE_ROW,
    "locations": dict,
    "machines": (list, NULL),
    "emergency": (list, NULL),
}


def parse_entitlement(text: str, location: str | None = None) -> dict[str, Any]:
    """``CODE=COUNT[,EXPIRY]`` (EXPIRY a date or ``permanent``) to the API's entitlement."""
    m = _ENTITLEMENT_RE.match(text.strip())
    if not m:
        fail(f"--feature {text!r}: expected CODE=COUNT[,EXPIRY], e.g. uniplex=5,2027-01-15")
    expiry: str | None = None
    if m.group(3) and m.group(3) != "permanent":
        try:
            expiry = date.fromisoformat(m.group(3)).isoformat()
        except ValueError:
            fail(f"--feature {text!r}: {m.group(3)} is not a date (YYYY-MM-DD)")
    item: dict[str, Any] = {"feature": m.group(1), "count": int(m.group(2)), "expiry": expiry}
    if location:
        item["location"] = location
    return item


def parse_entitlements(
    features: list[str], location: str | None = None, *, issuing: bool = False
) -> list[dict[str, Any]]:
    """Every ``--feature``, each code once: a repeat is a typo, and the server would keep
    only one of them without saying which. ``issuing``: a new license's counts are at least
    1 (a change may set 0); whether an expiry lies in the past is the server's to say, by
    its own date."""
    items = [parse_entitlement(f, location) for f in features]
    seen: dict[str, str] = {}
    for text, item in zip(features, items, strict=True):
        if issuing and item["count"] == 0:
            fail(f"--feature {text!r}: a new license grants at least 1 (a count of 0 grants nothing)")
        code = item["feature"]
        if code in seen:
            fail(f"--feature {text!r}: feature {code} is given twice (also {seen[code]!r})")
        seen[code] = text
    return items


# ---------------------------------------------------------------------------- product


@product_app.command("create")
def product_create(
    code: str = typer.Argument(..., help="Product code, e.g. cortex."),
    name: str = typer.Option(..., "--name", help="Product name."),
    feature: list[str] = typer.Option([], "--feature", help="CODE[=DESCRIPTION], repeatable."),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Create a product with its features."""
    features: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    for item in feature:
        fcode, _, description = item.partition("=")
        fcode = fcode.strip()
        if fcode in seen:
            fail(f"--feature {item!r}: feature code {fcode} is given twice (also {seen[fcode]!r})")
        seen[fcode] = item
        features.append({"code": fcode, "description": description.strip()})
    result = AdminClient(url, token, ca).request(
        "POST",
        "/api/v1/products",
        json={"code": code, "name": name, "features": features},
        expect=_PRODUCT,
    )
    if as_json:
        emit_json(result)
    else:
        count = len(result["features"])
        console.print(f"product {result['code']} created with {count} feature{'' if count == 1 else 's'}")


@product_app.command("show")
def product_show(
    code: str = typer.Argument(...),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Show a product and its features."""
    result = AdminClient(url, token, ca).request("GET", f"/api/v1/products/{_seg(code)}", expect=_PRODUCT)
    if as_json:
        emit_json(result)
        return
    table = Table(title=f"{result['code']}: {result['name']}")
    table.add_column("feature")
    table.add_column("description")
    for fcode, description in result["features"].items():
        table.add_row(fcode, description)
    print_table(table)


def _seg(value: str) -> str:
    """One URL path segment: a slash or dot-segment in user input must not change the route."""
    # Quoting is not enough for "/": the server decodes "%2F" before it routes.
    if not value or value in (".", "..") or len(value) > 64 or "/" in value:
        fail(f"{value!r} is not a valid identifier")
    return quote(value, safe="")


# ---------------------------------------------------------------------------- customer


@customer_app.command("create")
def customer_create(
    name: str = typer.Argument(..., help="Customer (licensee) name."),
    city: str | None = typer.Option(None, "--city"),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Create a customer; prints its id."""
    body: dict[str, Any] = {"name": name}
    if city is not None:
        body["city"] = city
    result = AdminClient(url, token, ca).request("POST", "/api/v1/customers", json=body, expect={"id": int})
    if as_json:
        emit_json(result)
    else:
        typer.echo(str(result["id"]))


# ---------------------------------------------------------------------------- partner


@partner_app.command("create")
def partner_create(
    code: str = typer.Argument(..., help="Partner code; its namespace is partner.<code>."),
    name: str = typer.Option(..., "--name"),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Create a partner with its own feature namespace."""
    result = AdminClient(url, token, ca).request(
        "POST", "/api/v1/partners", json={"code": code, "name": name}, expect={"code": str, "namespace": str}
    )
    if as_json:
        emit_json(result)
    else:
        console.print(f"partner {result['code']} created; namespace {result['namespace']}")


# ---------------------------------------------------------------------------- token


@token_app.command("create")
def token_create(
    role: str = typer.Option(..., "--role", help="admin, support, sales, partner, customer or readonly."),
    name: str = typer.Option(..., "--name", help="Who or what uses the token."),
    partner: str | None = typer.Option(None, "--partner", help="Partner code (role partner)."),
    customer: int | None = typer.Option(None, "--customer", help="Customer id (role customer)."),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Make an API token; the secret is printed only this once."""
    body: dict[str, Any] = {"role": role, "name": name}
    if partner is not None:
        body["partner"] = partner
    if customer is not None:
        body["customer_id"] = customer
    result = AdminClient(url, token, ca).request("POST", "/api/v1/tokens", json=body)
    if as_json:
        emit_json(result)
    else:
        typer.echo(result["token"])


@token_app.command("list")
def token_list(
    url: str | None = URL, token: str | None = TOKEN, ca: Path | None = CA, as_json: bool = JSON
) -> None:
    """Every API token with its id (to revoke it), revoked ones too; never a secret."""
    result = AdminClient(url, token, ca).request("GET", "/api/v1/tokens")
    if as_json:
        emit_json({"tokens": result})
        return
    table = Table()
    for column in ("id", "name", "role", "scope", "state", "created"):
        table.add_column(column)
    for t in result:
        scope = ""
        if t["partner"]:
            scope = f"partner {t['partner']}"
        elif t["customer_id"]:
            scope = f"customer {t['customer_id']}"
        table.add_row(
            str(t["id"]),
            t["name"],
            t["role"],
            scope,
            "revoked" if t["revoked"] else "active",
            t["created_at"][:16].replace("T", " "),
        )
    console.print(table, markup=False)


@token_app.command("revoke")
def token_revoke(
    token_id: int = typer.Argument(
        ..., min=1, max=2**31 - 1, metavar="ID", help="The id `token list` shows."
    ),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Revoke an API token at once (your own too; never the last active admin token)."""
    result = AdminClient(url, token, ca).request("DELETE", f"/api/v1/tokens/{token_id}")
    if as_json:
        emit_json(result)
        return
    console.print(f"token {result['id']} ({result['name']}) revoked", markup=False)
    if result["own"]:
        console.print("that was the token this command used: it no longer works", markup=False)


# ---------------------------------------------------------------------------- license


@license_app.command("issue")
def license_issue(
    customer: int = CUSTOMER,
    product: str = PRODUCT,
    feature: list[str] = FEATURES,
    location: str = LOCATION,
    binding: str = BINDING,
    machines: int = MACHINES,
    version: str = VERSIONS,
    failover_days: int = FAILOVER_DAYS,
    checkpoint_days: int | None = CHECKPOINT_DAYS,
    emergency_feature: list[str] = EMERGENCY_FEATURES,
    no_connect: bool = NO_CONNECT,
    validation_hours: int = VALIDATION_HOURS,
    match: str = MATCH,
    recovery_allowance: int | None = RECOVERY_ALLOWANCE,
    recovery_interval_days: int | None = RECOVERY_INTERVAL_DAYS,
    on_recovery: str = ON_RECOVERY,
    order: str | None = ORDER,
    seal: bool = SEAL,
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Turn an order into a license; prints its serial and license key (shown only once)."""
    body = _license_template(
        customer, product, feature, location, binding, machines, version, failover_days,
        checkpoint_days, emergency_feature, no_connect, validation_hours, match,
        recovery_allowance, recovery_interval_days, on_recovery, order, seal,
    )  # fmt: skip
    result = AdminClient(url, token, ca).request(
        "POST", "/api/v1/licenses", json=body, expect={"serial": str, "key": str}
    )
    if as_json:
        emit_json(result)
    else:
        console.print(f"serial {result['serial']}")
        console.print(f"key    {result['key']}")
        console.print("the license key is shown only this once")


def _license_template(
    customer: int,
    product: str,
    feature: list[str],
    location: str,
    binding: str,
    machines: int,
    version: str,
    failover_days: int,
    checkpoint_days: int | None,
    emergency_feature: list[str],
    no_connect: bool,
    validation_hours: int,
    match: str,
    recovery_allowance: int | None,
    recovery_interval_days: int | None,
    on_recovery: str,
    order: str | None,
    seal: bool,
) -> dict[str, Any]:
    """The API's license fields, shared by ``license issue`` and ``license issue-bulk``."""
    entitlements = parse_entitlements(feature, issuing=True)
    granted = {e["feature"] for e in entitlements}
    for code in emergency_feature:
        if code not in granted:
            fail(f"--emergency-feature {code}: not among the license's features (give it with --feature)")
    if len(set(emergency_feature)) != len(emergency_feature):
        fail("--emergency-feature: a feature is given twice")
    if checkpoint_days is not None and binding == "user":
        fail("--checkpoint-days: a user-bound license never checks in (its leases expire on their own)")
    if checkpoint_days is not None and no_connect:
        fail("--checkpoint-days: a checkpoint license is renewed by check-ins; not with --no-connect")
    return {
        "customer_id": customer,
        "product": product,
        "entitlements": entitlements,
        "location": location,
        "binding": binding,
        "machines": machines,
        "version": version,
        "failover_days": failover_days,
        "checkpoint_days": checkpoint_days,
        "emergency": emergency_feature,
        "connect": not no_connect,
        "validation_hours": validation_hours,
        "match": match,
        "recovery_allowance": recovery_allowance,
        "recovery_interval_days": recovery_interval_days,
        "recovery_old_container": on_recovery,
        "order": order,
        "seal": seal,
    }


#: Most licenses per request the server accepts (``MAX_BULK`` in tessera.server.schemas).
BULK_CAP = 10_000
#: How the server names one entry of ``locking_ids`` in a refusal: ``locking_ids[3]`` in its
#: own checks, ``locking_ids.3`` in a schema error, ``(also at [1])`` for a repeated one.
_CHUNK_INDEX_RE = re.compile(r"locking_ids(?:\[(\d+)\]|\.(\d+))|\(also at \[(\d+)\]\)")


#: A line of a ``--locking-ids`` file is at most this long (bytes, its newline included): a
#: Locking ID is at most 400 characters, the rest leaves room for blanks and a comment.
#: Longer is an error naming the line, so a file with no line ends (``/dev/zero``, a
#: binary) is refused after this many bytes instead of being read into memory whole.
LOCKING_ID_LINE_MAX = 1024
#: At most this many lines (blank and comment lines included) in a ``--locking-ids`` file:
#: twice the 100,000 licenses of a large bulk run (SPEC section 7). Every ID is held (and
#: parsed) before the first request, so this bounds the memory and the time to read it.
LOCKING_ID_LINES_MAX = 200_000


def _read_locking_ids(path: Path) -> tuple[list[str], list[int]]:
    """One Locking ID per line (blank lines and ``#`` comments skipped), and the file line of
    each. Every line is parsed as the server parses it (:meth:`LockingId.parse`, not just its
    ``TL1-`` prefix), so a bad file is refused, naming its line, before anything is issued:
    a refusal in chunk 3 would leave chunks 1 and 2 issued.

    Read line by line within :data:`LOCKING_ID_LINE_MAX` and :data:`LOCKING_ID_LINES_MAX`
    (a size check of the file is not enough: a device or a pipe has none), holding only
    the IDs."""
    from tessera.core.fingerprint import LockingId

    ids: list[str] = []
    lines: list[int] = []
    seen: dict[str, int] = {}
    try:
        if path.is_dir():
            fail(f"--locking-ids file {path} is a directory")
        with path.open("rb") as handle:
            for number in itertools.count(1):
                raw = handle.readline(LOCKING_ID_LINE_MAX + 1)
                if not raw:
                    break
                if number > LOCKING_ID_LINES_MAX:
                    fail(
                        f"--locking-ids {path}: more than {LOCKING_ID_LINES_MAX:,} lines "
                        "(split it into several runs)"
                    )
                if len(raw) > LOCKING_ID_LINE_MAX:
                    fail(
                        f"--locking-ids {path} line {number}: longer than {LOCKING_ID_LINE_MAX} bytes "
                        "(a Locking ID is at most 400 characters)"
                    )
                try:
                    item = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    fail(f"--locking-ids {path} line {number}: not text (one Locking ID per line)")
                if not item or item.startswith("#"):
                    continue
                shown = item if len(item) <= 60 else item[:57] + "..."
                if not item.startswith("TL1-"):
                    fail(f"--locking-ids {path} line {number}: {shown!r} is not a Locking ID (TL1-...)")
                try:
                    LockingId.parse(item)
                except ValueError as exc:
                    fail(f"--locking-ids {path} line {number}: {shown!r} is not a Locking ID ({exc})")
                if item in seen:
                    fail(
                        f"--locking-ids {path} line {number}: {item} is listed twice (also line {seen[item]})"
                    )
                seen[item] = number
                ids.append(item)
                lines.append(number)
    except FileNotFoundError:
        fail(f"--locking-ids file {path} does not exist")
    except PermissionError:
        fail(f"--locking-ids file {path} cannot be read (permission denied)")
    except OSError as exc:
        fail(f"--locking-ids file {path} cannot be read: {exc.strerror or exc}")
    if not ids:
        fail(f"--locking-ids {path}: no Locking IDs in the file")
    return ids, lines


def _name_file_lines(message: str, path: Path, lines: list[int]) -> str:
    """A server refusal of one chunk with its ``locking_ids`` indices (which count from the
    chunk's start) replaced by the lines of the file they came from: the admin edits the
    file, not the request."""

    def replace(found: re.Match[str]) -> str:
        index = int(next(g for g in found.groups() if g is not None))
        if index >= len(lines):
            return found.group(0)
        if found.group(3) is not None:
            return f"(also line {lines[index]})"
        return f"--locking-ids {path} line {lines[index]}"

    return _CHUNK_INDEX_RE.sub(replace, message)


class _StopRequests:
    """SIGINT and SIGTERM, while bulk licenses are being issued, only ask the loop to stop.

    The keys of a chunk exist nowhere but in the server's answer (the server keeps them
    hashed): dying between the request and the write would leave those serials issued with
    no key anywhere. So a signal is noted and acted on between chunks: the chunk in flight
    is received, written and synced, no further chunk is sent. A second signal changes
    nothing (the request in flight still ends by the client's timeout at the latest).
    SIGKILL cannot be caught: docs/server.md says what it may lose and how to find it.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _note(self, signum: int, _frame: object) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> _StopRequests:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@license_app.command("issue-bulk")
def license_issue_bulk(
    customer: int = CUSTOMER,
    product: str = PRODUCT,
    feature: list[str] = FEATURES,
    count: int | None = typer.Option(None, "--count", help="Issue this many unbound licenses."),
    locking_ids: Path | None = typer.Option(
        None,
        "--locking-ids",
        help="File with one Locking ID per line: one license each, bound to that machine, "
        "its license file signed now.",
        parser=cli_path,
    ),
    out: Path = typer.Option(
        ...,
        "-o",
        "--out",
        help="JSON Lines file to create: serial, key (and license file) per line.",
        parser=cli_path,
    ),
    chunk: int = typer.Option(
        5000, "--chunk", min=1, max=BULK_CAP, help="Licenses per request (one transaction each)."
    ),
    location: str = LOCATION,
    binding: str = BINDING,
    machines: int = MACHINES,
    version: str = VERSIONS,
    failover_days: int = FAILOVER_DAYS,
    checkpoint_days: int | None = CHECKPOINT_DAYS,
    emergency_feature: list[str] = EMERGENCY_FEATURES,
    no_connect: bool = NO_CONNECT,
    validation_hours: int = VALIDATION_HOURS,
    match: str = MATCH,
    recovery_allowance: int | None = RECOVERY_ALLOWANCE,
    recovery_interval_days: int | None = RECOVERY_INTERVAL_DAYS,
    on_recovery: str = ON_RECOVERY,
    order: str | None = ORDER,
    seal: bool = SEAL,
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Issue many licenses from one template (--count N, or one per machine with
    --locking-ids FILE); writes serial and key (shown only here) per line to OUT."""
    if (count is None) == (locking_ids is None):
        fail("give either --count N or --locking-ids FILE (exactly one)")
    ids, id_lines = _read_locking_ids(locking_ids) if locking_ids is not None else (None, [])
    total = len(ids) if ids is not None else int(count or 0)
    if total < 1:
        fail("--count must be at least 1")
    template = _license_template(
        customer, product, feature, location, binding, machines, version, failover_days,
        checkpoint_days, emergency_feature, no_connect, validation_hours, match,
        recovery_allowance, recovery_interval_days, on_recovery, order, seal,
    )  # fmt: skip
    client = AdminClient(url, token, ca)
    try:
        # Exclusive create: an existing file may hold the only copy of earlier keys.
        handle = out.open("x", encoding="utf-8")
    except FileExistsError:
        fail(f"-o {out} exists already: refusing to overwrite it (it may hold license keys)")
    except OSError as exc:
        fail(f"cannot create {out}: {exc.strerror}")
    issued = 0
    first_serial = last_serial = ""
    start = time.perf_counter()
    try:
        with handle, _StopRequests() as stop:
            while issued < total and stop.signum is None:
                size = min(chunk, total - issued)
                body = dict(template)
                if ids is not None:
                    body["locking_ids"] = ids[issued : issued + size]
                else:
                    body["count"] = size
                try:
                    result = client.request("POST", "/api/v1/licenses/bulk", json=body, expect=_BULK)
                except CliError as exc:
                    if ids is None or locking_ids is None:
                        raise
                    message = _name_file_lines(str(exc), locking_ids, id_lines[issued : issued + size])
                    raise CliError(message, exc.code) from None
                # Each chunk is on disk before the next is asked for: keys exist only here.
                lines = (json.dumps(item, separators=(",", ":")) + "\n" for item in result["licenses"])
                handle.write("".join(lines))
                handle.flush()
                os.fsync(handle.fileno())
                first_serial = first_serial or result["first_serial"]
                last_serial = result["last_serial"]
                issued += int(result["count"])
    except CliError as exc:
        if issued == 0:
            with contextlib.suppress(OSError):
                out.unlink()
            raise
        done = f"{issued} of {total} licenses were issued before: {first_serial}..{last_serial}"
        raise CliError(f"{exc} ({done}, in {out})", exc.code) from None
    if stop.signum is not None and issued < total:  # a signal after the last chunk: all done
        # The shell's convention: 128 + the signal (130 for SIGINT, 143 for SIGTERM).
        if issued == 0:
            with contextlib.suppress(OSError):
                out.unlink()
            fail("interrupted before any license was issued", 128 + stop.signum)
        where = f"{first_serial}..{last_serial} are in {out}"
        fail(f"interrupted after {issued} licenses ({where})", 128 + stop.signum)
    seconds = time.perf_counter() - start
    if as_json:
        emit_json(
            {
                "count": issued,
                "first_serial": first_serial,
                "last_serial": last_serial,
                "prebound": ids is not None,
                "output": str(out),
                "seconds": round(seconds, 3),
            }
        )
    else:
        what = "pre-bound licenses with signed files" if ids is not None else "licenses"
        console.print(
            f"{issued} {what} issued ({first_serial}..{last_serial}) in {seconds:.1f} s -> {out} "
            "(the keys are only in this file)",
            markup=False,
        )


def _view_problem(view: dict[str, Any]) -> str | None:
    """The nested parts of a license view the table reads (locations, machines)."""
    for loc, items in view["locations"].items():
        if not isinstance(items, dict):
            return f"locations.{loc} is {_kind(items)}, expected an object"
        for code, ent in items.items():
            problem = shape_problem(ent, {"count": int, "expiry": (str, NULL)})
            if problem:
                return f"locations.{loc}.{code}: {problem}"
    problem = shape_problem(view.get("machines") or [], ListOf(_MACHINE))
    return f"machines: {problem}" if problem else None


def _print_license(view: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    for name in ("serial", "status", "revision", "licensee", "product", "version", "binding"):
        table.add_row(name, str(view.get(name)))
    table.add_row("machines", f"{len(view.get('machines', []))} of {view.get('machines_allowed')} bound")
    table.add_row("failover days", str(view.get("failover_days")))
    if view.get("checkpoint_days"):
        table.add_row("checkpoint days", str(view["checkpoint_days"]))
    if view.get("emergency"):
        table.add_row("emergency", ", ".join(view["emergency"]))
    print_table(table)
    features = Table(title="entitlements")
    for col in ("location", "feature", "count", "expiry"):
        features.add_column(col)
    for loc, items in view.get("locations", {}).items():
        for code, ent in items.items():
            features.add_row(loc, code, str(ent["count"]), ent["expiry"] or "permanent")
    print_table(features)
    if view.get("machines"):
        bound = Table(title="machines")
        for col in ("slot", "locking id", "activated", "last check-in"):
            bound.add_column(col, overflow="fold")
        for m in view["machines"]:
            bound.add_row(str(m["slot"]), m["locking_id"], m["activated_at"], m["last_checkin_at"] or "-")
        print_table(bound)


@license_app.command("show")
def license_show(
    serial: str = typer.Argument(...),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Show a license: entitlements, policy, bound machines."""
    client = AdminClient(url, token, ca)
    view = client.request("GET", f"/api/v1/licenses/{_seg(serial)}", expect=LICENSE_VIEW)
    problem = _view_problem(view)
    if problem:
        client.unexpected(problem)
    if as_json:
        emit_json(view)
    else:
        _print_license(view)


@license_app.command("list")
def license_list(
    customer: int | None = typer.Option(None, "--customer", help="Only this customer's licenses."),
    revoked: bool = typer.Option(False, "--revoked", help="Only revoked licenses."),
    limit: int = typer.Option(100, "--limit", min=1, max=1000),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """List licenses, newest first (partners and customers see their own)."""
    params: dict[str, Any] = {"limit": limit}
    if customer is not None:
        params["customer_id"] = customer
    if revoked:
        params["status"] = "revoked"
    rows = AdminClient(url, token, ca).request(
        "GET", "/api/v1/licenses", params=params, expect=ListOf(_LICENSE_ROW)
    )
    if as_json:
        emit_json({"licenses": rows})
        return
    table = Table()
    for col in ("serial", "status", "rev", "licensee", "product", "machines"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["serial"], r["status"], str(r["revision"]), r["licensee"], r["product"],
            str(r["machines_allowed"]),
        )  # fmt: skip
    print_table(table)


@license_app.command("update")
def license_update(
    serial: str = typer.Argument(...),
    feature: list[str] = typer.Option([], "--feature", help="CODE=COUNT[,EXPIRY]: set (add or replace)."),
    remove_feature: list[str] = typer.Option([], "--remove-feature", help="Remove a feature."),
    location: str | None = typer.Option(None, "--location", help="Location of --feature."),
    machines: int | None = typer.Option(None, "--machines"),
    failover_days: int | None = typer.Option(None, "--failover-days"),
    revoke: bool = typer.Option(False, "--revoke", help="Withdraw the license everywhere."),
    reactivate: bool = typer.Option(
        False, "--reactivate", help="Put a revoked license back in force (not one of a cancelled order)."
    ),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Change a license centrally: a new revision reaches installations at their next check-in."""
    entitlements = parse_entitlements(feature, location)
    for code in remove_feature:
        if remove_feature.count(code) > 1:
            fail(f"--remove-feature {code} is given twice")
        if any(e["feature"] == code for e in entitlements):
            fail(f"feature {code} is both removed (--remove-feature) and set (--feature)")
    body: dict[str, Any] = {"entitlements": entitlements, "remove": remove_feature}
    if machines is not None:
        body["machines"] = machines
    if failover_days is not None:
        body["failover_days"] = failover_days
    if revoke and reactivate:
        fail("--revoke and --reactivate contradict each other (give one)")
    if revoke:
        body["status"] = "revoked"
    if reactivate:
        body["status"] = "active"
    if len(body) == 2 and not feature and not remove_feature:
        fail("nothing to change (give --feature, --remove-feature, --machines, ... )")
    view = AdminClient(url, token, ca).request(
        "PATCH", f"/api/v1/licenses/{_seg(serial)}", json=body, expect=LICENSE_VIEW
    )
    if as_json:
        emit_json(view)
    else:
        console.print(f"license {view['serial']} is now at revision {view['revision']}")


@license_app.command("activate-offline")
def license_activate_offline(
    request_file: Path = typer.Argument(
        ..., help="The request file written by `tessera agent request`.", parser=cli_path
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the license file.", parser=cli_path),
    vendor_key: Path | None = VENDOR_KEY,
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    force: bool = FORCE,
    as_json: bool = JSON,
) -> None:
    """Activate an offline installation: upload its request file, write its license file
    (and, for an instance-bound license, the identity file beside it, with suffix .par)."""
    data = read_input_file(request_file, "request file")
    if vendor_key is not None:
        load_keyring(vendor_key)  # a bad keyring is refused before the slot is bound
    try:
        json.loads(data)
    except ValueError:
        fail(f"request file {request_file} is not JSON (expected the file `tessera agent request` writes)")
    client = AdminClient(url, token, ca)
    check_writable(out, force=force)
    check_writable(out.with_suffix(".par"), force=force)
    result = client.request(
        "POST",
        "/api/v1/activate-offline",
        content=data,
        headers={"Content-Type": "application/json"},
        expect={"serial": str, "license": str, "identity": (str, NULL)},
    )
    keyring = load_keyring(vendor_key) if vendor_key is not None else None
    serial = result["serial"]
    license_text = client.license_file(result["license"], serial, keyring)
    identity = result.get("identity")
    identity_text = client.license_file(identity, serial, keyring, "identity") if identity else None
    identity_out = out.with_suffix(".par") if identity_text else None
    if identity_out is not None and identity_text is not None:
        # The identity part first: the agent imports it before the license it belongs to.
        write_file_atomic(identity_out, identity_text.encode("utf-8"), force=force)
    write_file_atomic(out, license_text.encode("utf-8"), force=force)
    if as_json:
        emit_json(
            {
                "serial": result["serial"],
                "file": str(out),
                "identity_file": None if identity_out is None else str(identity_out),
            }
        )
    else:
        console.print(f"license {result['serial']} for this machine -> {out}")
        if identity_out is not None:
            console.print(
                f"identity file -> {identity_out} (import it first; its admin secret is the license key)"
            )


# ---------------------------------------------------------------------------- audit


@audit_app.command("verify")
def audit_verify(
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Check the audit chain: exit 0 intact, 1 when a row was removed or edited."""
    report = AdminClient(url, token, ca).request(
        "GET", "/api/v1/audit/verify", expect={"ok": bool, "problems": list, "rows": int, "head": (str, NULL)}
    )
    if as_json:
        emit_json(report)
    else:
        for problem in report["problems"]:
            console.print(problem, markup=False)
        if report["ok"]:
            console.print(f"audit log intact: {report['rows']} entries, head {report['head']}")
    if not report["ok"]:
        fail(f"the audit log was tampered with ({len(report['problems'])} problems)", EXIT_DENIED)
