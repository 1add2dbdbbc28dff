"""Entry point of the ``tessera`` command."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

import typer

from tessera.cli._common import EXIT_BAD_INPUT, EXIT_DENIED, CliError, err_console
from tessera.cli.apps import app
from tessera.core.errors import FormatError, KeyFileError, TesseraError

__all__ = ["COMMAND_MODULES", "MODULES_OF", "app", "load_commands", "run"]

#: The modules that define the verbs; importing one registers its verbs on ``app``.
COMMAND_MODULES = (
    "admin",
    "agent_cmds",
    "keys",
    "lease_cmds",
    "offline",
    "order_cmds",
    "recovery_cmds",
    "relay_cmds",
    "security_cmds",
    "server_cmds",
    "user_cmds",
)
#: Which of them define the verbs under each top-level word (tests/cli/test_startup.py
#: checks every word against loading all of them).
MODULES_OF: dict[str, tuple[str, ...]] = {
    "server": ("relay_cmds", "server_cmds"),
    "keys": ("keys",),
    "license": ("admin", "lease_cmds", "offline", "recovery_cmds"),
    "agent": ("agent_cmds", "lease_cmds"),
    "product": ("admin",),
    "customer": ("admin",),
    "partner": ("admin",),
    "token": ("admin",),
    "audit": ("admin",),
    "webhook": ("lease_cmds",),
    "order": ("order_cmds",),
    "blacklist": ("recovery_cmds",),
    "report": ("recovery_cmds",),
    "relay": ("relay_cmds",),
    "security": ("security_cmds",),
    "user": ("user_cmds",),
}


def load_commands(args: Sequence[str]) -> None:
    """Register the verbs ``tessera ARGS`` can reach: those of its first word, or all of
    them (``--help``, a mistyped word). Loading every module, and building every verb's
    command, was about a tenth of each command's start (``agent check`` included)."""
    wanted = MODULES_OF.get(args[0]) if args else None
    for name in COMMAND_MODULES:
        if wanted is None or name in wanted:
            importlib.import_module(f"tessera.cli.{name}")


#: The longest error line printed: a value a user typed is repeated in it at most in part
#: (``tessera.core.errors.shown``), and anything else that slipped through, such as a
#: server's detail, is cut here with "…" rather than flooding the terminal.
MAX_ERROR_LINE = 1000


def _say(message: str) -> None:
    if len(message) > MAX_ERROR_LINE:
        message = message[:MAX_ERROR_LINE] + "…"
    err_console.print(f"error: {message}", markup=False, highlight=False)


def _plain_help(command: Any) -> Any:
    """Every command's help in click's plain layout. Typer's Rich layout read help texts as
    markup (``[interfaces] web_portal`` lost its brackets) and cut long option names to fit
    the terminal (``--revoke-recovered-on…``); the plain layout prints both as written."""
    if hasattr(command, "rich_markup_mode"):
        command.rich_markup_mode = None
    for sub in getattr(command, "commands", {}).values():
        if not sub.short_help and sub.help:
            # The group's list would cut the first sentence to the line with "...".
            sub.short_help = " ".join(sub.help.split("\n\n")[0].split())
        _plain_help(sub)
    return command


def run() -> None:
    """Run the CLI; every failure becomes one line on stderr and an exit code."""
    try:
        load_commands(sys.argv[1:])
        command = _plain_help(typer.main.get_command(app))
        result = command(prog_name="tessera", standalone_mode=False)
        sys.exit(result if isinstance(result, int) else 0)
    except SystemExit:
        raise
    except CliError as exc:
        _say(str(exc))
        sys.exit(exc.code)
    except (FormatError, KeyFileError) as exc:
        _say(str(exc))
        sys.exit(EXIT_BAD_INPUT)
    except TesseraError as exc:
        _say(str(exc))
        sys.exit(EXIT_DENIED)
    except KeyboardInterrupt:
        _say("interrupted")
        sys.exit(130)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        _say(f"{exc.strerror or exc}{where}")
        sys.exit(EXIT_BAD_INPUT)
    except Exception as exc:
        # Typer vendors its own copy of click, so usage errors are recognised by shape.
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.stderr.write(exc.format_message() + "\n")  # type: ignore[attr-defined]
            sys.exit(0)
        if type(exc).__name__ == "Abort":
            _say("aborted")
            sys.exit(EXIT_BAD_INPUT)
        if isinstance(getattr(exc, "exit_code", None), int) and hasattr(exc, "format_message"):
            ctx = getattr(exc, "ctx", None)
            where = getattr(ctx, "command_path", None) or "tessera"
            _say(f"{exc.format_message()} (see '{where} --help')")
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        # The promise is: never a traceback.
        _say(f"internal error ({type(exc).__name__}: {exc}); please report this")
        sys.exit(70)


if __name__ == "__main__":
    run()
