"""``tessera agent ...``: the license agent of this installation.

Every verb takes the agent options (``--state-dir``, ``--vendor-key``, ``--product``,
``--product-version``) either after ``agent`` or after the verb, or from the environment
(``TESSERA_AGENT_DIR``, ``TESSERA_VENDOR_KEY``, ``TESSERA_PRODUCT``,
``TESSERA_PRODUCT_VERSION``). Product code and version are remembered in the state
directory, so after the first verb only the state directory and vendor key are needed.
"""

from __future__ import annotations

import functools
import inspect
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import typer

from tessera.cli._common import (
    EXIT_BAD_INPUT,
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
from tessera.cli.apps import agent_app
from tessera.cli.keys import load_keyring
from tessera.core.errors import clipped
from tessera.core.fingerprint import collect_facts, locking_id_for

_OPTION_NAMES = ("state_dir", "vendor_key", "product", "product_version")

F = TypeVar("F", bound=Callable[..., Any])


def product_salt(product: str | None) -> str:
    from tessera.agent.agent import DEFAULT_SALT  # one default, shared with the library

    return product or os.environ.get("TESSERA_PRODUCT") or DEFAULT_SALT


@dataclass
class _AgentOptions:
    state_dir: Path | None = None
    vendor_key: Path | None = None
    product: str | None = None
    product_version: str | None = None


_global = _AgentOptions()


def _option_params() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter(
            "state_dir",
            kw,
            annotation=Path | None,
            default=typer.Option(
                None, "--state-dir", help="Agent state directory (TESSERA_AGENT_DIR).", parser=cli_path
            ),
        ),
        inspect.Parameter(
            "vendor_key",
            kw,
            annotation=Path | None,
            default=typer.Option(
                None, "--vendor-key", help="Vendor keyring vendor.pub (TESSERA_VENDOR_KEY).", parser=cli_path
            ),
        ),
        inspect.Parameter(
            "product",
            kw,
            annotation=str | None,
            default=typer.Option(
                None, "--product", help="Product code, also the Locking ID salt (TESSERA_PRODUCT)."
            ),
        ),
        inspect.Parameter(
            "product_version",
            kw,
            annotation=str | None,
            default=typer.Option(
                None, "--product-version", help="Running product version (TESSERA_PRODUCT_VERSION)."
            ),
        ),
    ]


