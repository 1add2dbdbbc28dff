"""Entry point of the ``tessera`` command."""

from __future__ import annotations

import sys

from tessera.cli import (  # noqa: F401  (register verbs)
    admin,
    agent_cmds,
    keys,
    lease_cmds,
    offline,
    order_cmds,
    recovery_cmds,
    relay_cmds,
    security_cmds,
    server_cmds,
    user_cmds,
)
from tessera.cli._common import EXIT_BAD_INPUT, EXIT_DENIED, CliError, err_console
from tessera.cli.apps import app
from tessera.core.errors import FormatError, KeyFileError, TesseraError

__all__ = ["app", "run"]


def _say(message: str) -> None:
    err_console.print(f"error: {message}", markup=False, highlight=False)


def run() -> None:
    """Run the CLI; every failure becomes one line on stderr and an exit code."""
    try:
        result = app(prog_name="tessera", standalone_mode=False)
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
