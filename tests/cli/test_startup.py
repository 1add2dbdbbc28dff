"""What every ``tessera`` command pays before it runs: the modules the CLI imports to start.

Each verb imports what it needs when it runs. A module-level import of the server stack
(SQLAlchemy, FastAPI, the HTTP client) in any command module made every command, an
agent's ``status`` as much as ``server run``, start twice as slowly (0.85 s against 0.4 s
on the reference machine); this keeps it from coming back unnoticed.
"""

from __future__ import annotations

import subprocess
import sys

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
