"""The whole server journey from the outside, with real processes, real TLS and real HTTP.

``server init`` -> ``server run`` (HTTPS, CA pinned) -> ``product create`` ->
``customer create`` -> ``license issue`` -> an online activation (a small client built from
:mod:`tessera.core.protocol`, since the agent CLI lives on another branch) -> a second
machine refused -> a wrong-role token refused -> offline activation with
``license activate-offline`` -> a central change reaching the agent at its next check-in.
On SQLite, and on PostgreSQL when ``TESSERA_TEST_POSTGRES_URL`` is set.
"""

from __future__ import annotations

import json
import sqlite3
import ssl
import subprocess
import warnings
from pathlib import Path

import httpx
import pytest

from tessera.core.fingerprint import locking_id_for
from tessera.core.protocol import ActivationRequest, CheckinRequest, ServerResponse
from tessera.core.signing import Keyring, SigningKey
from tessera.core.verify import check_binding, load_signed

from ..server.conftest import backend_database
from ..server.processes import clean_env, running_server, tessera
from .conftest import assert_one_line_error


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_server_journey(tmp_path: Path, backend: str) -> None:
    with backend_database(backend) as db_url:
        _journey(tmp_path, db_url)


def _journey(tmp_path: Path, db_url: str | None) -> None:
    data_dir = tmp_path / "server"
    init_args = ["server", "init", "--data-dir", str(data_dir), "--json"]
    if db_url:
        init_args += ["--db", db_url]
    init = tessera(*init_args)
    assert init.returncode == 0, init.stderr
    info = json.loads(init.stdout)
    assert {"admin_token", "vendor_key", "ca"} <= info.keys()
    assert (data_dir / "tessera.toml").is_file()
    assert oct((data_dir / "vendor.key").stat().st_mode & 0o777) == "0o600"
    assert b"ENCRYPTED" in (data_dir / "vendor.key").read_bytes()
    again = assert_one_line_error(tessera("server", "init", "--data-dir", str(data_dir)), 2)
    assert "initialized already" in again
    keyring = Keyring.loads(Path(info["vendor_key"]).read_text())
    ca = info["ca"]

    with running_server(data_dir, tls=True, ca=ca) as url:
        env = clean_env(TESSERA_URL=url, TESSERA_TOKEN=info["admin_token"], TESSERA_CA=ca)

        def cli(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
            return tessera(*args, env={**env, **({"TESSERA_TOKEN": token} if token else {})}, cwd=tmp_path)

        # TLS is real: without the pinned CA the certificate is not trusted; TLS 1.1 is refused.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/api/v1/health", timeout=5)
        old = ssl.create_default_context(cafile=ca)
        with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/api/v1/health", verify=old, timeout=5)

        made = cli(
            "product",
            "create",
            "cortex",
            "--name",
            "Cortex DB",
            "--feature",
            "uniplex=Uniplex",
            "--feature",
            "backup",
        )
        assert made.returncode == 0, made.stderr
        customer = cli("customer", "create", "myCompany", "--city", "Berlin", "--json")
        assert customer.returncode == 0, customer.stderr
        customer_id = str(json.loads(customer.stdout)["id"])
        assert cli("customer", "create", "Plain Ltd").stdout.strip().isdigit()
        issued = cli(
            "license", "issue", "--customer", customer_id, "--product", "cortex",
            "--feature", "uniplex=5,2030-01-15", "--feature", "backup=1", "--version", "4.*",
            "--failover-days", "14", "--emergency-feature", "backup", "--order", "PO-4711",
            "--validation-hours", "12", "--recovery-allowance", "2", "--json",
        )  # fmt: skip
        assert issued.returncode == 0, issued.stderr
        lic = json.loads(issued.stdout)
        assert lic["serial"].startswith("20") and len(lic["key"]) == 29
        # The order reference made an order of its own.
        order = json.loads(cli("order", "show", "PO-4711", "--json").stdout)
        assert order["customer_id"] == int(customer_id) and [x["serial"] for x in order["licenses"]] == [
            lic["serial"]
        ]
        listed = cli("order", "list")
        assert listed.returncode == 0 and "PO-4711" in listed.stdout
        assert "not found" in assert_one_line_error(cli("order", "show", "PO-0000"), 1)

        # Online activation, as the agent does it: self-signed request, CA pinned.
        agent_key = SigningKey.generate()
        machine = str(locking_id_for([("m", "machine-one"), ("n", "nic-one"), ("c", "cpu")], "cortex"))
        request = ActivationRequest.create(lic["key"], machine, "install-one-0001", agent_key)
        pinned = ssl.create_default_context(cafile=ca)
        with httpx.Client(base_url=url, verify=pinned, timeout=30) as agent_http:
            answer = agent_http.post("/api/v1/activate", content=request.to_json())
            assert answer.status_code == 200, answer.text
            response = ServerResponse.from_json(answer.content, keyring, request.nonce)
            document = load_signed(response.license or "", keyring).document
            check_binding(document, machine)  # type: ignore[arg-type]
            assert document.serial == lic["serial"] and document.failover_days == 14  # type: ignore[union-attr]
            assert document.validation_hours == 12 and document.emergency == ("backup",)  # type: ignore[union-attr]
            assert document.recovery_allowance == 2 and str(document.version) == "4.*"  # type: ignore[union-attr]
            license_file = tmp_path / "machine-one.lic"
            license_file.write_text(response.license or "")
            verified = tessera(
                "license",
                "verify",
                str(license_file),
                "--vendor-key",
                info["vendor_key"],
                "--locking-id",
                machine,
            )
            assert verified.returncode == 0, verified.stderr

            # A second machine beyond the count is refused with a clear reason.
            other = str(locking_id_for([("m", "machine-two"), ("n", "nic-two")], "cortex"))
            second = ActivationRequest.create(lic["key"], other, "install-two-0002", SigningKey.generate())
            refused = agent_http.post("/api/v1/activate", content=second.to_json())
            assert refused.status_code == 403
            assert (
                refused.json()["detail"]
                == f"no free machine left on license {lic['serial']}: 1 of 1 machines are bound"
            )

            # A token of the wrong role is refused by the API and by the CLI.
            readonly = cli("token", "create", "--role", "readonly", "--name", "auditor", "--json")
            assert readonly.returncode == 0, readonly.stderr
            ro_token = json.loads(readonly.stdout)["token"]
            denied = cli("license", "issue", "--customer", customer_id, "--product", "cortex",
                         "--feature", "uniplex=1", token=ro_token)  # fmt: skip
            assert "role readonly may not do this" in assert_one_line_error(denied, 1)
            shown = cli("license", "show", lic["serial"], "--json", token=ro_token)
            assert shown.returncode == 0, shown.stderr
            view = json.loads(shown.stdout)
            assert view["serial"] == lic["serial"] and view["order"] == "PO-4711"
            assert view["features"]["uniplex"] == {"count": 5, "expiry": "2030-01-15"}
            assert [m["locking_id"] for m in view["machines"]] == [machine]
            assert "Traceback" not in cli("license", "show", lic["serial"]).stdout
            listed = json.loads(cli("license", "list", "--json", token=ro_token).stdout)["licenses"]
            assert [r["serial"] for r in listed] == [lic["serial"]]

            # A central change reaches the installation at its next check-in.
            updated = cli("license", "update", lic["serial"], "--feature", "uniplex=9,2030-01-15")
            assert updated.returncode == 0, updated.stderr
            checkin = CheckinRequest.create(lic["key"], machine, "install-one-0001", agent_key)
            answer = agent_http.post("/api/v1/checkin", content=checkin.to_json())
            assert answer.status_code == 200, answer.text
            fresh = ServerResponse.from_json(answer.content, keyring, checkin.nonce)
            changed = load_signed(fresh.license or "", keyring).document
            assert changed.revision == 2 and changed.location().get("uniplex").count == 9  # type: ignore[union-attr]

        # Offline activation: a request file in, a license file out.
        offline_license = json.loads(
            cli("license", "issue", "--customer", customer_id, "--product", "cortex",
                "--feature", "uniplex=2", "--json").stdout
        )  # fmt: skip
        offline_machine = str(locking_id_for([("m", "air-gapped"), ("d", "disk")], "cortex"))
        request_file = tmp_path / "request.json"
        request_file.write_bytes(
            ActivationRequest.create(
                offline_license["key"], offline_machine, "install-offline-01", SigningKey.generate()
            ).to_json()
        )
        out = tmp_path / "offline.lic"
        done = cli("license", "activate-offline", str(request_file), "-o", str(out), "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["serial"] == offline_license["serial"]
        verified = tessera(
            "license",
            "verify",
            str(out),
            "--vendor-key",
            info["vendor_key"],
            "--locking-id",
            offline_machine,
        )
        assert verified.returncode == 0, verified.stderr

        # Bad input: one line, the right exit code, nothing changed.
        (tmp_path / "junk.json").write_text('{"protocol": "tessera-connect/1"}')
        junk = cli(
            "license",
            "activate-offline",
            str(tmp_path / "junk.json"),
            "-o",
            str(tmp_path / "x.lic"),
        )
        assert "lacks field" in assert_one_line_error(junk, 2)
        assert not (tmp_path / "x.lic").exists()
        assert_one_line_error(cli("license", "show", "2099-000001"), 1)
        assert_one_line_error(cli("license", "issue", "--customer", customer_id, "--product", "cortex",
                            "--feature", "uniplex=lots"), 2)  # fmt: skip
        assert_one_line_error(cli("customer", "create", "x", token="tsk_wrong"), 1)
        wrong_ca = tessera(
            "license",
            "show",
            lic["serial"],
            env={**env, "TESSERA_CA": str(data_dir / "tls" / "server.pem")},
        )
        assert "TLS" in assert_one_line_error(wrong_ca, 1)

        # The audit log recorded all of it, intact; an edited row is detected.
        audited = cli("audit", "verify", "--json")
        assert audited.returncode == 0, audited.stderr
        assert json.loads(audited.stdout)["ok"] is True and json.loads(audited.stdout)["rows"] >= 5
        if db_url is None:
            with sqlite3.connect(data_dir / "tessera.db") as db:
                db.execute("UPDATE audit_log SET actor = 'admin:nobody' WHERE id = 1")
            assert "tampered" in assert_one_line_error(cli("audit", "verify"), 1)

    unreachable = tessera("license", "show", lic["serial"], env={**env, "TESSERA_URL": url})
    assert "cannot reach" in assert_one_line_error(unreachable, 1)
