"""User-bound licenses and webhooks from the command line.

Admin side (REST API, ``--url/--token/--ca``): ``license credential``, ``license leases``,
``webhook add|list|remove|deliveries``. Holder side (``tessera agent``): ``lease``,
``renew``, ``release`` with a credential file; they need no agent state directory.
"""

from __future__ import annotations

import signal
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from tessera.cli._common import (
    EXIT_DENIED,
    FORCE,
    check_writable,
    cli_path,
    console,
    emit_json,
    fail,
    read_input_file,
    write_file_atomic,
)
from tessera.cli.admin import CA, JSON, NULL, TOKEN, URL, AdminClient, ListOf, _seg
from tessera.cli.apps import agent_app, app, license_app
from tessera.cli.keys import load_keyring
from tessera.core.credential import parse_credential
from tessera.core.errors import TesseraError

__all__ = ["webhook_app"]

_settings: dict[str, Any] = {"no_args_is_help": True, "pretty_exceptions_enable": False}
#: A delivery's statuses, as the server's ``tessera.server.webhooks.DELIVERY_STATUSES``
#: (not imported: this client does not load the server's modules).
DELIVERY_STATUSES = ("pending", "delivered", "failed", "cancelled")
webhook_app = typer.Typer(help="Webhooks: license events sent to your endpoints.", **_settings)
app.add_typer(webhook_app, name="webhook")


# ---------------------------------------------------------------------------- admin


