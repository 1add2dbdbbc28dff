"""The web portal in a real browser: Debian's Chromium, driven by Playwright, against a real
``server run`` over TLS, with the license prepared by the admin CLI and the request file
made and the license file imported by the agent CLI.

``TESSERA_TEST_CHROMIUM`` names the browser; set (``.ci/run`` sets it) and missing, the
test fails instead of skipping. Unset, ``/usr/bin/chromium`` is used when it is there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..server.conftest import backend_database
from ..server.processes import clean_env, running_server, tessera

CHROMIUM_ENV = "TESSERA_TEST_CHROMIUM"
PASSWORD = "tidal-orbit-cactus-lantern"
#: What the machine's probe found Chromium needs here: as root no sandbox, and no calls home
#: (this network refuses them, many at a time).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    named = os.environ.get(CHROMIUM_ENV)
    if named:
        assert Path(named).is_file(), f"{CHROMIUM_ENV}={named} does not exist (.ci/run installs chromium)"
        return named
    found = shutil.which("chromium")
    if found is None:
        pytest.skip(f"no chromium (set {CHROMIUM_ENV}; .ci/run installs it)")
    return found


@pytest.fixture
def browser() -> Iterator[Any]:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_customer_activates_offline_in_the_browser(tmp_path: Path, backend: str, browser: Any) -> None:
    with backend_database(backend) as db_url:
        _journey(tmp_path, db_url, browser)


def _journey(tmp_path: Path, db_url: str | None, browser: Any) -> None:
    data_dir = tmp_path / "server"
    init_args = ["server", "init", "--data-dir", str(data_dir), "--web-portal", "--json"]
    init = tessera(*init_args, *(["--db", db_url] if db_url else []))
    assert init.returncode == 0, init.stderr
    info = json.loads(init.stdout)
    assert info["web_portal"] is True
    (tmp_path / "password").write_text(PASSWORD + "\n")

    with running_server(data_dir, tls=True, ca=info["ca"]) as url:
        env = clean_env(TESSERA_URL=url, TESSERA_TOKEN=info["admin_token"], TESSERA_CA=info["ca"])

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            result = tessera(*args, env=env, cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            return result

        cli(
            "product",
            "create",
            "cortex",
            "--name",
            "Cortex DB",
            "--feature",
            "uniplex",
            "--feature",
            "backup",
        )
        customer = json.loads(cli("customer", "create", "myCompany", "--city", "Berlin", "--json").stdout)[
            "id"
        ]
        other = json.loads(cli("customer", "create", "Other GmbH", "--json").stdout)["id"]
        issued = json.loads(
            cli("license", "issue", "--customer", str(customer), "--product", "cortex",
                "--feature", "uniplex=5,2099-01-15", "--feature", "backup=1", "--json").stdout
        )  # fmt: skip
        foreign = json.loads(
            cli("license", "issue", "--customer", str(other), "--product", "cortex",
                "--feature", "uniplex=1", "--json").stdout
        )  # fmt: skip
        cli("user", "create", "alice", "--role", "customer", "--customer", str(customer),
            "--password-file", "password")  # fmt: skip
        weak = tessera(
            "user", "create", "bob", "--role", "admin", "--password-file", "weak", env=env, cwd=tmp_path
        )
        assert weak.returncode == 2 and "does not exist" in weak.stderr
        (tmp_path / "weak").write_text("password1234\n")
        weak = tessera(
            "user", "create", "bob", "--role", "admin", "--password-file", "weak", env=env, cwd=tmp_path
        )
        assert weak.returncode == 2 and "password: too weak" in weak.stderr and weak.stderr.count("\n") == 1
        listed = json.loads(cli("user", "list", "--json").stdout)["users"]
        assert [(u["username"], u["role"]) for u in listed] == [("alice", "customer")]

        agent_env = clean_env(
            TESSERA_AGENT_DIR=str(tmp_path / "agent"), TESSERA_VENDOR_KEY=info["vendor_key"]
        )

        def agent(*args: str) -> subprocess.CompletedProcess[str]:
            return tessera("agent", *args, env=agent_env, cwd=tmp_path)

        made = agent("request", "--key", issued["key"], "-o", "request.json")
        assert made.returncode == 0, made.stderr

        context = browser.new_context(ignore_https_errors=True, accept_downloads=True)
        page = context.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))

        # Signing in, via the page first asked for.
        page.goto(f"{url}/portal/licenses/{issued['serial']}")
        assert page.url.startswith(f"{url}/portal/login")
        page.fill("input[name=username]", "alice")
        page.fill("input[name=password]", "wrong-password-here")
        page.click("button[type=submit]")
        assert "wrong user name or password" in page.inner_text("[role=alert]")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{url}/portal/licenses/{issued['serial']}")
        assert "Not activated on any machine yet" in page.inner_text("main")
        assert "uniplex" in page.inner_text("main")

        # The list shows only this customer's license; htmx narrows it while one types.
        page.click("text=Licenses")
        page.wait_for_url(f"{url}/portal/licenses")
        rows = page.inner_text("#licenses")
        assert issued["serial"] in rows and foreign["serial"] not in rows
        page.fill("input[name=q]", "no-such-license")
        page.wait_for_selector("text=No licenses match this search")
        assert "q=no-such-license" in page.url  # hx-push-url: the search is in the address
        page.fill("input[name=q]", "")
        page.wait_for_selector(f"#licenses >> text={issued['serial']}")

        # Offline activation: upload the agent's request, download the license file.
        page.click("text=Offline activation")
        page.set_input_files("input[name=request]", str(tmp_path / "request.json"))
        page.click("button:has-text('Activate')")
        page.wait_for_selector("[role=status]")
        assert f"License {issued['serial']} is activated" in page.inner_text("[role=status]")
        with page.expect_download() as download_info:
            page.click("a.download")
        license_file = tmp_path / "from-portal.lic"
        download_info.value.save_as(license_file)
        assert download_info.value.suggested_filename == f"{issued['serial']}.lic"
        page.screenshot(path=str(tmp_path / "activated.png"), full_page=True)

        imported = agent("import", str(license_file))
        assert imported.returncode == 0, imported.stderr
        assert agent("check", "uniplex").returncode == 0
        status = json.loads(agent("status", "--json").stdout)
        assert status["state"] == "normal" and status["features"]["uniplex"]["count"] == 5

        page.goto(f"{url}/portal/licenses/{issued['serial']}")
        assert "offline" in page.inner_text("table >> nth=1")
        page.goto(f"{url}/portal/licenses/{foreign['serial']}")
        assert "not found" in page.inner_text("[role=alert]")  # as if there were no such license

        # Setting up two-step sign-in shows a QR code the CSP lets through (inline SVG).
        page.goto(f"{url}/portal/account")
        page.click("button:has-text('Set up two-step sign-in')")
        page.wait_for_selector(".qr svg")
        box = page.locator(".qr svg").bounding_box()
        assert box is not None and box["width"] >= 100

        # Signing out ends the session for good.
        page.click("button:has-text('Sign out')")
        page.wait_for_url(f"{url}/portal/login")
        page.goto(f"{url}/portal/licenses")
        assert page.url.startswith(f"{url}/portal/login")
        # The wrong password (401) and the other customer's license (404), nothing else: no
        # script error, nothing the Content-Security-Policy had to block.
        assert [p.split("status of ")[-1] for p in problems] == ["401 (Unauthorized)", "404 (Not Found)"], (
            problems
        )
        problems.clear()
        context.close()

        # Sales revokes the other license from its page: an htmx-boosted form behind a
        # confirmation dialog, under the same CSP.
        cli("user", "create", "ops", "--role", "sales", "--password-file", "password")
        staff = browser.new_context(ignore_https_errors=True).new_page()
        staff.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        staff.on("pageerror", lambda e: problems.append(str(e)))
        asked: list[str] = []
        staff.on("dialog", lambda d: (asked.append(d.message), d.accept()))
        staff.goto(f"{url}/portal/licenses/{foreign['serial']}")
        staff.fill("input[name=username]", "ops")
        staff.fill("input[name=password]", PASSWORD)
        staff.click("button[type=submit]")
        staff.wait_for_url(f"{url}/portal/licenses/{foreign['serial']}")
        staff.click("button:has-text('Revoke license')")
        staff.wait_for_selector("button:has-text('Reactivate license')")
        assert asked and asked[0].startswith(f"Revoke license {foreign['serial']}?")
        shown = json.loads(cli("license", "show", foreign["serial"], "--json").stdout)
        assert shown["status"] == "revoked"
        assert problems == [], problems

        # Sales issues a new license in the portal: product first, then its features; the
        # key is shown once, and the CLI sees the license.
        staff.click("nav >> text=New license")
        staff.select_option("select[name=product]", "cortex")
        staff.click("button:has-text('Next')")
        staff.wait_for_selector("input[name='count:uniplex']")
        staff.fill("input[name=customer]", str(other))
        staff.fill("input[name='count:uniplex']", "4")
        staff.fill("input[name='expiry:uniplex']", "2099-06-30")
        staff.check("input[name='emergency:uniplex']")
        staff.fill("input[name=machines]", "2")
        staff.click("button:has-text('Issue license')")
        staff.wait_for_selector("[role=status]")
        serial = staff.inner_text("dl.facts dd:nth-of-type(1) code")
        assert staff.inner_text("code.secret").count("-") == 4  # the license key, shown once
        made = json.loads(cli("license", "show", serial, "--json").stdout)
        assert made["features"] == {"uniplex": {"count": 4, "expiry": "2099-06-30"}}
        assert made["machines_allowed"] == 2 and made["emergency"] == ["uniplex"]
        # ... and changes its terms: a new revision.
        staff.click(f"text=Show license {serial}")
        staff.click("text=Change terms")
        staff.fill("input[name='count:uniplex']", "6")
        staff.click("button:has-text('Save as revision 2')")
        staff.wait_for_url(f"{url}/portal/licenses/{serial}")
        changed = json.loads(cli("license", "show", serial, "--json").stdout)
        assert changed["revision"] == 2 and changed["features"]["uniplex"]["count"] == 6
        assert problems == [], problems

        # The admin's other verbs: a new password (generated, shown once), disable, enable.
        fresh = json.loads(cli("user", "password", "alice", "--json").stdout)["password"]
        assert len(fresh) >= 20
        cli("user", "disable", "alice")
        assert json.loads(cli("user", "list", "--json").stdout)["users"][0]["disabled"] is True
        cli("user", "enable", "alice")
        cli("user", "unlock", "alice")
        cli("user", "reset-2fa", "alice")
        assert json.loads(cli("user", "list", "--json").stdout)["users"][0]["two_factor"] is False
        missing = tessera("user", "disable", "nobody", env=env, cwd=tmp_path)
        assert missing.returncode == 1 and "user 'nobody' not found" in missing.stderr
