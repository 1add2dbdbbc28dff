"""``[leases]`` and ``[webhooks]`` in tessera.toml: read into the server state, bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera.server.config import ConfigError, load_config


def write(tmp_path: Path, extra: str) -> Path:
    (tmp_path / "tessera.toml").write_text(f'[server]\ndatabase = "sqlite:///x.db"\n{extra}')
    return tmp_path


def test_defaults_and_settings(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.lease_seconds == 300 and config.webhooks.max_attempts == 12
    config = load_config(
        write(tmp_path, "[leases]\nduration_seconds = 5\n[webhooks]\nretry_base_seconds = 0.5\n")
    )
    assert config.lease_seconds == 5 and config.webhooks.retry_base_seconds == 0.5


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ("[leases]\nduration_seconds = 0\n", "[leases] duration_seconds must be a whole number"),
        ("[leases]\nduration_seconds = 1.5\n", "[leases] duration_seconds"),
        ("[leases]\nduration = 5\n", "[leases] has unknown key 'duration'"),
        ("[webhooks]\nmax_attempts = true\n", "[webhooks] max_attempts"),
        ('[webhooks]\nretry_base_seconds = "fast"\n', "[webhooks] retry_base_seconds"),
        ("[leases.sub]\nx = 1\n", "[leases] has unknown key 'sub'"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path: Path, extra: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, extra))
    assert words in str(info.value) and "\n" not in str(info.value)
