"""``tessera agent ...``: the license agent of this installation."""

from __future__ import annotations

import os

import typer

from tessera.cli._common import emit_json
from tessera.cli.apps import agent_app
from tessera.core.fingerprint import collect_facts, locking_id_for

DEFAULT_PRODUCT = "tessera"


def product_salt(product: str | None) -> str:
    return product or os.environ.get("TESSERA_PRODUCT") or DEFAULT_PRODUCT


@agent_app.command("locking-id")
def locking_id(
    product: str | None = typer.Option(
        None, "--product", help="Product code whose salt hashes the components (TESSERA_PRODUCT)."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Print this machine's Locking ID (salted hashes only; nothing raw leaves the machine)."""
    lid = locking_id_for(collect_facts(), product_salt(product))
    if as_json:
        emit_json({"locking_id": str(lid), "components": len(lid.components)})
    else:
        typer.echo(str(lid))
