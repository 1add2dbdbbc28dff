"""User-bound licenses and webhooks from the outside: real server processes, real TLS, the CLI.

Issue a user-bound license with count 2, issue ann's credential, lease from two agents, the
third refused with the reason, a release frees one, re-issuing ann's credential makes the
old file fail at once, a lease without heartbeat is freed after its (configured, short)
duration while a held one survives, stopping the holder releases at once; parallel lease
requests never exceed the count (on PostgreSQL across two worker processes); forged and
malformed credential files get one-line errors; webhooks reach a loopback receiver that
fails its first attempt, signed.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tessera.core.credential import LeaseRequest, parse_credential
from tessera.server.webhooks import verify_signature

from ..server.conftest import backend_database, wait_until
from ..server.processes import TESSERA, clean_env, init_data_dir, running_server, tessera
from ..server.test_webhooks import Receiver

SECRET = "journey-secret-0123456789"
#: Short, but long enough for a few CLI processes on a loaded 2-core machine: the first
#: lease must outlive the four CLI calls up to its release (1.5 s each with the machine
#: loaded six times over, 5 s each when it was loaded eight times over).
LEASE_SECONDS = 20


def _error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_user_bound_license_journey(tmp_path: Path, backend: str) -> None:
    with backend_database(backend) as db_url:
        receiver = Receiver(fail_first=1)
        try:
            _journey(tmp_path, db_url, receiver)
        finally:
            receiver.close()


def _journey(tmp_path: Path, db_url: str | None, receiver: Receiver) -> None:
    data_dir = tmp_path / "server"
    info = init_data_dir(data_dir, db_url)
    with (data_dir / "tessera.toml").open("a") as config:
        config.write(f"\n[leases]\nduration_seconds = {LEASE_SECONDS}\n")
        config.write("\n[webhooks]\nretry_base_seconds = 0.2\npoll_seconds = 0.1\n")
    ca, vendor = info["ca"], info["vendor_key"]
    workers = ["--workers", "2"] if db_url else []
    with running_server(data_dir, tls=True, ca=ca, extra=workers) as url:
        env = clean_env(TESSERA_URL=url, TESSERA_TOKEN=info["admin_token"], TESSERA_CA=ca)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return tessera(*args, env=env, cwd=tmp_path)

        def ok(*args: str) -> dict[str, object]:
            result = cli(*args, "--json")
            assert result.returncode == 0, (args, result.stderr)
            out: dict[str, object] = json.loads(result.stdout)
            return out

        def agent(verb: str, *args: str, cred: str = "ann.cred") -> subprocess.CompletedProcess[str]:
            return cli("agent", verb, *args, "--credential", cred, "--server", url, "--ca", ca,
                       "--vendor-key", vendor, "--json")  # fmt: skip

        ok("webhook", "add", receiver.url, "--secret", SECRET)
        ok("product", "create", "cortex", "--name", "Cortex", "--feature", "uniplex",
           "--feature", "backup")  # fmt: skip
        customer = ok("customer", "create", "myCompany", "--city", "Berlin")["id"]
        serial = str(
            ok("license", "issue", "--customer", str(customer), "--product", "cortex",
               "--feature", "uniplex=2", "--feature", "backup=3", "--binding", "user")["serial"]
        )  # fmt: skip
        issued = ok("license", "credential", serial, "--user", "ann", "-o", "ann.cred")
        assert issued["generation"] == 1
        assert oct((tmp_path / "ann.cred").stat().st_mode & 0o777) == "0o600"

        # Two agents lease; the third is refused with the reason; a release frees one.
        first = json.loads(agent("lease", "uniplex").stdout)
        second = json.loads(agent("lease", "uniplex").stdout)
        assert (first["in_use"], second["in_use"], second["count"]) == (1, 2, 2)
        third = _error(agent("lease", "uniplex"), 1)
        assert f"all 2 leases of uniplex on license {serial} are in use" in third
        renewed = agent("renew", "uniplex", str(second["lease_id"]))
        assert renewed.returncode == 0, renewed.stderr
        released = agent("release", "uniplex", str(first["lease_id"]))
        assert released.returncode == 0, released.stderr
        assert json.loads(released.stdout)["in_use"] == 1
        # Releasing it again (or a made-up lease) is harmless, and says nothing was released.
        for lease_id in (str(first["lease_id"]), "ls_" + "A" * 24):
            again = agent("release", "uniplex", lease_id)
            assert again.returncode == 0, again.stderr
            answer = json.loads(again.stdout)
            assert (answer["released"], answer["in_use"]) == (False, 1), answer
            assert answer["message"].startswith("uniplex: nothing released: you hold no lease")

        # Re-issuing ann's credential: the old file fails at once, for leasing and heartbeats.
        assert ok("license", "credential", serial, "--user", "ann", "-o", "ann2.cred")["generation"] == 2
        stale = _error(agent("lease", "uniplex"), 1)
        assert "replaced by a newer one" in stale
        assert "replaced by a newer one" in _error(agent("renew", "uniplex", str(second["lease_id"])), 1)

        # Forged and malformed credential files: one line each, nothing sent or changed.
        text = (tmp_path / "ann2.cred").read_text()
        (tmp_path / "forged.cred").write_text(text.replace("user-id = ann", "user-id = bob"))
        assert "signature does not match" in _error(agent("lease", "uniplex", cred="forged.cred"), 1)
        (tmp_path / "bad.cred").write_text(text.replace("generation = 2", "generation = two"))
        assert "line 6" in _error(agent("lease", "uniplex", cred="bad.cred"), 2)

        # A lease without heartbeat is freed after its duration; a held one survives.
        holder = subprocess.Popen(
            [TESSERA, "agent", "lease", "uniplex", "--hold", "--credential", "ann2.cred",
             "--server", url, "--ca", ca, "--vendor-key", vendor, "--json"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert holder.stdout is not None
            lines = [holder.stdout.readline()]
            while lines[-1] not in ("}\n", ""):  # one (indented) JSON object, then it waits
                lines.append(holder.stdout.readline())
            held = json.loads("".join(lines))
            assert held["in_use"] == 1
            assert agent("lease", "uniplex", cred="ann2.cred").returncode == 0
            granted = time.monotonic()  # the unrenewed lease ends by granted + LEASE_SECONDS
            assert "are in use" in _error(agent("lease", "uniplex", cred="ann2.cred"), 1)
            time.sleep(max(0.0, granted + LEASE_SECONDS + 1 - time.monotonic()))
            again = agent("lease", "uniplex", cred="ann2.cred")
            assert again.returncode == 0, again.stderr  # the unrenewed lease was freed
            assert json.loads(again.stdout)["in_use"] == 2  # the holder's lease still counts
            assert "are in use" in _error(agent("lease", "uniplex", cred="ann2.cred"), 1)
            leases = ok("license", "leases", serial)["leases"]
            assert held["lease_id"] in [lease["lease_id"] for lease in leases]  # type: ignore[union-attr]
        finally:
            holder.send_signal(signal.SIGTERM)
            assert holder.wait(15) == 0, holder.stderr.read() if holder.stderr else ""
        # Stopping the holder released its lease at once.
        assert agent("lease", "uniplex", cred="ann2.cred").returncode == 0

        # Parallel requests (on PostgreSQL against two worker processes): exactly the count.
        credential = parse_credential((tmp_path / "ann2.cred").read_bytes())

        def post(_: int) -> int:
            request = LeaseRequest.create("lease", credential, "backup", datetime.now(UTC))
            with httpx.Client(verify=ssl.create_default_context(cafile=ca), timeout=60) as client:
                return client.post(f"{url}/api/v1/lease", content=request.to_json()).status_code

        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(post, range(30)))
        assert (codes.count(200), codes.count(403)) == (3, 27)

    # Webhooks were delivered (the receiver failed its first attempt), signed.
    wait_until(lambda: len(receiver.received) >= 3, 5)
    events = []
    for headers, body, at in receiver.received:
        assert verify_signature(SECRET, headers["Tessera-Signature"], body, at)
        events.append(json.loads(body)["event"])
    assert {"license.issued", "credential.issued"} <= set(events)


def test_holder_side_bad_input_without_a_server(tmp_path: Path) -> None:
    """Bad input is exit 2 naming what is wrong; an unreachable server is exit 1; one line."""
    from tessera.core.credential import Credential, render_credential
    from tessera.core.signing import Keyring, SigningKey

    vendor = SigningKey.generate()
    (tmp_path / "vendor.pub").write_text(Keyring([vendor.public]).dumps())
    seed = os.urandom(32)
    public = SigningKey.from_raw(seed).public.to_base64()
    now = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    text = render_credential(Credential("2026-000001", "cortex", "ann", 1, public, now), seed, vendor)
    (tmp_path / "ann.cred").write_text(text)
    (tmp_path / "bad.cred").write_text(text.replace("product = cortex", "product = Cortex!"))

    def lease(feature: str, cred: str) -> subprocess.CompletedProcess[str]:
        return tessera("agent", "lease", feature, "--credential", cred, "--server",
                       "https://127.0.0.1:9", "--vendor-key", "vendor.pub", cwd=tmp_path)  # fmt: skip

    assert "line 4: product" in _error(lease("uniplex", "bad.cred"), 2)
    assert "does not exist" in _error(lease("uniplex", "missing.cred"), 2)
    assert "invalid feature code" in _error(lease("no such", "ann.cred"), 2)
    assert "cannot reach the license server" in _error(lease("uniplex", "ann.cred"), 1)
