"""What every ``tessera`` command pays before it runs: the modules the CLI imports to start.

Each verb imports what it needs when it runs. A module-level import of the server stack
(SQLAlchemy, FastAPI, the HTTP client) in any command module made every command, an
agent's ``status`` as much as ``server run``, start twice as slowly (0.85 s against 0.4 s
on the reference machine); this keeps it from coming back unnoticed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tessera.cli.main import MODULES_OF

HEAVY = ("sqlalchemy", "fastapi", "starlette", "uvicorn", "httpx", "psycopg", "alembic")


def test_starting_the_cli_imports_no_server_stack() -> None:
    code = (
        "import sys, tessera.cli.main; "
        f"heavy = {HEAVY!r}; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy "
        "or (m.startswith('tessera.server.') and m != 'tessera.server.config')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# Prints the help text of every command under the given top-level words (all words when
# none is given), with the verbs loaded as `tessera WORD ...` loads them.
_HELP_TEXTS = """
import json, sys
import typer
from typer._click import Context
from tessera.cli import main

def texts(command, path, parent=None):
    ctx = Context(command, info_name=path[-1], parent=parent)
    found = {" ".join(path): command.get_help(ctx)}
    if hasattr(command, "list_commands"):
        for name in command.list_commands(ctx):
            found.update(texts(command.get_command(ctx, name), [*path, name], ctx))
    return found

words = sys.argv[1:]
main.load_commands(words[:1])
found = texts(main._plain_help(typer.main.get_command(main.app)), ["tessera"])
print(json.dumps({p: t for p, t in found.items() if not words or p.split()[1:2] in [[w] for w in words]}))
"""


def _help_texts(*words: str) -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-c", _HELP_TEXTS, *words], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    texts: dict[str, str] = json.loads(proc.stdout)
    return texts


def test_each_top_level_word_gets_every_verb_and_option_it_has_with_all_loaded() -> None:
    """``tessera WORD ...`` loads only the command modules MODULES_OF names for WORD: a verb
    a module adds under WORD without being listed there would be missing from it."""
    everything = _help_texts()
    words = {path.split()[1] for path in everything if len(path.split()) > 1}
    assert words == set(MODULES_OF)
    by_modules: dict[tuple[str, ...], list[str]] = {}
    for word, modules in MODULES_OF.items():
        by_modules.setdefault(modules, []).append(word)
    for same in by_modules.values():
        expected = {p: t for p, t in everything.items() if p.split()[1:2] in [[w] for w in same]}
        assert _help_texts(*same) == expected, same


def test_an_agent_verb_loads_only_the_agents_command_modules() -> None:
    """Every command imported all eleven command modules and built all ~70 verbs first."""
    code = (
        "import json, sys\n"
        "from tessera.cli.main import COMMAND_MODULES, run\n"
        "sys.argv = ['tessera', 'agent', 'locking-id']\n"
        "try:\n"
        "    run()\n"
        "except SystemExit:\n"
        "    print(json.dumps([m for m in COMMAND_MODULES if 'tessera.cli.' + m in sys.modules]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    # lease_cmds adds `agent lease`; it uses admin's client, and both read keyrings via keys.
    assert loaded == ["admin", "agent_cmds", "keys", "lease_cmds"], proc.stderr