def _with_agent_options(func: F) -> F:
    """Let a verb take the agent options after its name too (they win over the group's)."""
    sig = inspect.signature(func, eval_str=True)
    params = list(sig.parameters.values()) + _option_params()

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for name in _OPTION_NAMES:
            value = kwargs.pop(name, None)
            if value is not None:
                setattr(_global, name, value)
        return func(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper  # type: ignore[return-value]


@agent_app.callback()
def agent_options(
    state_dir: Path | None = typer.Option(
        None, "--state-dir", help="Agent state directory (TESSERA_AGENT_DIR).", parser=cli_path
    ),
    vendor_key: Path | None = typer.Option(
        None, "--vendor-key", help="Vendor keyring (TESSERA_VENDOR_KEY).", parser=cli_path
    ),
    product: str | None = typer.Option(None, "--product", help="Product code (TESSERA_PRODUCT)."),
    product_version: str | None = typer.Option(None, "--product-version", help="Product version."),
) -> None:
    """The license agent of this installation."""
    _global.state_dir = state_dir
    _global.vendor_key = vendor_key
    _global.product = product
    _global.product_version = product_version


# ------------------------------------------------------------------------- opening


def _state_dir() -> Path:
    if _global.state_dir is not None:
        return _global.state_dir
    env = os.environ.get("TESSERA_AGENT_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tessera" / "agent"


def _remembered(state_dir: Path) -> dict[str, str]:
    db_path = state_dir / "state.db"
    if not db_path.exists():
        return {}
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute(
                "SELECT name, value FROM meta WHERE name IN ('product', 'product_version', 'lockid_salt')"
            ).fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return {}
    return {str(k): str(v) for k, v in rows}


def _product_version(product: str | None, remembered: dict[str, str]) -> str | None:
    """The running version: given, remembered, or unknown (then no version-range check)."""
    value = _global.product_version or os.environ.get("TESSERA_PRODUCT_VERSION")
    if value:
        return value
    if remembered.get("product") == product and remembered.get("product_version"):
        from tessera.core.versions import parse_version

        try:
            parse_version(remembered["product_version"])
        except ValueError:
            return None  # stored by an older agent that did not check it
        return remembered["product_version"]
    return None


def _open_agent(*, restoring: bool = False, create: bool = True) -> Any:
    """The agent of the state directory. With ``create=False`` (the verbs that only look,
    or can change nothing where nothing is installed) a directory without an installation
    is left as it is, not even made, and the answer is None."""
    from tessera.agent import Agent, NotInstalled, StateError

    state_dir = _state_dir()
    remembered = _remembered(state_dir)
    # Without a product the CLI is the generic agent: it adopts the product of its license.
    product = _global.product or os.environ.get("TESSERA_PRODUCT") or remembered.get("product")
    version = _product_version(product, remembered)
    key_path = _global.vendor_key or (
        Path(os.environ["TESSERA_VENDOR_KEY"]) if os.environ.get("TESSERA_VENDOR_KEY") else None
    )
    if key_path is None:
        fail("--vendor-key is required (or set TESSERA_VENDOR_KEY)")
    keyring = load_keyring(key_path)
    try:
        return Agent(state_dir, keyring, product, version, restoring=restoring, create=create)
    except NotInstalled:
        return None
    except StateError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except ValueError as exc:
        fail(str(exc), EXIT_BAD_INPUT)


def _state_errors(func: F) -> F:
    """A state directory that cannot be written is bad input (exit 2), one line."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from tessera.agent import StateError

        try:
            return func(*args, **kwargs)
        except StateError as exc:
            fail(str(exc), EXIT_BAD_INPUT)

    return wrapper  # type: ignore[return-value]


def _not_installed() -> str:
    """Why a verb has nothing to work on: the state directory, named (a mistyped
    ``--state-dir`` shows), holds no installation."""
    return f"nothing is installed in {_state_dir()} (never activated)"


_NO_LICENSE = "activate online (tessera agent activate) or import a license file"


def _verb(name: str) -> Callable[[F], F]:
    def register(func: F) -> F:
        agent_app.command(name)(_with_agent_options(_state_errors(func)))
        return func

    return register


def _print_status(status: Any, as_json: bool) -> None:
    if as_json:
        emit_json(status.to_json())
        return
    console.print(f"state      {status.state.value}", markup=False)
    if status.failover_days_left is not None:
        console.print(f"failover   {status.failover_days_left} day(s) left", markup=False)
    if status.serial:
        console.print(f"license    {status.serial} ({status.licensee})", markup=False)
    console.print(f"message    {status.message}", markup=False)
    for code, grant in sorted(status.features.items()):
        info = grant.to_json()
        console.print(f"feature    {code} = {info['count']}, {info['expiry']}", markup=False)
    for code, why in sorted(status.denied.items()):
        console.print(f"refused    {code}: {why}", markup=False)
    for code, n in sorted(status.over_assigned.items()):
        console.print(f"over       {code}: {n} more holder(s) than licensed", markup=False)


# ------------------------------------------------------------------------- verbs


@agent_app.command("locking-id")
def locking_id(
    product: str | None = typer.Option(
        None, "--product", help="Product code whose salt hashes the components (TESSERA_PRODUCT)."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Print this machine's Locking ID (salted hashes only; nothing raw leaves the machine)."""
    chosen = product or _global.product or os.environ.get("TESSERA_PRODUCT")
    remembered = _remembered(_state_dir())
    chosen = chosen or remembered.get("lockid_salt") or remembered.get("product")
    lid = locking_id_for(collect_facts(), product_salt(chosen))
    if as_json:
        emit_json({"locking_id": str(lid), "components": len(lid.components)})
    else:
        typer.echo(str(lid))


@_verb("status")
def status(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Show the licensing state, failover days left and the features usable now."""
    from tessera.agent import AgentState, AgentStatus

    agent = _open_agent(create=False)
    if agent is None:
        message = f"no license: {_not_installed()}; {_NO_LICENSE}"
        _print_status(AgentStatus(AgentState.UNLICENSED, None, message=message), as_json)
        return
    with agent:
        _print_status(agent.status(), as_json)


@_verb("check")
def check(
    feature: str = typer.Argument(..., help="Feature code."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Exit 0 if FEATURE may be used now, 1 (with the reason) if not."""
    from tessera.agent import FeatureDenied
    from tessera.core.errors import FormatError
    from tessera.core.model import check_feature_code

    try:
        check_feature_code(feature)
    except ValueError as exc:
        raise FormatError(str(exc)) from None  # bad usage (2), not a denial (1)
    agent = _open_agent(create=False)
    try:
        if agent is None:
            raise FeatureDenied(feature, f"no license: {_not_installed()}; {_NO_LICENSE}")
        with agent:
            agent.require(feature)
    except FeatureDenied as exc:
        if as_json:
            emit_json({"feature": feature, "allowed": False, "reason": exc.reason})
            raise typer.Exit(1) from None
        raise
    if as_json:
        emit_json({"feature": feature, "allowed": True})
    else:
        typer.echo(f"{feature}: allowed")


@_verb("import")
def import_file(
    file: Path = typer.Argument(..., help="A license (.lic) or identity (.par) file.", parser=cli_path),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Verify a license file and put it in force (a file that fails changes nothing)."""
    data = read_input_file(file, "license file")
    with _open_agent() as agent:
        _print_status(agent.import_license(data), as_json)


@_verb("import-blacklist")
def import_blacklist(
    file: Path = typer.Argument(
        ..., help="A blacklist file from `tessera blacklist export`.", parser=cli_path
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Put the vendor's signed blacklist in force (forged, altered or older files are refused)."""
    data = read_input_file(file, "blacklist file")
    with _open_agent() as agent:
        sequence = agent.import_blacklist(data)
        status = agent.status()
    if as_json:
        emit_json({"sequence": sequence, "state": status.state.value})
    else:
        typer.echo(f"blacklist {sequence} is in force; this installation is {status.state.value}")


@_verb("assign")
def assign(
    feature: str = typer.Argument(...),
    subject: str = typer.Argument(..., help="User or interface that gets a seat."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Give SUBJECT a seat of FEATURE (never beyond the licensed count)."""
    from tessera.agent import Agent, SeatError

    Agent.check_seat_arguments(feature, subject)  # bad input is exit 2 wherever it is given
    agent = _open_agent(create=False)
    if agent is None:
        raise SeatError(f"feature {feature} is not licensed here: {_not_installed()}")
    with agent:
        added = agent.assign(feature, subject)
    if as_json:
        emit_json({"feature": feature, "subject": subject, "assigned": True, "already": not added})
    else:
        typer.echo(f"{subject} holds {feature}" + ("" if added else " (already)"))


@_verb("unassign")
def unassign(
    feature: str = typer.Argument(...),
    subject: str = typer.Argument(...),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Take SUBJECT's seat of FEATURE back."""
    from tessera.agent import SeatError

    agent = _open_agent(create=False)
    if agent is None:
        raise SeatError(f"{clipped(subject)} holds no seat of {clipped(feature)}: {_not_installed()}")
    with agent:
        agent.unassign(feature, subject)
    if as_json:
        emit_json({"feature": feature, "subject": subject, "assigned": False})
    else:
        typer.echo(f"{subject} no longer holds {feature}")


@_verb("seats")
def seats(as_json: bool = typer.Option(False, "--json")) -> None:
    """Who holds which feature; over-assigned features (count reduced centrally) are flagged."""
    agent = _open_agent(create=False)
    if agent is None:
        report = {}
    else:
        with agent:
            report = agent.seats()
    if as_json:
        emit_json({"seats": {code: s.to_json() for code, s in report.items()}})
        return
    for code, s in report.items():
        note = f", {s.over_assigned} over the licensed count" if s.over_assigned else ""
        console.print(f"{code}: {len(s.subjects)} of {s.licensed}{note}", markup=False)
        for who in s.subjects:
            console.print(f"  {who}", markup=False)


@_verb("activate")
def activate(
    server: str = typer.Option(..., "--server", help="License server URL (https://...)."),
    ca: Path | None = typer.Option(
        None, "--ca", help="The server's CA certificate, pinned.", parser=cli_path
    ),
    key: str = typer.Option(..., "--key", help="The license key."),
    recover: bool = typer.Option(
        False,
        "--recover",
        help="Move the license here from its bound machine (hardware replaced); the "
        "license's recovery rule decides.",
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Activate online: the server binds the license to this machine and sends it."""
    from tessera.agent.connect import check_server_url

    check_server_url(server)  # before a first activation sets up the installation
    ca_pem = read_input_file(ca, "CA certificate") if ca is not None else None
    with _open_agent() as agent:
        _print_status(agent.activate(server, key, ca_pem, recover=recover), as_json)


@_verb("request")
def request(
    key: str = typer.Option(..., "--key", help="The license key."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the request file.", parser=cli_path),
    force: bool = FORCE,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Write an offline activation request (turn it into a license with activate-offline)."""
    check_writable(out, force=force)
    with _open_agent() as agent:
        req = agent.activation_request(key)
    write_file_atomic(out, req.to_json() + b"\n", force=force)
    if as_json:
        emit_json({"file": str(out), "locking_id": req.locking_id, "system_id": req.system_id})
    else:
        typer.echo(f"activation request written to {out}")


@_verb("connect")
def connect(as_json: bool = typer.Option(False, "--json")) -> None:
    """One validation with the license server now: exit 0 if the installation is in order
    afterwards, 1 if the answer was negative (locked, revoked, ...)."""
    from tessera.agent import AgentState, ConnectError

    agent = _open_agent(create=False)
    if agent is None:
        raise ConnectError(
            f"{_not_installed()}: no license server to check in with (run 'tessera agent activate')"
        )
    with agent:
        status = agent.connect()
    _print_status(status, as_json)
    if status.state is not AgentState.NORMAL:
        raise typer.Exit(1)  # a script must see a lock or a revocation in the exit code


@_verb("backup")
def backup(
    with_license: bool = typer.Option(
        False, "--with-license", help="Everything, encrypted to this installation."
    ),
    without_license: bool = typer.Option(False, "--without-license", help="Portable: settings and seats."),
    out: Path = typer.Option(..., "-o", "--out", parser=cli_path),
    force: bool = FORCE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Back up the agent state (one of --with-license / --without-license)."""
    if with_license == without_license:
        fail("choose exactly one of --with-license and --without-license")
    check_writable(out, force=force)
    agent = _open_agent(create=False)
    if agent is None:
        fail(f"{_not_installed()}: nothing to back up", EXIT_DENIED)
    with agent:
        data = agent.backup(with_license=with_license)
    write_file_atomic(out, data, mode=0o600, force=force)
    if as_json:
        kind = "with-license" if with_license else "without-license"
        emit_json({"file": str(out), "kind": kind, "bytes": len(data)})
    else:
        typer.echo(f"backup written to {out}")


@_verb("restore")
def restore(
    file: Path = typer.Argument(..., parser=cli_path),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Restore a backup (a --with-license backup only into the installation that made it)."""
    data = read_input_file(file, "backup file")
    with _open_agent(restoring=True) as agent:
        _print_status(agent.restore(data), as_json)
