"""The public surface: one curated API, no server code pulled into an installation."""

from __future__ import annotations

import subprocess
import sys

import tessera.agent


def test_public_api_is_curated() -> None:
    assert "Agent" in tessera.agent.__all__
    for name in tessera.agent.__all__:
        assert getattr(tessera.agent, name) is not None
    from tessera.agent import AgentError, BadResponse, ConnectError, FeatureDenied
    from tessera.core import TesseraError

    assert issubclass(BadResponse, ConnectError) and issubclass(ConnectError, AgentError)
    assert issubclass(FeatureDenied, AgentError) and issubclass(AgentError, TesseraError)


def test_agent_never_imports_the_server() -> None:
    code = (
        "import sys, tessera.agent, tessera.cli.agent_cmds; "
        "bad = [m for m in sys.modules if m.startswith(('tessera.server', 'fastapi', "
        "'sqlalchemy', 'uvicorn'))]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
