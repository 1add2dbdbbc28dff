"""Recovery and blacklist verbs of the admin client: ``license rehost``,
``license authorize-recovery``, ``license recoveries``, ``blacklist add|list|export`` and
``report blacklist-hits`` (see ``docs/recovery.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    print_table,
    write_file_atomic,
)
from tessera.cli.admin import CA, JSON, NULL, TOKEN, URL, VENDOR_KEY, AdminClient, ListOf, _seg
from tessera.cli.apps import app, license_app
from tessera.cli.keys import load_keyring
from tessera.core.blacklist import parse_blacklist
from tessera.core.errors import TesseraError

if TYPE_CHECKING:
    from tessera.core.signing import Keyring

__all__ = ["blacklist_app", "report_app"]

_settings: dict[str, Any] = {"no_args_is_help": True, "pretty_exceptions_enable": False}
blacklist_app = typer.Typer(help="Blacklisted containers (Locking IDs).", **_settings)
report_app = typer.Typer(help="Reports for follow-up.", **_settings)
app.add_typer(blacklist_app, name="blacklist")
app.add_typer(report_app, name="report")

DELAY = typer.Option(
    0, "--delay-days", min=0, max=3650, help="Days the shipped blacklist file waits before it acts."
)


_REHOST = {"serial": str, "slot": int, "locking_id": str, "reason": str, "license": (str, NULL)}
_ENTRY = {"locking_id": str, "scope": str, "since": str, "delay_days": int, "reason": str}


@license_app.command("rehost")
def license_rehost(
    serial: str = typer.Argument(...),
    locking_id: str = typer.Option(..., "--locking-id", help="The new container's Locking ID."),
    slot: int | None = typer.Option(None, "--slot", help="Which bound machine moves."),
    blacklist_old: bool = typer.Option(False, "--blacklist-old", help="Blacklist the whole old container."),
    revoke_only: bool = typer.Option(
        False, "--revoke-only", help="Only withdraw this license from the old container."
    ),
    delay_days: int = DELAY,
    out: Path | None = typer.Option(
        None, "-o", "--out", help="Also write the new machine's license file here.", parser=cli_path
    ),
    vendor_key: Path | None = VENDOR_KEY,
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    force: bool = FORCE,
    as_json: bool = JSON,
) -> None:
    """Move a license to a new container under its recovery rule (support, admin)."""
    if blacklist_old and revoke_only:
        fail("--blacklist-old and --revoke-only exclude each other")
    body: dict[str, Any] = {"locking_id": locking_id, "slot": slot, "delay_days": delay_days}
    if blacklist_old or revoke_only:
        body["old_container"] = "blacklist" if blacklist_old else "revoke"
    client = AdminClient(url, token, ca)
    keyring = load_keyring(vendor_key) if vendor_key is not None else None
    if out is not None:
        check_writable(out, force=force)
    result = client.request("POST", f"/api/v1/licenses/{_seg(serial)}/rehost", json=body, expect=_REHOST)
    if result["license"] is not None:
        client.license_file(result["license"], result["serial"], keyring)
    if out is not None:
        if result["license"] is None:
            fail("this license is sealed: the new machine gets its file when it activates")
        write_file_atomic(out, result["license"].encode("utf-8"), force=force)
    if as_json:
        emit_json(result)
    else:
        console.print(
            f"license {result['serial']} moved to {result['locking_id']} "
            f"(slot {result['slot']}): {result['reason']}",
            markup=False,
        )


@license_app.command("authorize-recovery")
def license_authorize_recovery(
    serial: str = typer.Argument(...),
    count: int = typer.Option(1, "--count", min=1, max=1000, help="How many extra recoveries."),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Allow extra recoveries beyond the license's rule (support, admin)."""
    result = AdminClient(url, token, ca).request(
        "POST",
        f"/api/v1/licenses/{_seg(serial)}/authorize-recovery",
        json={"count": count},
        expect={"serial": str, "recoveries_authorized": int},
    )
    if as_json:
        emit_json(result)
    else:
        console.print(
            f"license {result['serial']}: {result['recoveries_authorized']} authorized recoveries open"
        )