@license_app.command("credential")
def license_credential(
    serial: str = typer.Argument(..., help="A user-bound license."),
    user: str = typer.Option(..., "--user", help="Who the credential is for (an id, e.g. ann)."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the credential file.", parser=cli_path),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    force: bool = FORCE,
    as_json: bool = JSON,
) -> None:
    """Issue USER's credential file; issuing again invalidates the previous file at once."""
    client = AdminClient(url, token, ca)
    check_writable(out, force=force)
    result = client.request(
        "POST",
        f"/api/v1/licenses/{_seg(serial)}/credentials",
        json={"user_id": user},
        expect={"credential": str, "serial": str, "user_id": str, "generation": int, "leases_freed": int},
    )
    try:
        parse_credential(result["credential"])
    except TesseraError as exc:
        client.unexpected(f"its credential file does not parse: {exc}")
    write_file_atomic(out, result["credential"].encode("utf-8"), mode=0o600, force=force)
    info = {k: result[k] for k in ("serial", "user_id", "generation", "leases_freed")}
    if as_json:
        emit_json({**info, "file": str(out)})
    else:
        console.print(
            f"credential of {info['user_id']} for {info['serial']} (generation "
            f"{info['generation']}) -> {out}",
            markup=False,
        )


@license_app.command("leases")
def license_leases(
    serial: str = typer.Argument(...),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Credentials and the leases in force on a user-bound license."""
    view = AdminClient(url, token, ca).request(
        "GET",
        f"/api/v1/licenses/{_seg(serial)}/leases",
        expect={"serial": str, "credentials": list, "leases": list},
    )
    if as_json:
        emit_json(view)
        return
    for c in view["credentials"]:
        console.print(f"credential {c['user_id']} generation {c['generation']}", markup=False)
    table = Table(title=f"leases of {view['serial']}")
    for col in ("feature", "user", "lease id", "expires"):
        table.add_column(col)
    for lease in view["leases"]:
        table.add_row(lease["feature"], lease["user_id"] or "-", lease["lease_id"], lease["expires_at"])
    console.print(table)


@webhook_app.command("add")
def webhook_add(
    endpoint: str = typer.Argument(..., help="https:// URL that receives the events."),
    secret: str | None = typer.Option(
        None, "--secret", help="HMAC secret (16+ characters); generated and printed if omitted."
    ),
    event: list[str] = typer.Option([], "--event", help="Only these events (repeatable)."),
    endpoint_ca: Path | None = typer.Option(
        None, "--endpoint-ca", help="PEM CA that signed the endpoint's certificate.", parser=cli_path
    ),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Send license events to ENDPOINT (signed with HMAC-SHA256, retried with backoff)."""
    body: dict[str, Any] = {"url": endpoint, "events": event}
    if secret is not None:
        body["secret"] = secret
    if endpoint_ca is not None:
        body["ca"] = read_input_file(endpoint_ca, "CA certificate").decode("utf-8", "replace")
    result = AdminClient(url, token, ca).request(
        "POST", "/api/v1/webhooks", json=body, expect={"id": int, "url": str, "secret": (str, NULL)}
    )
    if as_json:
        emit_json(result)
        return
    console.print(f"webhook {result['id']} -> {result['url']}", markup=False)
    if secret is None:
        console.print(f"secret {result['secret']} (shown only this once)", markup=False)


@webhook_app.command("list")
def webhook_list(
    url: str | None = URL, token: str | None = TOKEN, ca: Path | None = CA, as_json: bool = JSON
) -> None:
    """The registered endpoints."""
    rows = AdminClient(url, token, ca).request(
        "GET", "/api/v1/webhooks", expect=ListOf({"id": int, "url": str, "events": list})
    )
    if as_json:
        emit_json({"webhooks": rows})
        return
    for r in rows:
        console.print(f"{r['id']}  {r['url']}  {', '.join(r['events'])}", markup=False)


@webhook_app.command("remove")
def webhook_remove(
    endpoint_id: int = typer.Argument(...),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
) -> None:
    """Stop sending events to an endpoint (its pending deliveries are cancelled)."""
    AdminClient(url, token, ca).request("DELETE", f"/api/v1/webhooks/{endpoint_id}")
    console.print(f"webhook {endpoint_id} removed", markup=False)


@webhook_app.command("deliveries")
def webhook_deliveries(
    status: str | None = typer.Option(
        None, "--status", help=f"Only deliveries in this status: {', '.join(DELIVERY_STATUSES)}."
    ),
    limit: int = typer.Option(100, "--limit", min=1, max=10_000),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """The outbox: every event per endpoint, its status, attempts and last error."""
    if status is not None and status not in DELIVERY_STATUSES:
        fail(f"--status must be one of {', '.join(DELIVERY_STATUSES)}, not {status!r}")
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    rows = AdminClient(url, token, ca).request(
        "GET",
        "/api/v1/webhooks/deliveries",
        params=params,
        expect=ListOf({"id": int, "event": str, "status": str, "attempts": int, "last_error": (str, NULL)}),
    )
    if as_json:
        emit_json({"deliveries": rows})
        return
    for r in rows:
        line = f"{r['id']}  {r['event']}  {r['status']}  attempts {r['attempts']}"
        console.print(line + (f"  ({r['last_error']})" if r["last_error"] else ""), markup=False)


# ---------------------------------------------------------------------------- holder

CREDENTIAL = typer.Option(..., "--credential", help="The credential file issued to you.", parser=cli_path)
SERVER = typer.Option(..., "--server", help="License server URL (https://...).")
SERVER_CA = typer.Option(None, "--ca", help="The server's CA certificate, pinned.", parser=cli_path)
VENDOR_KEY = typer.Option(
    None, "--vendor-key", envvar="TESSERA_VENDOR_KEY", help="Vendor keyring vendor.pub.", parser=cli_path
)


def _client(credential: Path, server: str, ca: Path | None, vendor_key: Path | None, feature: str) -> Any:
    from tessera.agent.leasing import LeaseClient
    from tessera.cli.agent_cmds import _global
    from tessera.core.credential import parse_credential
    from tessera.core.model import check_feature_code

    try:
        check_feature_code(feature)
    except ValueError as exc:
        fail(str(exc))

    key_path = vendor_key or _global.vendor_key
    if key_path is None:
        fail("--vendor-key is required (or set TESSERA_VENDOR_KEY)")
    keyring = load_keyring(key_path)
    parsed = parse_credential(read_input_file(credential, "credential file"))
    ca_pem = read_input_file(ca, "CA certificate") if ca is not None else None
    return LeaseClient(parsed, server, ca_pem, keyring)


def _lease_json(lease: Any) -> dict[str, Any]:
    return {
        "feature": lease.feature,
        "lease_id": lease.lease_id,
        "expires": lease.expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "in_use": lease.in_use,
        "count": lease.count,
    }


@agent_app.command("lease")
def agent_lease(
    feature: str = typer.Argument(..., help="Feature code to lease."),
    credential: Path = CREDENTIAL,
    server: str = SERVER,
    ca: Path | None = SERVER_CA,
    vendor_key: Path | None = VENDOR_KEY,
    hold: bool = typer.Option(
        False, "--hold", help="Keep the lease alive with heartbeats until stopped, then release it."
    ),
    as_json: bool = JSON,
) -> None:
    """Lease FEATURE of a user-bound license (exit 1 with the reason when none is free)."""
    client = _client(credential, server, ca, vendor_key, feature)
    try:
        lease = client.hold(feature) if hold else client.lease(feature)
        if as_json:
            emit_json(_lease_json(lease))
        else:
            console.print(
                f"{feature}: leased ({lease.in_use} of {lease.count} in use), lease "
                f"{lease.lease_id} until {lease.expires:%Y-%m-%d %H:%M:%S}Z",
                markup=False,
            )
        if hold:
            _wait_for_stop(lambda: lease.lost)
            if lease.lost:
                fail(f"lease of {feature} lost: {lease.lost}", EXIT_DENIED)
    finally:
        client.close()


def _wait_for_stop(lost: Any) -> None:
    """Block until SIGTERM/SIGINT (or the lease is lost); the caller then releases."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.2):
        if lost():
            return


@agent_app.command("renew")
def agent_renew(
    feature: str = typer.Argument(...),
    lease_id: str = typer.Argument(...),
    credential: Path = CREDENTIAL,
    server: str = SERVER,
    ca: Path | None = SERVER_CA,
    vendor_key: Path | None = VENDOR_KEY,
    as_json: bool = JSON,
) -> None:
    """Heartbeat: keep LEASE_ID of FEATURE alive for another lease period."""
    from tessera.agent.leasing import Lease

    client = _client(credential, server, ca, vendor_key, feature)
    try:
        lease = client.renew(Lease(feature, lease_id, datetime.now(UTC), 0, 0))
    finally:
        client.close()
    if as_json:
        emit_json(_lease_json(lease))
    else:
        console.print(f"{feature}: lease {lease_id} renewed until {lease.expires:%H:%M:%S}Z", markup=False)


@agent_app.command("release")
def agent_release(
    feature: str = typer.Argument(...),
    lease_id: str = typer.Argument(...),
    credential: Path = CREDENTIAL,
    server: str = SERVER,
    ca: Path | None = SERVER_CA,
    vendor_key: Path | None = VENDOR_KEY,
    as_json: bool = JSON,
) -> None:
    """Give LEASE_ID of FEATURE back now (exit 0 also when you held no such lease: then
    nothing changed, and the output says so)."""
    client = _client(credential, server, ca, vendor_key, feature)
    try:
        result = client.give_back(lease_id, feature)
    finally:
        client.close()
    if result.released:
        message = f"{feature}: lease {lease_id} released ({result.in_use} in use)"
    else:
        message = (
            f"{feature}: nothing released: you hold no lease {lease_id} of {feature} in force "
            f"(released or expired already, or not yours) ({result.in_use} in use)"
        )
    if as_json:
        emit_json(
            {
                "feature": feature,
                "lease_id": lease_id,
                "released": result.released,
                "in_use": result.in_use,
                "message": message,
            }
        )
    else:
        console.print(message, markup=False)
