"""A split deployment from the outside (SPEC section 5): the license server inside, a relay
in front of it, agents that know only the relay. Real processes, real TLS on both hops.

``server init`` -> ``server relay-cert`` -> ``relay init`` -> ``server run`` and ``relay
run`` -> an agent activates and checks in through the relay, pinning the server's own CA
-> the admin API is not reachable through the relay -> the server goes away: the agent
hears why through the relay and fails over -> the server is back: the same relay carries
the next check-in.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx

from tessera.server.tls import make_tls_material

from ..server.processes import (
    TESSERA,
    clean_env,
    free_port,
    init_data_dir,
    running_server,
    stop_server,
    tessera,
)
from .conftest import assert_one_line_error


@contextmanager
def running_relay(data_dir: Path, ca: str, *extra: str) -> Iterator[str]:
    """``tessera relay run`` on a free loopback port; its URL once it answers HTTPS."""
    port = free_port()
    log = data_dir.parent / f"relay-{port}.log"
    args = [TESSERA, "relay", "run", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port)]
    args += extra
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
    url = f"https://127.0.0.1:{port}"
    verify = ssl.create_default_context(cafile=ca)
    deadline = time.monotonic() + 30
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"relay exited: {log.read_text(errors='replace')}")
            try:
                httpx.get(f"{url}/api/v1/health", verify=verify, timeout=2)
                break  # any answer: the relay is up (the server behind it may not be)
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"relay did not start: {log.read_text(errors='replace')}") from None
                time.sleep(0.1)
        yield url
    finally:
        stop_server(proc)


def test_agents_reach_the_server_through_a_relay(tmp_path: Path) -> None:
    server_dir, relay_dir = tmp_path / "server", tmp_path / "relay"
    info = init_data_dir(server_dir)
    ca = info["ca"]
    port = free_port()
    server_url = f"https://127.0.0.1:{port}"

    # The agents below reach the relay at 127.0.0.1: its certificate must name that address
    # (a relay certificate carries only the names asked for).
    made = tessera("server", "relay-cert", "--data-dir", str(server_dir), "--hostname", "relay.example",
                   "--hostname", "127.0.0.1", "-o", str(tmp_path / "for-relay"), "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    cert = json.loads(made.stdout)
    assert Path(cert["key"]).stat().st_mode & 0o777 == 0o600
    init = tessera("relay", "init", "--data-dir", str(relay_dir), "--upstream", server_url,
                   "--upstream-ca", ca, "--cert", cert["cert"], "--key", cert["key"], "--ca", cert["ca"],
                   "--json")  # fmt: skip
    assert init.returncode == 0, init.stderr
    assert json.loads(init.stdout)["upstream"] == server_url
    # The relay holds nothing of the server's secrets: no vendor key, no pepper, no database.
    held = sorted(str(p.relative_to(relay_dir)) for p in relay_dir.rglob("*") if p.is_file())
    assert held == ["relay.toml", "tls/ca.pem", "tls/server.key", "tls/server.pem", "upstream-ca.pem"]

    agent = clean_env(TESSERA_VENDOR_KEY=info["vendor_key"], TESSERA_AGENT_DIR=str(tmp_path / "agent"))

    def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
        return tessera("agent", *args, env=agent, cwd=tmp_path)

    def status() -> dict[str, object]:
        result = run_agent("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    # Two worker processes: a relay keeps no state, so any of them answers any request.
    with running_relay(relay_dir, ca, "--workers", "2") as relay_url:
        with running_server(server_dir, tls=True, ca=ca, port=port):
            admin = clean_env(TESSERA_URL=server_url, TESSERA_TOKEN=info["admin_token"], TESSERA_CA=ca)
            assert tessera("product", "create", "cortex", "--name", "CortexDB", "--feature", "uniplex",
                           env=admin).returncode == 0  # fmt: skip
            customer = json.loads(tessera("customer", "create", "Acme", "--json", env=admin).stdout)["id"]
            issued = tessera("license", "issue", "--customer", str(customer), "--product", "cortex",
                             "--feature", "uniplex=3", "--json", env=admin)  # fmt: skip
            assert issued.returncode == 0, issued.stderr
            key = json.loads(issued.stdout)["key"]

            # The agent knows only the relay, and pins the server's CA: the relay's
            # certificate came from it.
            activated = run_agent("activate", "--server", relay_url, "--ca", ca, "--key", key)
            assert activated.returncode == 0, activated.stderr
            assert run_agent("check", "uniplex").returncode == 0
            connected = run_agent("connect")
            assert connected.returncode == 0, connected.stderr
            assert status()["state"] == "normal"
            shown = json.loads(tessera("license", "show", json.loads(issued.stdout)["serial"], "--json",
                                       env=admin).stdout)  # fmt: skip
            assert len(shown["machines"]) == 1

            # The admin API is not there, even with the admin's token.
            verify = ssl.create_default_context(cafile=ca)
            headers = {"Authorization": f"Bearer {info['admin_token']}"}
            for path in ("/api/v1/products", "/api/v1/licenses", "/openapi.json"):
                answer = httpx.get(relay_url + path, headers=headers, verify=verify, timeout=10)
                assert answer.status_code == 404, path
            through = tessera("customer", "create", "Sneaky", env={**admin, "TESSERA_URL": relay_url})
            assert "no such endpoint" in assert_one_line_error(through, 1)

        # The server is gone: the relay says so, the agent fails over and keeps working.
        gone = run_agent("connect")
        line = assert_one_line_error(gone, 1)
        assert (
            "the license server is unavailable (HTTP 503): the relay cannot reach the license server" in line
        )
        assert run_agent("check", "uniplex").returncode == 0
        assert status()["failover_since"] is not None

        # The server is back: the same relay carries the next check-in, no restart.
        with running_server(server_dir, tls=True, ca=ca, port=port):
            back = run_agent("connect")
            assert back.returncode == 0, back.stderr
            assert status()["state"] == "normal"
            assert status()["failover_since"] is None


def test_relay_commands_refuse_bad_input_in_one_line(tmp_path: Path) -> None:
    info = init_data_dir(tmp_path / "server")
    ca = info["ca"]

    def relay_init(*args: str) -> str:
        return assert_one_line_error(
            tessera("relay", "init", "--data-dir", str(tmp_path / "relay"), *args), 2
        )

    assert "https://" in relay_init("--upstream", "http://core:7790", "--upstream-ca", ca)
    assert "missing.pem" in relay_init(
        "--upstream", "https://core:7790", "--upstream-ca", str(tmp_path / "missing.pem")
    )
    assert "go together" in relay_init("--upstream", "https://core:7790", "--upstream-ca", ca, "--cert", ca)
    assert "--hostname '*.example.com' is not a host name" in relay_init(
        "--upstream", "https://core:7790", "--upstream-ca", ca, "--hostname", "*.example.com"
    )
    # A relay certificate with a CA that did not sign it: every agent pinning that CA would
    # fail its TLS handshake, so init refuses it as it refuses a key of another certificate.
    made = tessera("server", "relay-cert", "--data-dir", str(tmp_path / "server"),
                   "--hostname", "relay.example", "-o", str(tmp_path / "for-relay"))  # fmt: skip
    assert made.returncode == 0, made.stderr
    (tmp_path / "other-ca.pem").write_bytes(make_tls_material(datetime.now(UTC)).ca_cert_pem)
    cert, key = str(tmp_path / "for-relay" / "relay.pem"), str(tmp_path / "for-relay" / "relay.key")
    assert "is not signed by --ca" in relay_init(
        "--upstream", "https://core:7790", "--upstream-ca", ca,
        "--cert", cert, "--key", key, "--ca", str(tmp_path / "other-ca.pem"),
    )  # fmt: skip
    assert "is not a CA certificate" in relay_init(
        "--upstream", "https://core:7790", "--upstream-ca", ca, "--cert", cert, "--key", key, "--ca", cert
    )
    assert not (tmp_path / "relay").exists()
    assert "not a relay data directory" in assert_one_line_error(
        tessera("relay", "run", "--data-dir", str(tmp_path / "server"), "--port", str(free_port())), 2
    )

    def relay_cert(data_dir: Path, name: str) -> str:
        args = ["--data-dir", str(data_dir), "--hostname", name, "-o", str(tmp_path / "out")]
        return assert_one_line_error(tessera("server", "relay-cert", *args), 2)

    assert "nowhere" in relay_cert(tmp_path / "nowhere", "relay.example")
    for bad in ("a b", "a..b", "-x.com", "*.example.com", "relay_1.example"):
        assert f"--hostname {bad!r} is not a host name" in relay_cert(tmp_path / "server", bad)
    assert not (tmp_path / "out").exists()

    # An existing relay key is never replaced by accident (server init refuses the same):
    # the relay using it would stop matching its certificate.
    out = tmp_path / "for-relay"
    args = ["server", "relay-cert", "--data-dir", str(tmp_path / "server"), "--hostname", "relay.example"]
    args += ["-o", str(out)]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = assert_one_line_error(tessera(*args), 2)
    assert f"{out / 'relay.key'} exists already (use --force to replace it)" in line
    (out / "relay.key").unlink()
    assert f"{out / 'relay.pem'} exists already" in assert_one_line_error(tessera(*args), 2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {"relay.pem": before["relay.pem"]}
    forced = tessera(*args, "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "relay.pem").read_bytes() != before["relay.pem"]
    assert (out / "relay.key").stat().st_mode & 0o777 == 0o600
    # A relay whose server's CA file was damaged after init says so before it listens.
    made = tessera("relay", "init", "--data-dir", str(tmp_path / "relay"), "--upstream", "https://core:7790",
                   "--upstream-ca", ca)  # fmt: skip
    assert made.returncode == 0, made.stderr
    (tmp_path / "relay" / "upstream-ca.pem").write_text("garbage")
    assert "upstream-ca.pem" in assert_one_line_error(
        tessera("relay", "run", "--data-dir", str(tmp_path / "relay"), "--port", str(free_port())), 2
    )
