"""``tessera user``: the people who sign in to the web portal (admin API, admin token).

A password comes from ``--password-file`` (``-`` reads one line from standard input) or is
generated and printed once; no verb ever prompts. The server checks every password against
its policy and answers with the reason when one is too weak (exit 2).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import typer
from rich.table import Table

from tessera.cli._common import cli_path, console, emit_json, fail, read_input_file
from tessera.cli.admin import CA, JSON, TOKEN, URL, AdminClient
from tessera.cli.apps import app

__all__ = ["user_app"]

user_app = typer.Typer(
    help="People who sign in to the web portal ([interfaces] web_portal).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(user_app, name="user")

PASSWORD_FILE = typer.Option(
    None,
    "--password-file",
    help="Read the password from this file (first line; - for standard input). Without it "
    "a strong password is generated and printed once.",
    parser=cli_path,
)


def _password(path: Path | None) -> str | None:
    if path is None:
        return None
    if str(path) == "-":
        text = sys.stdin.readline(1024)
    else:
        try:
            text = read_input_file(path, "--password-file").decode("utf-8")
        except UnicodeDecodeError:
            fail(f"--password-file {path} is not UTF-8 text")
        text = text.splitlines()[0] if text.strip() else ""
    password = text.rstrip("\r\n")
    if not password:
        fail("--password-file: the file holds no password")
    return password


def _report(result: dict[str, Any], as_json: bool, done: str) -> None:
    if as_json:
        emit_json(result)
        return
    console.print(done, markup=False)
    if result.get("password"):
        console.print(f"password (shown once): {result['password']}", markup=False)


@user_app.command("create")
def user_create(
    username: str = typer.Argument(..., help="Lower-case sign-in name, e.g. maria.keller."),
    role: str = typer.Option(..., "--role", help="admin, support, sales, partner, customer or readonly."),
    customer: int | None = typer.Option(None, "--customer", help="Customer id (role customer)."),
    partner: str | None = typer.Option(None, "--partner", help="Partner code (role partner)."),
    password_file: Path | None = PASSWORD_FILE,
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Make a portal user with the rights of an API token of the same role and scope."""
    body: dict[str, Any] = {"username": username, "role": role}
    password = _password(password_file)
    if password is not None:
        body["password"] = password
    if customer is not None:
        body["customer_id"] = customer
    if partner is not None:
        body["partner"] = partner
    result = AdminClient(url, token, ca).request("POST", "/api/v1/users", json=body)
    _report(result, as_json, f"user {result['username']} created (role {result['role']})")


@user_app.command("list")
def user_list(
    url: str | None = URL, token: str | None = TOKEN, ca: Path | None = CA, as_json: bool = JSON
) -> None:
    """Every portal user: role, scope, disabled or locked."""
    result = AdminClient(url, token, ca).request("GET", "/api/v1/users")
    if as_json:
        emit_json({"users": result})
        return
    table = Table()
    for column in ("user", "role", "customer", "partner", "state", "two-step", "password changed"):
        table.add_column(column)
    for u in result:
        state = "disabled" if u["disabled"] else "locked" if u["locked"] else "active"
        table.add_row(
            u["username"],
            u["role"],
            str(u["customer_id"] or ""),
            str(u["partner_id"] or ""),
            state,
            "on" if u["two_factor"] else "off",
            u["password_changed_at"][:16].replace("T", " "),
        )
    console.print(table)


def _update(username: str, body: dict[str, Any], url: str | None, token: str | None, ca: Path | None) -> Any:
    return AdminClient(url, token, ca).request(
        "PATCH", f"/api/v1/users/{quote(username, safe='')}", json=body
    )


@user_app.command("password")
def user_password(
    username: str = typer.Argument(...),
    password_file: Path | None = PASSWORD_FILE,
    url: str | None = URL,
    token: str | None = TOKEN,
    ca: Path | None = CA,
    as_json: bool = JSON,
) -> None:
    """Set a new password (also unlocks); the user's portal sessions end."""
    password = _password(password_file)
    body: dict[str, Any] = {"password": password} if password is not None else {"generate_password": True}
    result = _update(username, body, url, token, ca)
    _report(result, as_json, f"user {username}: new password set")


def _switch(name: str, body: dict[str, Any], done: str, doc: str) -> None:
    """Register ``user NAME USERNAME``: one PATCH with ``body``, reported as ``done``."""

    def command(
        username: str = typer.Argument(...),
        url: str | None = URL,
        token: str | None = TOKEN,
        ca: Path | None = CA,
        as_json: bool = JSON,
    ) -> None:
        _report(_update(username, body, url, token, ca), as_json, f"user {username} {done}")

    command.__doc__ = doc
    user_app.command(name)(command)


_switch("disable", {"disabled": True}, "disabled", "Stop a user signing in; their portal sessions end.")
_switch("enable", {"disabled": False}, "enabled", "Let a disabled user sign in again.")
_switch("unlock", {"unlock": True}, "unlocked", "End the lockout after too many wrong passwords.")
_switch(
    "reset-2fa",
    {"reset_two_factor": True},
    "signs in with the password alone again",
    "Turn a user's two-step sign-in off (a lost phone); they set it up again, at their next "
    "sign-in if their role requires it.",
)