@license_app.command("recoveries")
def license_recoveries(
    serial: str = typer.Argument(...),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Every recovery decision on a license, granted or denied, and why."""
    rows = AdminClient(url, token, ca).request(
        "GET",
        f"/api/v1/licenses/{_seg(serial)}/recoveries",
        expect=ListOf({"at": str, "via": str, "granted": bool, "rule": str, "reason": str}),
    )
    if as_json:
        emit_json({"serial": serial, "recoveries": rows})
        return
    table = Table()
    for col in ("at", "via", "granted", "rule", "reason"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["at"], r["via"], "yes" if r["granted"] else "no", r["rule"], r["reason"])
    print_table(table)


@blacklist_app.command("add")
def blacklist_add(
    locking_id: str = typer.Argument(..., help="The container's Locking ID."),
    revoke_recovered_only: bool = typer.Option(
        False,
        "--revoke-recovered-only",
        help="Withdraw only the licenses recovered away from it, not the container.",
    ),
    delay_days: int = DELAY,
    reason: str = typer.Option("added by hand", "--reason"),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Blacklist a container: locked at its next check-in, refused at its next activation."""
    result = AdminClient(url, token, ca).request(
        "POST",
        "/api/v1/blacklist",
        json={
            "locking_id": locking_id,
            "revoke_recovered_only": revoke_recovered_only,
            "delay_days": delay_days,
            "reason": reason,
        },
        expect=_ENTRY,
    )
    wanted = ("recovered" if revoke_recovered_only else "container", delay_days)
    applied = (result["scope"], result["delay_days"]) == wanted
    if as_json:
        emit_json({**result, "applied": applied})
    else:
        console.print(f"{result['locking_id']} is blacklisted ({result['scope']})", markup=False)
    if not applied:
        # The server never weakens an existing entry (narrower scope, later enforcement
        # day) and then answers with the entry as it stands: saying only "is blacklisted"
        # hid that the new options were dropped.
        fail(
            f"{result['locking_id']} was blacklisted already ({_describe_entry(result)}); "
            f"the new options ({_describe_entry({'scope': wanted[0], 'delay_days': wanted[1]})}) "
            "were not applied: an existing entry is never weakened (narrowed or postponed)",
            EXIT_DENIED,
        )


def _describe_entry(entry: dict[str, Any]) -> str:
    scope = "whole container" if entry["scope"] == "container" else "recovered licenses only"
    since = f", since {entry['since']}" if entry.get("since") else ""
    return f"{scope}, delay {entry['delay_days']} days{since}"


@blacklist_app.command("list")
def blacklist_list(
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """The blacklisted containers."""
    rows = AdminClient(url, token, ca).request("GET", "/api/v1/blacklist", expect=ListOf(_ENTRY))
    if as_json:
        emit_json({"entries": rows})
        return
    table = Table()
    for col in ("locking_id", "scope", "since", "delay", "reason"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["locking_id"], r["scope"], r["since"], str(r["delay_days"]), r["reason"])
    print_table(table)


@blacklist_app.command("export")
def blacklist_export(
    out: Path = typer.Option(
        ..., "-o", "--out", help="Where to write the signed blacklist.", parser=cli_path
    ),
    vendor_key: Path | None = VENDOR_KEY,
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    force: bool = FORCE,
    as_json: bool = JSON,
) -> None:
    """Write the signed blacklist file to ship with the next product version."""
    client = AdminClient(url, token, ca)
    keyring = load_keyring(vendor_key) if vendor_key is not None else None
    check_writable(out, force=force)
    result = client.request(
        "POST",
        "/api/v1/blacklist/export",
        expect={"sequence": int, "containers": int, "serials": int, "file": str},
    )
    # The format says which agents can read the file: tessera/2 needs agents that know it.
    fmt = _check_blacklist(client, result, keyring)
    write_file_atomic(out, result["file"].encode("utf-8"), force=force)
    if as_json:
        emit_json(
            {k: result[k] for k in ("sequence", "containers", "serials")} | {"format": fmt, "file": str(out)}
        )
    else:
        console.print(
            f"blacklist {result['sequence']} ({result['containers']} containers, "
            f"{result['serials']} license entries, {fmt}) -> {out}",
            markup=False,
        )


def _check_blacklist(client: AdminClient, result: dict[str, Any], keyring: Keyring | None) -> str:
    """The file ships with the product and locks customers out: a junk or foreign one must
    not reach the disk looking like an export. Returns its format."""
    try:
        signed = parse_blacklist(result["file"])
    except TesseraError as exc:
        client.unexpected(f"its blacklist file does not parse: {exc}")
    got = signed.blacklist
    if (got.sequence, len(got.containers), len(got.serials)) != (
        result["sequence"], result["containers"], result["serials"]
    ):  # fmt: skip
        client.unexpected("its blacklist file does not match the export it reports")
    if keyring is not None:
        try:
            signed.verify(keyring)
        except TesseraError as exc:
            client.unexpected(f"its blacklist file is not signed by the vendor key: {exc}")
    return got.format


@report_app.command("blacklist-hits")
def report_blacklist_hits(
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Every time a blacklisted or recovered container was caught, for sales to follow up."""
    rows = AdminClient(url, token, ca).request(
        "GET",
        "/api/v1/reports/blacklist-hits",
        expect=ListOf(
            {"at": str, "locking_id": str, "serial": (str, NULL), "how": str, "action": str,
             "suppressed": (int, NULL)}
        ),
    )  # fmt: skip
    if as_json:
        emit_json({"hits": rows})
        return
    table = Table()
    for col in ("at", "locking_id", "serial", "how", "action", "hits"):
        table.add_column(col, overflow="fold")
    for r in rows:
        hits = 1 + int(r.get("suppressed") or 0)  # the row, and those the limit left out before it
        table.add_row(r["at"], r["locking_id"], r["serial"] or "-", r["how"], r["action"], str(hits))
    print_table(table)
