"""``python -m bench.ab``: the paired comparison of two checkouts refuses what it can't run."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import ab


def test_another_checkout_without_its_venv_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ab.main([str(tmp_path)]) == 2
    assert "make dev" in capsys.readouterr().err
