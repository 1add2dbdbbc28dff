"""``tessera order``: the vendor's orders and the licenses that fulfil them (admin API).

An order is made by the first license issued for it (``license issue --order NUMBER``).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import typer
from rich.table import Table

from tessera.cli._common import console, emit_json
from tessera.cli.admin import CA, JSON, TOKEN, URL, AdminClient, ListOf
from tessera.cli.apps import app

__all__ = ["order_app"]

order_app = typer.Typer(
    help="Orders and their licenses (an order is made by `license issue --order`).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(order_app, name="order")


_ORDER = {"number": str, "customer_id": int, "status": str, "created_at": str}
_LICENSE = {"serial": str, "product": str, "machines_allowed": int, "status": str}
_ORDER_VIEW = {**_ORDER, "licenses": ListOf(_LICENSE)}


def _path(number: str) -> str:
    return f"/api/v1/orders/{quote(number, safe='')}"


def _print_order(order: dict[str, object]) -> None:
    when = str(order["created_at"])[:10]
    console.print(
        f"order {order['number']}: customer {order['customer_id']}, {order['status']}, since {when}",
        markup=False,
    )
    table = Table()
    for column in ("serial", "product", "machines", "status"):
        table.add_column(column)
    for lic in order["licenses"]:  # type: ignore[attr-defined]
        table.add_row(lic["serial"], lic["product"], str(lic["machines_allowed"]), lic["status"])
    console.print(table)


@order_app.command("list")
def order_list(
    customer: int | None = typer.Option(None, "--customer", help="Only this customer's orders."),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Orders, newest first, with how many licenses fulfil each."""
    params = {"customer_id": customer} if customer is not None else {}
    result = AdminClient(url, token, ca).request(
        "GET", "/api/v1/orders", params=params, expect=ListOf({**_ORDER, "licenses": int})
    )
    if as_json:
        emit_json({"orders": result})
        return
    table = Table()
    for column in ("order", "customer", "licenses", "status", "since"):
        table.add_column(column)
    for o in result:
        table.add_row(
            o["number"], str(o["customer_id"]), str(o["licenses"]), o["status"], o["created_at"][:10]
        )
    console.print(table)


@order_app.command("show")
def order_show(
    number: str = typer.Argument(..., help="The order number, e.g. PO-4711."),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """One order and its licenses."""
    result = AdminClient(url, token, ca).request("GET", _path(number), expect=_ORDER_VIEW)
    if as_json:
        emit_json(result)
    else:
        _print_order(result)


@order_app.command("cancel")
def order_cancel(
    number: str = typer.Argument(...),
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Cancel the order: each of its active licenses is revoked (the installations learn it
    at their next check-in), and no license can be issued for it any more. An order
    cancelled already stays as it is (exit 0, and the output says so)."""
    result = AdminClient(url, token, ca).request(
        "POST", _path(number) + "/cancel", expect={**_ORDER_VIEW, "cancelled_now": bool}
    )
    if as_json:
        emit_json(result)
        return
    if not result["cancelled_now"]:
        when = str(result.get("cancelled_at") or "")[:10]
        console.print(
            f"order {result['number']} was cancelled already{f' on {when}' if when else ''}: nothing changed",
            markup=False,
        )
    _print_order(result)
