"""An empty path is bad input on every path option and argument, never "the current
directory": ``Path("")`` is ``.``, so ``--state-dir ""`` or ``--data-dir "$UNSET"`` used to
set up an agent installation or a server wherever the command ran."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from tessera.cli.main import _plain_help, app, load_commands

Run = Callable[..., subprocess.CompletedProcess[str]]


def _path_params(command: Any, trail: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for param in command.params:
        descriptor = getattr(param, "type_descriptor", None)
        if descriptor is not None and descriptor.annotation is Path:
            yield trail, param
    for name, sub in getattr(command, "commands", {}).items():
        yield from _path_params(sub, (*trail, name))


def test_every_path_option_and_argument_refuses_an_empty_path() -> None:
    load_commands(())  # every verb module: a command loads only those of its first word
    root = _plain_help(typer.main.get_command(app))
    found = list(_path_params(root))
    assert len(found) >= 60  # the walk sees them all (the CLI has more than 60)
    for trail, param in found:
        given = [param.opts[0], ""] if param.param_type_name == "option" else [""]
        with pytest.raises(Exception) as caught:
            root.main([*trail, *given], prog_name="tessera", standalone_mode=False)
        message = caught.value.format_message()  # type: ignore[attr-defined]
        assert getattr(caught.value, "exit_code", None) == 2, (trail, param.name, message)
        assert "an empty path is not allowed" in message, (trail, param.name, message)


@pytest.mark.parametrize(
    "args",
    [
        ("server", "init", "--data-dir", ""),
        ("server", "run", "--data-dir", ""),
        ("security", "checklist", "--data-dir", ""),
        ("keys", "generate", "-o", ""),
        ("agent", "--state-dir", "", "status"),
        ("agent", "request", "--key", "K7QXM-AAAAA-AAAAA-AAAAA-AAAAA", "--state-dir", "", "-o", "r.json"),
        ("agent", "request", "--key", "K7QXM-AAAAA-AAAAA-AAAAA-AAAAA", "--state-dir", "s", "-o", ""),
    ],
    ids=lambda a: " ".join(x or '""' for x in a),
)
def test_an_empty_path_is_one_line_exit_2_and_changes_nothing(
    tessera: Run, tmp_path: Path, args: tuple[str, ...]
) -> None:
    (tmp_path / "vendor.pub").write_text("")
    proc = tessera(*args, env={"TESSERA_VENDOR_KEY": str(tmp_path / "vendor.pub")})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "empty path" in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vendor.pub"]


def test_no_error_line_floods_the_terminal(tessera: Run) -> None:
    """Whatever an error would repeat (here a 100,000-character --feature the admin client
    names in its refusal), the line printed is cut at MAX_ERROR_LINE characters."""
    from tessera.cli.main import MAX_ERROR_LINE

    env = {"TESSERA_URL": "https://127.0.0.1:1", "TESSERA_TOKEN": "t"}
    proc = tessera(
        "license", "issue", "--customer", "1", "--product", "p", "--feature", "x" * 100_000, env=env
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[:300]
    assert len(lines[0]) <= len("error: ") + MAX_ERROR_LINE + 1
