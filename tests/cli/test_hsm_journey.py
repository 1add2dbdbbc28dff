"""The vendor key in an HSM from the outside: ``server init --hsm-module --hsm-token`` with
SoftHSM 2, ``server run``, an agent that activates and checks in, and the checklist that
sees where the key is. Real processes, real TLS, a real PKCS#11 module."""

from __future__ import annotations

import json
import ssl
import subprocess
from pathlib import Path

import httpx

from ..server.processes import clean_env, free_port, running_server, tessera
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

        # The token goes away (its directory moved, as QA did): answers that need a
        # signature are refused; it comes back: the next one succeeds, no restart (the
        # server used to answer 503 with ObjectHandleInvalid until restarted).
        tokens = token.conf.parent / "tokens"
        tokens.rename(tokens.with_name("tokens.away"))
        try:
            outage = run_agent("connect")
            assert outage.returncode != 0, outage.stdout
            assert "cannot sign right now" in outage.stderr
        finally:
            tokens.with_name("tokens.away").rename(tokens)
        connected = run_agent("connect")
        assert connected.returncode == 0, connected.stderr

    checklist = tessera("security", "checklist", "--data-dir", str(data), "--format", "json", env=env)
    assert checklist.returncode == 0, checklist.stderr
    measures = {m["id"]: m for m in json.loads(checklist.stdout)["measures"]}
    assert measures["vendor-key-encrypted"]["executed"] == "yes"
    assert token.label in measures["vendor-key-encrypted"]["finding"]
    assert measures["key-passphrase-apart"]["executed"] == "n/a"


def test_an_existing_vendor_key_moves_into_an_hsm(tmp_path: Path) -> None:
    """``server hsm-import``: a server that has signed with vendor.key goes on signing with
    the same key from the token; the agent activated before keeps checking in, unchanged."""
    token = new_token()
    hsm = ["--hsm-module", str(token.module), "--hsm-token", token.label]
    data = tmp_path / "server"
    env = clean_env(SOFTHSM2_CONF=str(token.conf), TESSERA_HSM_PIN=token.pin)
    init = tessera("server", "init", "--data-dir", str(data), "--json", env=env)
    assert init.returncode == 0, init.stderr
    info = json.loads(init.stdout)
    ca, vendor_pub = info["ca"], info["vendor_key"]
    agent = clean_env(TESSERA_VENDOR_KEY=vendor_pub, TESSERA_AGENT_DIR=str(tmp_path / "agent"))

    def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
        return tessera("agent", *args, env=agent, cwd=tmp_path)

    port = free_port()  # the agent keeps the server's address: the same port both times
    with running_server(data, tls=True, ca=ca, env=env, port=port) as url:
        admin = {**env, "TESSERA_URL": url, "TESSERA_TOKEN": info["admin_token"], "TESSERA_CA": ca}
        for args in (
            ["product", "create", "cortex", "--name", "CortexDB", "--feature", "uniplex"],
            ["customer", "create", "Acme"],
        ):
            assert tessera(*args, env=admin).returncode == 0
        issue = ["license", "issue", "--customer", "1", "--product", "cortex", "--feature", "uniplex=2"]
        issued = tessera(*issue, "--json", env=admin)
        key = json.loads(issued.stdout)["key"]
        assert run_agent("activate", "--server", url, "--ca", ca, "--key", key).returncode == 0
    before = (data / "tessera.toml").read_text()

    # Bad input changes nothing: a wrong PIN, a missing module.
    wrong = tessera(
        "server", "hsm-import", "--data-dir", str(data), *hsm, env={**env, "TESSERA_HSM_PIN": "9999"}
    )
    assert "wrong PIN" in assert_one_line_error(wrong, 2)
    missing = tessera("server", "hsm-import", "--data-dir", str(data), "--hsm-module", "/nope.so",
                      "--hsm-token", token.label, env=env)  # fmt: skip
    assert "does not exist" in assert_one_line_error(missing, 2)
    assert (data / "tessera.toml").read_text() == before

    moved = tessera(
        "server", "hsm-import", "--data-dir", str(data), *hsm, "--remove-key-file", "--json", env=env
    )
    assert moved.returncode == 0, moved.stderr
    report = json.loads(moved.stdout)
    assert report["hsm"] == {"token": token.label, "key": "tessera-vendor"}
    # (the passphrase came from the environment: no generated passphrase file to remove)
    assert [Path(p).name for p in report["removed"]] == ["vendor.key"]
    assert not (data / "vendor.key").exists() and "[hsm]" in (data / "tessera.toml").read_text()
    again = tessera("server", "hsm-import", "--data-dir", str(data), *hsm, env=env)
    assert "already" in assert_one_line_error(again, 2)

    with running_server(data, tls=True, ca=ca, env=env, port=port) as url:
        health = json.loads(tessera("agent", "status", "--json", env=agent).stdout)
        assert health["state"] == "normal"
        connected = run_agent("connect")  # answers signed in the token, the old keyring
        assert connected.returncode == 0, connected.stderr
        assert run_agent("check", "uniplex").returncode == 0
        assert key_id(url, ca) == report["key_id"]
    checklist = tessera("security", "checklist", "--data-dir", str(data), "--format", "json", env=env)
    measures = {m["id"]: m for m in json.loads(checklist.stdout)["measures"]}
    assert measures["vendor-key-encrypted"]["executed"] == "yes"


def key_id(url: str, ca: str) -> str:
    answer = httpx.get(f"{url}/api/v1/health", verify=ssl.create_default_context(cafile=ca))
    return str(answer.json()["key_id"])
