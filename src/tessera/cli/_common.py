"""What every CLI verb shares: one-line errors, exit codes, JSON output, secrets input.

Exit codes (SPEC section 6): 0 success, 1 a negative verdict, 2 bad usage or bad input.
No traceback ever reaches a user: :func:`tessera.cli.main.run` maps every exception to one
line on stderr.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_DENIED",
    "FORCE",
    "CliError",
    "check_writable",
    "cli_path",
    "console",
    "emit_json",
    "fail",
    "print_table",
    "read_input_file",
    "read_passphrase",
]

EXIT_DENIED = 1
EXIT_BAD_INPUT = 2
MAX_INPUT_FILE = 16 * 1024 * 1024
#: The longest path a path option takes (Linux's PATH_MAX): the system refuses longer
#: ones anyway, and every error line that names the path stays bounded.
MAX_PATH = 4096

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class CliError(Exception):
    """A failure with a message meant for the user and the exit code that goes with it."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    raise CliError(message, code)


def cli_path(value: str | Path) -> Path:
    """Every path option's and argument's parser: an empty (or blank) path is refused.

    ``Path("")`` is the current directory, so ``--state-dir ""`` (or ``--data-dir
    "$UNSET"``) silently set up an agent installation or a server in whatever directory the
    command ran from; an ``-o ""`` failed as an internal error. A path longer than
    :data:`MAX_PATH` is refused without repeating it."""
    if isinstance(value, str) and not value.strip():
        raise typer.BadParameter("an empty path is not allowed")
    length = len(str(value))
    if length > MAX_PATH:
        raise typer.BadParameter(f"a path of {length:,} characters is too long (at most {MAX_PATH:,})")
    return Path(value)


def print_table(table: Table) -> None:
    """A table whose IDs are never cut. On a terminal the ID columns fold (``overflow="fold"``);
    piped into a file or a script the table gets its natural width, so each Locking ID or
    serial stays whole on one line for support to copy into ``license rehost``."""
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update(max_width=100_000), table).maximum
    width = console.width
    console.width = max(width, natural)  # print(width=...) is capped at the console's width
    try:
        console.print(table)
    finally:
        console.width = width


def emit_json(obj: Any) -> None:
    """Exactly one JSON object on stdout, for scripts."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def read_input_file(path: Path, what: str = "file") -> bytes:
    """Read a user-supplied file with a size cap and one-line errors."""
    try:
        if path.is_dir():
            fail(f"{what} {path} is a directory")
        size = path.stat().st_size
        if size > MAX_INPUT_FILE:
            fail(f"{what} {path} is too large ({size} bytes)")
        return path.read_bytes()
    except FileNotFoundError:
        fail(f"{what} {path} does not exist")
    except PermissionError:
        fail(f"{what} {path} cannot be read (permission denied)")
    except OSError as exc:
        fail(f"{what} {path} cannot be read: {exc.strerror}")


def read_passphrase(*, confirm: bool = False, what: str = "vendor key") -> bytes:
    """The key passphrase: ``TESSERA_KEY_PASSPHRASE``, else a prompt on a terminal."""
    value = os.environ.get("TESSERA_KEY_PASSPHRASE")
    if value:
        return value.encode("utf-8")
    if not sys.stdin.isatty():
        if value == "":  # "set TESSERA_KEY_PASSPHRASE" reads as if it were not set at all
            fail(f"the {what} is encrypted: TESSERA_KEY_PASSPHRASE is set but empty (no terminal to ask on)")
        fail(f"the {what} is encrypted: set TESSERA_KEY_PASSPHRASE (no terminal to ask on)")
    entered: str = typer.prompt(f"Passphrase for the {what}", hide_input=True, confirmation_prompt=confirm)
    if not entered:
        fail("an empty passphrase is not allowed")
    return entered.encode("utf-8")


#: Every verb that writes a file with ``-o`` takes this: without it an existing file is
#: never replaced (a signed license, a response, a backup or a credential written over by
#: mistake is lost work, and some cost a bound slot or a sequence number to make again).
FORCE = typer.Option(False, "--force", help="Replace the output file if it exists.")


def check_writable(path: Path, option: str = "-o", *, force: bool = False) -> None:
    """Refuse an output path that cannot be written before the server is asked to change
    anything: a rehost, a bound slot or a used-up blacklist sequence number cannot be taken
    back when the file write fails afterwards. An existing file is refused too, unless
    ``force`` (see :data:`FORCE`)."""
    path = Path(path)
    if path.is_dir():
        fail(f"{option} {path} is a directory")
    parent = path.parent
    if not parent.exists():
        fail(f"cannot write {path}: directory {parent} does not exist")
    if not parent.is_dir():
        fail(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"cannot write {path}: directory {parent} is not writable")
    if not force and (path.exists() or path.is_symlink()):
        fail(_exists(path))
    if path.exists() and not os.access(path, os.W_OK):
        fail(f"cannot write {path}: permission denied")


def _exists(path: Path) -> str:
    return f"{path} exists already (use --force to replace it)"


def write_file_atomic(path: Path, data: bytes, mode: int = 0o644, *, force: bool = False) -> None:
    """Write through a temporary file, so a crash never leaves half a file: the complete,
    synced file appears under ``path`` at once. An existing file is replaced only with
    ``force``; otherwise the file is linked into place, which fails rather than replace
    one that appeared meanwhile (on a file system without hard links: checked, then
    renamed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
        _sync_directory(path.parent)
    except FileExistsError:
        fail(_exists(path))
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror}")
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _link_new(tmp: Path, path: Path) -> None:
    """``tmp`` under the new name ``path``; FileExistsError if that name is taken."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        if path.exists() or path.is_symlink():  # no hard links here: check, then rename
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.replace(tmp, path)


def _sync_directory(directory: Path) -> None:
    """Make the new name itself durable (best effort: not every system can sync one)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
