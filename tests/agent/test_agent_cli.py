"""The ``tessera agent`` verbs as users run them: real processes, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_support import LICENSE_KEY, PRODUCT, FakeServer, LiveServer, make_license, make_tls

from tessera.core import Keyring, SigningKey, SystemClock

TESSERA = str(Path(sys.executable).with_name("tessera"))
Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def machine_lid() -> str:
    out = subprocess.run(
        [TESSERA, "agent", "locking-id", "--product", PRODUCT],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.fixture
def env(tmp_path: Path, vendor: SigningKey) -> dict[str, str]:
    pub = tmp_path / "vendor.pub"
    pub.write_text(Keyring([vendor.public]).dumps())
    return {
        **os.environ,
        "TESSERA_AGENT_DIR": str(tmp_path / "state"),
        "TESSERA_VENDOR_KEY": str(pub),
        "TESSERA_PRODUCT": PRODUCT,
        "TESSERA_PRODUCT_VERSION": "4.2",
    }


@pytest.fixture
def run(env: dict[str, str], tmp_path: Path) -> Run:
    def runner(*args: str, faketime: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [TESSERA, "agent", *args]
        if faketime is not None:
            cmd = ["faketime", "-f", faketime, *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)

    return runner


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture
def licensed(run: Run, tmp_path: Path, vendor: SigningKey, machine_lid: str) -> Path:
    lic = tmp_path / "cortex.lic"
    lic.write_text(
        make_license(
            vendor,
            {"uniplex": (2, None), "backup": (1, None)},
            locking_id=machine_lid,
            connect=False,
        )
    )
    proc = run("import", str(lic))
    assert proc.returncode == 0, proc.stderr
    return lic


def test_status_json_contract(run: Run, licensed: Path) -> None:
    proc = run("status", "--json")
    assert proc.returncode == 0
    status = json.loads(proc.stdout)
    assert status["state"] == "normal"
    assert status["failover_days_left"] is None
    assert status["features"] == {
        "backup": {"count": 1, "expiry": "permanent"},
        "uniplex": {"count": 2, "expiry": "permanent"},
    }


def test_unlicensed_status(run: Run) -> None:
    status = json.loads(run("status", "--json").stdout)
    assert status["state"] == "unlicensed" and status["features"] == {}


def test_check_exit_codes(run: Run, licensed: Path) -> None:
    assert run("check", "uniplex").returncode == 0
    denied = run("check", "reporting")
    assert denied.returncode == 1
    assert "not licensed" in _one_line_error(denied)


def test_seats_via_cli(run: Run, licensed: Path) -> None:
    assert run("assign", "uniplex", "alice").returncode == 0
    assert run("assign", "uniplex", "bob").returncode == 0
    full = run("assign", "uniplex", "carol")
    assert full.returncode == 1 and "seat" in _one_line_error(full)
    seats = json.loads(run("seats", "--json").stdout)["seats"]
    assert seats["uniplex"]["assigned"] == ["alice", "bob"] and seats["uniplex"]["free"] == 0
    assert run("unassign", "uniplex", "alice").returncode == 0
    assert run("unassign", "uniplex", "alice").returncode == 1


def test_bad_and_forged_files(run: Run, licensed: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.lic"
    garbage.write_text("hello\n")
    assert run("import", str(garbage)).returncode == 2
    assert run("import", str(tmp_path / "missing.lic")).returncode == 2
    forged = tmp_path / "forged.lic"
    forged.write_text(licensed.read_text().replace("uniplex = 2", "uniplex = 9"))
    proc = run("import", str(forged))
    assert proc.returncode == 1 and "altered" in _one_line_error(proc)
    status = json.loads(run("status", "--json").stdout)
    assert status["features"]["uniplex"]["count"] == 2


def test_options_after_the_verb_and_remembered_product(
    run: Run, licensed: Path, env: dict[str, str], tmp_path: Path
) -> None:
    bare = {k: v for k, v in env.items() if k not in ("TESSERA_PRODUCT", "TESSERA_PRODUCT_VERSION")}
    proc = subprocess.run(
        [TESSERA, "agent", "check", "uniplex", "--state-dir", env["TESSERA_AGENT_DIR"]],
        capture_output=True,
        text=True,
        env=bare,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr


def test_backup_restore_cli(run: Run, licensed: Path, tmp_path: Path) -> None:
    run("assign", "uniplex", "alice")
    assert run("backup", "--without-license", "-o", "portable.json").returncode == 0
    assert run("backup", "--with-license", "-o", "full.bak").returncode == 0
    run("unassign", "uniplex", "alice")
    assert run("restore", "full.bak").returncode == 0
    seats = json.loads(run("seats", "--json").stdout)["seats"]
    assert seats["uniplex"]["assigned"] == ["alice"]
    assert run("backup", "-o", "x").returncode == 2


def test_offline_request_file(run: Run, tmp_path: Path) -> None:
    from tessera.core.protocol import ActivationRequest

    proc = run("request", "--key", LICENSE_KEY.lower(), "-o", "request.json")
    assert proc.returncode == 0, proc.stderr
    data = (tmp_path / "request.json").read_bytes()
    request = ActivationRequest.from_json(data)  # checks the agent's self-signature
    assert request.license_key == LICENSE_KEY
    assert request.product == PRODUCT  # the vendor refuses a key for another product early
    assert set(json.loads(data)) == {
        "protocol",
        "type",
        "license_key",
        "locking_id",
        "system_id",
        "nonce",
        "agent_key",
        "product",
        "signature",
    }
    assert run("request", "--key", "not-a-key", "-o", "r.json").returncode == 2


def test_read_only_state_dir_is_one_line(run: Run, env: dict[str, str], tmp_path: Path) -> None:
    env["TESSERA_AGENT_DIR"] = "/proc/version/state"
    proc = run("status")
    assert proc.returncode == 2
    _one_line_error(proc)


@pytest.fixture
def live(vendor: SigningKey, machine_lid: str, tmp_path: Path) -> Iterator[tuple[FakeServer, LiveServer]]:
    fake = FakeServer(
        vendor,
        SystemClock(),  # type: ignore[arg-type]
        lambda key: make_license(
            vendor,
            {"uniplex": (5, None), "ctxjs": (1, None)},
            locking_id=machine_lid,
            agent_key=key,
            emergency=("ctxjs",),
        ),
    )
    ca_pem, cert, key = make_tls(tmp_path)
    (tmp_path / "ca.pem").write_bytes(ca_pem)  # the agent runs in tmp_path
    server = LiveServer(fake, tls=(cert, key))
    yield fake, server
    server.stop()


@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs faketime")
def test_failover_and_emergency_under_faketime(run: Run, live: tuple[FakeServer, LiveServer]) -> None:
    fake, server = live
    proc = run("activate", "--server", server.url, "--ca", "ca.pem", "--key", LICENSE_KEY, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["state"] == "normal"
    fake.mode = "down"
    down = run("connect")
    assert down.returncode == 1 and "license server" in _one_line_error(down)
    assert run("check", "uniplex").returncode == 0  # keeps working

    status = json.loads(run("status", "--json", faketime="+10d").stdout)
    assert status["state"] == "failover" and status["failover_days_left"] == 20
    status = json.loads(run("status", "--json", faketime="+31d").stdout)
    assert status["state"] == "emergency" and list(status["features"]) == ["ctxjs"]
    assert run("check", "uniplex", faketime="+31d").returncode == 1
    assert run("check", "ctxjs", faketime="+31d").returncode == 0

    fake.mode = "ok"
    back = run("connect", "--json", faketime="+31d")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["state"] == "normal"
    assert run("check", "uniplex", faketime="+31d").returncode == 0

    # back to the real clock (behind what the agent saw): the server's time settles it
    assert json.loads(run("status", "--json").stdout)["state"] == "clock-tampered"
    fake.mode = "down"
    assert run("connect").returncode == 1
    fake.mode = "ok"
    assert json.loads(run("connect", "--json").stdout)["state"] == "normal"
    assert run("check", "uniplex").returncode == 0


@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs faketime")
def test_clock_set_back_a_year_cli(run: Run, licensed: Path) -> None:
    assert json.loads(run("status", "--json").stdout)["state"] == "normal"
    status = json.loads(run("status", "--json", faketime="-365d").stdout)
    assert status["state"] == "clock-tampered"


def test_activate_over_tls_with_pinned_ca(run: Run, live: tuple[FakeServer, LiveServer]) -> None:
    _, server = live
    proc = run("activate", "--server", server.url, "--ca", "ca.pem", "--key", LICENSE_KEY)
    assert proc.returncode == 0, proc.stderr
    assert run("connect").returncode == 0
    assert run("check", "uniplex").returncode == 0
    server.stop()
    wrong = run("activate", "--server", server.url, "--ca", "ca.pem", "--key", "bad")
    assert wrong.returncode == 2 and "license key" in _one_line_error(wrong)


def test_a_bad_product_version_is_refused_and_not_stored(
    run: Run, licensed: Path, env: dict[str, str]
) -> None:
    proc = run("--product-version", "abc", "status")
    assert proc.returncode == 2 and "not a version number" in _one_line_error(proc)
    del env["TESSERA_PRODUCT_VERSION"]  # the remembered version is used again
    status = json.loads(run("status", "--json").stdout)
    assert status["state"] == "normal"


def test_lost_state_db_is_an_error_until_a_backup_is_restored(
    run: Run, licensed: Path, tmp_path: Path
) -> None:
    assert run("backup", "--with-license", "-o", str(tmp_path / "bk.bin")).returncode == 0
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (tmp_path / "state" / name).unlink(missing_ok=True)
    proc = run("status")
    assert proc.returncode == 2 and "tessera agent restore" in _one_line_error(proc)
    assert not (tmp_path / "state" / "state.db").exists()
    assert run("restore", str(tmp_path / "bk.bin")).returncode == 0
    assert json.loads(run("status", "--json").stdout)["state"] == "normal"


@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs faketime")
def test_a_clock_before_the_certificate_is_named_as_the_cause(
    run: Run, live: tuple[FakeServer, LiveServer]
) -> None:
    _, server = live  # its certificate is valid from one day ago
    proc = run("activate", "--server", server.url, "--ca", "ca.pem", "--key", LICENSE_KEY)
    assert proc.returncode == 0, proc.stderr
    early = run("connect", faketime="-2d")
    line = _one_line_error(early)
    assert early.returncode == 1 and "clock" in line and "not valid yet" in line
    assert "pinned CA" not in line


def test_assign_unassign_backup_print_one_json_object(run: Run, licensed: Path, tmp_path: Path) -> None:
    proc = run("assign", "uniplex", "alice", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "feature": "uniplex",
        "subject": "alice",
        "assigned": True,
        "already": False,
    }
    again = json.loads(run("assign", "uniplex", "alice", "--json").stdout)
    assert again["already"] is True
    gone = json.loads(run("unassign", "uniplex", "alice", "--json").stdout)
    assert gone == {"feature": "uniplex", "subject": "alice", "assigned": False}
    out = tmp_path / "bk.json"
    backup = json.loads(run("backup", "--without-license", "-o", str(out), "--json").stdout)
    assert backup["file"] == str(out) and backup["kind"] == "without-license"
    assert backup["bytes"] == out.stat().st_size


def test_connect_exit_code_tells_a_negative_answer(run: Run, live: tuple[FakeServer, LiveServer]) -> None:
    """A script runs ``agent connect`` and reads its exit code: a lock from the server is a
    negative verdict (1), not a success with ``locked`` somewhere in the output."""
    fake, server = live
    assert run("activate", "--server", server.url, "--ca", "ca.pem", "--key", LICENSE_KEY).returncode == 0
    assert run("connect").returncode == 0
    fake.directives = ("lock",)
    locked = run("connect", "--json")
    assert locked.returncode == 1 and json.loads(locked.stdout)["state"] == "locked"


@pytest.mark.parametrize("url", ["http://127.0.0.1:9", "https://127.0.0.1:abc"])
def test_activate_refuses_a_url_that_is_not_tls(run: Run, url: str) -> None:
    proc = run("activate", "--server", url, "--key", LICENSE_KEY)
    assert proc.returncode == 2 and "server URL" in _one_line_error(proc)


def test_check_of_a_feature_code_that_is_no_code_is_bad_usage(run: Run, licensed: Path) -> None:
    proc = run("check", "")
    assert proc.returncode == 2 and "feature code" in _one_line_error(proc)


@pytest.mark.parametrize("existing", [False, True], ids=["missing-dir", "empty-dir"])
def test_verbs_that_only_look_create_no_installation(
    run: Run, env: dict[str, str], tmp_path: Path, existing: bool
) -> None:
    """``status`` of a mistyped or not yet used ``--state-dir`` reports "not activated" and
    leaves nothing behind: no directory, no installation.key, no state.db. So do the verbs
    that can change nothing where nothing is installed (each with its usual verdict)."""
    where = tmp_path / "nowhere" / "state"
    if existing:
        where.mkdir(parents=True)
    env["TESSERA_AGENT_DIR"] = str(where)

    def nothing_made() -> bool:
        return list(where.iterdir()) == [] if existing else not (tmp_path / "nowhere").exists()

    status = run("status", "--json")
    assert status.returncode == 0, status.stderr
    assert nothing_made()
    body = json.loads(status.stdout)
    assert body["state"] == "unlicensed" and body["features"] == {} and body["failover_days_left"] is None
    assert f"nothing is installed in {where}" in body["message"]
    plain = run("status")
    assert plain.returncode == 0 and "unlicensed" in plain.stdout
    denied = run("check", "uniplex")
    assert denied.returncode == 1 and "nothing is installed" in _one_line_error(denied)
    denied = run("check", "uniplex", "--json")
    assert denied.returncode == 1 and json.loads(denied.stdout)["allowed"] is False
    seats = run("seats", "--json")
    assert seats.returncode == 0 and json.loads(seats.stdout) == {"seats": {}}
    for verb in (("assign", "uniplex", "alice"), ("unassign", "uniplex", "alice"), ("connect",)):
        proc = run(*verb)
        assert proc.returncode == 1 and "nothing is installed" in _one_line_error(proc), verb
    backup = run("backup", "--without-license", "-o", str(tmp_path / "b.json"))
    assert backup.returncode == 1 and "nothing to back up" in _one_line_error(backup)
    assert not (tmp_path / "b.json").exists()
    assert nothing_made()
    # Bad usage is still bad usage there, and the verbs that install still install.
    assert run("--product-version", "abc", "status").returncode == 2
    assert run("check", "").returncode == 2
    assert run("import-blacklist", str(tmp_path / "missing.bl")).returncode == 2
    assert run("request", "--key", LICENSE_KEY, "-o", str(tmp_path / "r.json")).returncode == 0
    assert (where / "state.db").exists() and (where / "installation.key").exists()


LONG = "x" * 100_000
_LONG_INPUTS = [
    (("assign", "uniplex", LONG), 2, "invalid subject 'xxxx"),
    (("unassign", "uniplex", LONG), 1, "holds no seat of uniplex"),
    (("assign", LONG, "alice"), 2, "invalid feature code 'xxxx"),
    (("check", LONG), 2, "invalid feature code: 'xxxx"),
    (("activate", "--server", "https://" + LONG, "--key", LICENSE_KEY), 2, "server URL 'https://xxxx"),
    (("activate", "--server", LONG, "--key", LICENSE_KEY), 2, "must start with https://"),
    (("--product", LONG, "status"), 2, "invalid product code: 'xxxx"),
    (("--product-version", LONG, "status"), 2, "not a version number: 'xxxx"),
    (("import", LONG), 2, "a path of 100,000 characters is too long"),
    (("--state-dir", LONG, "status"), 2, "a path of 100,000 characters is too long"),
    (("backup", "--without-license", "-o", LONG), 2, "a path of 100,000 characters is too long"),
]


@pytest.mark.parametrize(
    ("installed", "args", "code", "needle"),
    [(True, *case) for case in _LONG_INPUTS] + [(False, *case) for case in _LONG_INPUTS[:3]],
    ids=lambda a: (
        str(a)
        if isinstance(a, (bool, int))
        else " ".join(x if len(x) < 20 else "LONG" for x in a)
        if isinstance(a, tuple)
        else ""
    ),
)
def test_an_error_repeats_at_most_a_prefix_of_what_was_typed(
    run: Run, tmp_path: Path, vendor: SigningKey, machine_lid: str,
    installed: bool, args: tuple[str, ...], code: int, needle: str,
) -> None:  # fmt: skip
    """A 100,000-character subject (or code, URL, version, path) came back whole in the
    error line: an error repeats a short prefix of it and "…", or only its length, whether
    or not anything is installed in the state directory."""
    if installed:
        lic = tmp_path / "cortex.lic"
        lic.write_text(make_license(vendor, {"uniplex": (2, None)}, locking_id=machine_lid, connect=False))
        assert run("import", str(lic)).returncode == 0
    proc = run(*args)
    line = _one_line_error(proc)
    assert proc.returncode == code, line
    assert needle in line and len(line) < 400, line[:500]
    assert "…" in line or "too long" in line
