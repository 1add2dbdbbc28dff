"""The command groups. Verbs live in one module per area and register on these."""

from __future__ import annotations

import typer

_settings = {"no_args_is_help": True, "pretty_exceptions_enable": False}

app = typer.Typer(
    name="tessera",
    help="Tessera: self-hosted software licensing (license server, agent and tools).",
    add_completion=False,
    **_settings,  # type: ignore[arg-type]
)
server_app = typer.Typer(help="Run and initialize the central license server.", **_settings)  # type: ignore[arg-type]
keys_app = typer.Typer(help="Vendor signing keys.", **_settings)  # type: ignore[arg-type]
license_app = typer.Typer(help="Sign, verify, issue and manage licenses.", **_settings)  # type: ignore[arg-type]
agent_app = typer.Typer(help="The license agent of this installation.", **_settings)  # type: ignore[arg-type]

app.add_typer(server_app, name="server")
app.add_typer(keys_app, name="keys")
app.add_typer(license_app, name="license")
app.add_typer(agent_app, name="agent")
