"""The product journey from the outside: vendor's server and customer's agent, real processes.

server init -> server run (TLS) -> product, customer, license -> ``tessera agent activate``
online -> ``agent check`` -> a second machine beyond the count refused -> a token of the
wrong role refused -> offline activation (``agent request`` -> ``license activate-offline`` ->
``agent import``) -> seats -> a central change arriving with ``agent connect`` -> the server
stopped: the agent keeps working, under ``faketime`` +10 days in failover with 20 days left,
at +31 days in emergency mode with only the emergency feature -> server back, one
``agent connect`` and it is normal -> the clock set back a year is detected.

The second machine is a real one as far as the agent can tell: a private mount and UTS
namespace (``unshare``) gives it another /etc/machine-id and hostname, so its Locking ID
differs without any switch in the product.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ..server.conftest import backend_database
from ..server.processes import TESSERA, clean_env, free_port, running_server, tessera
from .conftest import assert_one_line_error

FAKETIME = shutil.which("faketime")


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-mu", "true"], capture_output=True, check=False)
    return probe.returncode == 0


class Machine:
    """One customer machine running ``tessera agent`` verbs (optionally shifted in time)."""

    def __init__(self, tmp: Path, name: str, env: dict[str, str], *, other_hardware: bool) -> None:
        self.state = tmp / name
        self.env = {**env, "TESSERA_AGENT_DIR": str(self.state)}
        self.prefix: list[str] = []
        if other_hardware:
            machine_id = tmp / f"{name}.machine-id"
            machine_id.write_text(os.urandom(16).hex() + "\n")
            script = f'mount --bind {machine_id} /etc/machine-id && hostname {name} && exec "$@"'
            self.prefix = ["unshare", "-mu", "sh", "-c", script, "sh"]

    def run(
        self, *args: str, faketime: str | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [*self.prefix]
        if faketime:
            assert FAKETIME, "faketime is not installed (.ci/run installs it)"
            command += [FAKETIME, "-f", faketime]
        command += [TESSERA, "agent", *args]
        return subprocess.run(
            command,
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def status(self, faketime: str | None = None) -> dict[str, object]:
        result = self.run("status", "--json", faketime=faketime)
        assert result.returncode == 0, result.stderr
        status: dict[str, object] = json.loads(result.stdout)
        return status


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare for a second machine")
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_full_journey(tmp_path: Path, backend: str) -> None:
    with backend_database(backend) as db_url:
        _journey(tmp_path, db_url)


def _journey(tmp: Path, db_url: str | None) -> None:
    data = tmp / "server"
    init = tessera("server", "init", "--data-dir", str(data), "--json", *(["--db", db_url] if db_url else []))
    assert init.returncode == 0, init.stderr
    info = json.loads(init.stdout)
    ca, vendor_pub = info["ca"], info["vendor_key"]
    port = free_port()

    with running_server(data, tls=True, ca=ca, port=port) as url:
        admin = clean_env(TESSERA_URL=url, TESSERA_TOKEN=info["admin_token"], TESSERA_CA=ca)

        def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
            return tessera(*args, env=env or admin, cwd=tmp)

        assert cli("product", "create", "cortex", "--name", "CortexDB",
                   "--feature", "uniplex=Uniplex web application", "--feature", "backup",
                   "--feature", "ctxjs").returncode == 0  # fmt: skip
        customer = json.loads(cli("customer", "create", "myCompany", "--city", "City", "--json").stdout)["id"]
        issued = cli("license", "issue", "--customer", str(customer), "--product", "cortex",
                     "--feature", "uniplex=5,2099-01-15", "--feature", "backup=1", "--feature", "ctxjs=1",
                     "--emergency-feature", "ctxjs", "--location", "abc", "--json")  # fmt: skip
        assert issued.returncode == 0, issued.stderr
        lic = json.loads(issued.stdout)
        expired = cli("license", "issue", "--customer", str(customer), "--product", "cortex",
                      "--feature", "uniplex=5,2020-01-15")  # fmt: skip
        assert "entitlements[0].expiry: 2020-01-15 (uniplex) is in the past" in assert_one_line_error(
            expired, 2
        )

        agent_env = clean_env(TESSERA_VENDOR_KEY=vendor_pub)
        a = Machine(tmp, "machine-a", agent_env, other_hardware=False)
        b = Machine(tmp, "machine-b", agent_env, other_hardware=True)

        # Online activation and feature checks.
        assert a.status()["state"] == "unlicensed"
        activated = a.run("activate", "--server", url, "--ca", ca, "--key", lic["key"])
        assert activated.returncode == 0, activated.stderr
        assert a.run("check", "uniplex").returncode == 0
        denied = a.run("check", "reporting")
        assert denied.returncode == 1 and "not licensed" in denied.stderr
        status = a.status()
        assert status["state"] == "normal"
        assert status["features"] == {
            "uniplex": {"count": 5, "expiry": "2099-01-15"},
            "backup": {"count": 1, "expiry": "permanent"},
            "ctxjs": {"count": 1, "expiry": "permanent"},
        }
        assert a.run("locking-id").stdout.strip() != b.run("locking-id").stdout.strip()

        # A second machine beyond the sold count is refused with a clear reason.
        refused = b.run("activate", "--server", url, "--ca", ca, "--key", lic["key"])
        assert "no free machine" in assert_one_line_error(refused, 1)
        shown = json.loads(cli("license", "show", lic["serial"], "--json").stdout)
        assert shown["serial"] == lic["serial"] and len(shown["machines"]) == 1

        # A token of the wrong role is refused.
        token = json.loads(cli("token", "create", "--role", "readonly", "--name", "auditor", "--json").stdout)
        secret = token.get("token") or token.get("secret")
        assert secret
        wrong = cli("customer", "create", "Sneaky Ltd", env={**admin, "TESSERA_TOKEN": secret})
        assert "role readonly may not" in assert_one_line_error(wrong, 1)

        # Offline activation on machine B with a license of its own.
        second = json.loads(cli("license", "issue", "--customer", str(customer), "--product", "cortex",
                                "--feature", "uniplex=2", "--json").stdout)  # fmt: skip
        assert b.run("request", "--key", second["key"], "-o", str(tmp / "b.request"), cwd=tmp).returncode == 0
        offline = cli("license", "activate-offline", str(tmp / "b.request"), "-o", str(tmp / "b.lic"))
        assert offline.returncode == 0, offline.stderr
        assert b.run("import", str(tmp / "b.lic")).returncode == 0
        assert b.run("check", "uniplex").returncode == 0
        # ... and that file is useless on machine A.
        assert a.run("import", str(tmp / "b.lic")).returncode == 1

        # Seats never beyond the count.
        for user in ("ann", "bob", "cem", "dan", "eve"):
            assert a.run("assign", "uniplex", user).returncode == 0
        assert a.run("assign", "uniplex", "fay").returncode == 1
        assert a.run("seats").returncode == 0

        # A central change reaches the installation with its next check-in.
        assert cli("license", "update", lic["serial"], "--feature", "uniplex=7,2099-06-30").returncode == 0
        assert a.run("connect").returncode == 0
        assert a.status()["features"]["uniplex"] == {"count": 7, "expiry": "2099-06-30"}  # type: ignore[index]
        assert a.run("assign", "uniplex", "fay").returncode == 0

    # The server is gone: the installation keeps working, then fails over, then emergency.
    assert a.run("connect").returncode == 1
    assert a.run("check", "uniplex").returncode == 0
    day10 = a.status(faketime="+10d")
    assert day10["state"] == "failover" and day10["failover_days_left"] == 20
    assert a.run("check", "uniplex", faketime="+10d").returncode == 0
    day31 = a.status(faketime="+31d")
    assert day31["state"] == "emergency"
    assert a.run("check", "uniplex", faketime="+31d").returncode == 1
    assert a.run("check", "ctxjs", faketime="+31d").returncode == 0

    # Server back: one check-in ends failover and emergency at once.
    with running_server(data, tls=True, ca=ca, port=port):
        connected = a.run("connect")
        assert connected.returncode == 0, connected.stderr
        assert a.status()["state"] == "normal"
        assert a.run("check", "uniplex").returncode == 0

    # A clock set back a year is detected.
    back = a.status(faketime="-365d")
    assert back["state"] == "clock-tampered"
    assert a.run("check", "uniplex", faketime="-365d").returncode == 1
