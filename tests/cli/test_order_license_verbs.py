"""What `order cancel` and `license update` send and say, against a stand-in server."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from ..server.processes import clean_env, tessera
from .fake_server import FakeServer, fake_server

ORDER: dict[str, Any] = {
    "number": "PO-3",
    "customer_id": 1,
    "status": "cancelled",
    "created_at": "2026-11-01T10:00:00+00:00",
    "cancelled_at": "2026-11-20T10:00:00+00:00",
    "licenses": [{"serial": "2026-000001", "product": "cortex", "machines_allowed": 1, "status": "revoked"}],
}


def _run(server: FakeServer, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return tessera(*args, env=clean_env(**server.env()), cwd=tmp_path)


def test_cancelling_a_cancelled_order_is_no_error(tmp_path: Path) -> None:
    with fake_server() as server:
        server.default = (200, {**ORDER, "cancelled_now": False})
        again = _run(server, tmp_path, "order", "cancel", "PO-3")
        assert again.returncode == 0, again.stderr
        assert again.stdout.startswith("order PO-3 was cancelled already on 2026-11-20: nothing changed\n")
        as_json = _run(server, tmp_path, "order", "cancel", "PO-3", "--json")
        assert as_json.returncode == 0 and json.loads(as_json.stdout)["cancelled_now"] is False
        server.default = (200, {**ORDER, "cancelled_now": True})
        first = _run(server, tmp_path, "order", "cancel", "PO-3")
        assert first.returncode == 0 and "already" not in first.stdout


LICENSE: dict[str, Any] = {
    "serial": "2026-000001",
    "status": "active",
    "revision": 3,
    "licensee": "myCompany",
    "product": "cortex",
    "machines_allowed": 1,
    "locations": {},
    "machines": [],
    "emergency": [],
}


def test_license_update_revokes_and_reactivates(tmp_path: Path) -> None:
    with fake_server() as server:
        server.default = (200, LICENSE)
        for flag, status in (("--revoke", "revoked"), ("--reactivate", "active")):
            result = _run(server, tmp_path, "license", "update", "2026-000001", flag)
            assert result.returncode == 0, result.stderr
            method, path, body = server.requests[-1]
            assert (method, path) == ("PATCH", "/api/v1/licenses/2026-000001")
            assert json.loads(body)["status"] == status
        both = _run(server, tmp_path, "license", "update", "2026-000001", "--revoke", "--reactivate")
        assert both.returncode == 2 and "--revoke and --reactivate contradict" in both.stderr
        assert len(server.requests) == 2
