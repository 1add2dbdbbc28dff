"""``tessera.toml``: optional interfaces switched off really are gone; bad config is one line."""

from __future__ import annotations

from pathlib import Path

import httpx

from ..server.processes import init_data_dir, running_server, tessera


def test_interfaces_switched_off_in_the_config_are_not_served(tmp_path: Path) -> None:
    data_dir = tmp_path / "srv"
    info = init_data_dir(data_dir)
    config = data_dir / "tessera.toml"
    text = config.read_text()
    assert "admin_api = true" in text and "offline_activation = true" in text
    config.write_text(text.replace("admin_api = true", "admin_api = false"))
    with running_server(data_dir, tls=False) as url:
        headers = {"Authorization": f"Bearer {info['admin_token']}"}
        assert httpx.get(f"{url}/api/v1/licenses", headers=headers).status_code == 404
        assert httpx.post(f"{url}/api/v1/activate-offline", headers=headers, content=b"{}").status_code == 422
        assert httpx.post(f"{url}/api/v1/activate", content=b"{}").status_code == 422
    config.write_text(text.replace("admin_api = true", 'admin_api = "no"'))
    result = tessera("server", "run", "--data-dir", str(data_dir))
    assert result.returncode == 2 and result.stderr.strip().endswith("admin_api must be true or false")
    config.write_text("[server\n")
    result = tessera("server", "run", "--data-dir", str(data_dir))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
