"""The public surface: one curated API, no server code pulled into an installation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import tessera.agent
from tessera.agent import Agent
from tessera.core import FormatError, Keyring


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


@pytest.mark.parametrize(
    ("state_dir", "product", "version", "match"),
    [
        ("state", "cortex", "x.y", "not a version number"),
        ("state", "Bad Product", "4.2", "product code"),
        ("", "cortex", "4.2", "empty path"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(
    tmp_path: Path,
    keyring: Keyring,
    state_dir: str,
    product: str,
    version: str,
    match: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FormatError, match=match):
        Agent(state_dir, keyring, product, version)
    assert list(tmp_path.iterdir()) == []


def test_create_false_opens_only_an_existing_installation(tmp_path: Path, keyring: Keyring) -> None:
    """What ``tessera agent status`` uses: a directory without an installation raises
    NotInstalled and stays as it was; an installation, or a lost one, opens as always."""
    from tessera.agent import NotInstalled, StateError

    where = tmp_path / "missing" / "state"
    with pytest.raises(NotInstalled, match="nothing is installed"):
        Agent(where, keyring, "cortex", "4.2", create=False)
    assert not (tmp_path / "missing").exists()
    where.mkdir(parents=True)
    with pytest.raises(NotInstalled):
        Agent(where, keyring, "cortex", "4.2", create=False)
    assert list(where.iterdir()) == []
    with pytest.raises(FormatError):  # bad arguments are still named first
        Agent(where, keyring, "cortex", "x.y", create=False)
    Agent(where, keyring, "cortex", "4.2").close()
    with Agent(where, keyring, "cortex", "4.2", create=False) as agent:
        assert agent.status().state.value == "unlicensed"
    (where / "state.db").unlink()
    with pytest.raises(StateError, match="missing or empty") as lost:
        Agent(where, keyring, "cortex", "4.2", create=False)
    assert not isinstance(lost.value, NotInstalled)
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(StateError) as not_a_dir:
        Agent(file, keyring, "cortex", "4.2", create=False)
    assert not isinstance(not_a_dir.value, NotInstalled)
