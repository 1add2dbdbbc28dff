"""CLI tests run the real ``tessera`` executable in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

TESSERA = str(Path(sys.executable).parent / "tessera")


@pytest.fixture
def tessera(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``tessera ARGS`` with a clean environment rooted in ``tmp_path``."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    base_env["TESSERA_KEY_PASSPHRASE"] = "test passphrase"
    base_env["COLUMNS"] = "200"

    def run(
        *args: str, env: dict[str, str] | None = None, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [TESSERA, *args],
            cwd=tmp_path,
            env={**base_env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"tessera {' '.join(args)} failed: {result.stderr}")
        return result

    return run


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The single ``error: ...`` line a failed command must print (no traceback); returned."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    return lines[0]
