"""The vendor key in an HSM from the outside: ``server init --hsm-module --hsm-token`` with
SoftHSM 2, ``server run``, an agent that activates and checks in, and the checklist that
sees where the key is. Real processes, real TLS, a real PKCS#11 module."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from ..server.processes import clean_env, running_server, tessera
from ..server.softhsm import new_token
from .conftest import assert_one_line_error


def test_a_server_whose_vendor_key_lives_in_an_hsm(tmp_path: Path) -> None:
    token = new_token()
    hsm = ["--hsm-module", str(token.module), "--hsm-token", token.label]
    data = tmp_path / "server"
    env = clean_env(SOFTHSM2_CONF=str(token.conf), TESSERA_HSM_PIN=token.pin)
    env.pop("TESSERA_KEY_PASSPHRASE", None)

    # Without the PIN nothing is made; with a wrong one neither.
    no_pin = {k: v for k, v in env.items() if k != "TESSERA_HSM_PIN"}
    refused = tessera("server", "init", "--data-dir", str(data), *hsm, env=no_pin)
    assert "TESSERA_HSM_PIN" in assert_one_line_error(refused, 2)
    refused = tessera("server", "init", "--data-dir", str(data), *hsm, env={**env, "TESSERA_HSM_PIN": "9999"})
    assert "wrong PIN" in assert_one_line_error(refused, 2)
    assert not data.exists()
    half = tessera("server", "init", "--data-dir", str(data), "--hsm-token", token.label, env=env)
    assert "go together" in assert_one_line_error(half, 2)

    init = tessera("server", "init", "--data-dir", str(data), *hsm, "--json", env=env)
    assert init.returncode == 0, init.stderr
    info = json.loads(init.stdout)
    assert info["hsm"] == {"token": token.label, "key": "tessera-vendor"}
    assert info["passphrase_file"] is None
    assert not (data / "vendor.key").exists()
    assert not (data / "secrets" / "key-passphrase").exists()
    ca, vendor_pub = info["ca"], info["vendor_key"]

    # The server will not start without the token's PIN.
    no_pin_run = tessera("server", "run", "--data-dir", str(data), "--port", "1", env=no_pin)
    assert "TESSERA_HSM_PIN" in assert_one_line_error(no_pin_run, 2)

    with running_server(data, tls=True, ca=ca, env=env) as url:
        admin = {**env, "TESSERA_URL": url, "TESSERA_TOKEN": info["admin_token"], "TESSERA_CA": ca}

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            result = tessera(*args, env=admin, cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            return result

        cli("product", "create", "cortex", "--name", "CortexDB", "--feature", "uniplex")
        customer = json.loads(cli("customer", "create", "Acme", "--json").stdout)["id"]
        args = ["--customer", str(customer), "--product", "cortex", "--feature", "uniplex=2", "--json"]
        issued = json.loads(cli("license", "issue", *args).stdout)

        agent = clean_env(TESSERA_VENDOR_KEY=vendor_pub, TESSERA_AGENT_DIR=str(tmp_path / "agent"))

        def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
            return tessera("agent", *args, env=agent, cwd=tmp_path)

        # The license file and every answer were signed in the token; the agent checks
        # them against vendor.pub as always.
        activated = run_agent("activate", "--server", url, "--ca", ca, "--key", issued["key"])
        assert activated.returncode == 0, activated.stderr
        assert run_agent("check", "uniplex").returncode == 0
        connected = run_agent("connect")
        assert connected.returncode == 0, connected.stderr
        status = json.loads(run_agent("status", "--json").stdout)
        assert status["state"] == "normal"

    checklist = tessera("security", "checklist", "--data-dir", str(data), "--format", "json", env=env)
    assert checklist.returncode == 0, checklist.stderr
    measures = {m["id"]: m for m in json.loads(checklist.stdout)["measures"]}
    assert measures["vendor-key-encrypted"]["executed"] == "yes"
    assert token.label in measures["vendor-key-encrypted"]["finding"]
    assert measures["key-passphrase-apart"]["executed"] == "n/a"
