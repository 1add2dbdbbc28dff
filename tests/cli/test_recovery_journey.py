"""Recovery and blacklists from the outside: real server, real agents on separate machines.

Machine A activates, support rehosts the license to machine B; A's next ``agent connect``
locks it (honeypot); A's attempt to activate another license is refused and shows up in
``report blacklist-hits``; the exported blacklist imported into a fresh agent on A locks it
after the configured delay (``faketime``); forged and replayed lists are refused. A license
without Connect gets exactly its allowance of recoveries, then a clear refusal until
support authorizes one more.

Each machine is its own mount/UTS namespace with its own /etc/machine-id (as in
``test_full_journey``), so its Locking ID differs without any switch in the product.
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
from .test_full_journey import _can_unshare

FAKETIME = shutil.which("faketime")


class Box:
    """A machine (its own /etc/machine-id); each agent on it has its own state directory."""

    def __init__(self, tmp: Path, name: str, env: dict[str, str]) -> None:
        self.tmp, self.name, self.env = tmp, name, env
        machine_id = tmp / f"{name}.machine-id"
        machine_id.write_text(os.urandom(16).hex() + "\n")
        script = f'mount --bind {machine_id} /etc/machine-id && hostname {name} && exec "$@"'
        self.prefix = ["unshare", "-mu", "sh", "-c", script, "sh"]

    def agent(
        self, *args: str, state: str = "agent", faketime: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [*self.prefix]
        if faketime:
            assert FAKETIME, "faketime is not installed"
            command += [FAKETIME, "-f", faketime]
        command += [TESSERA, "agent", *args]
        env = {**self.env, "TESSERA_AGENT_DIR": str(self.tmp / f"{self.name}.{state}")}
        return subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip

    def state(self, state: str = "agent", faketime: str | None = None) -> str:
        result = self.agent("status", "--json", state=state, faketime=faketime)
        assert result.returncode == 0, result.stderr
        return str(json.loads(result.stdout)["state"])

    def locking_id(self) -> str:
        result = self.agent("locking-id")
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare for separate machines")
@pytest.mark.skipif(FAKETIME is None, reason="needs faketime")
# Some 50 CLI and agent processes per backend: about 130 s alone, past the default 300 s
# when other test runs share the machine's two cores.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_recovery_journey(tmp_path: Path, backend: str) -> None:
    with backend_database(backend) as db_url:
        _journey(tmp_path, db_url)


def _journey(tmp: Path, db_url: str | None) -> None:
    data = tmp / "server"
    init = tessera("server", "init", "--data-dir", str(data), "--json", *(["--db", db_url] if db_url else []))
    assert init.returncode == 0, init.stderr
    info = json.loads(init.stdout)
    ca, vendor_pub = info["ca"], info["vendor_key"]

    with running_server(data, tls=True, ca=ca, port=free_port()) as url:
        admin = clean_env(TESSERA_URL=url, TESSERA_TOKEN=info["admin_token"], TESSERA_CA=ca)

        def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
            return tessera(*args, env=env or admin, cwd=tmp)

        def cli_json(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
            result = cli(*args, "--json", env=env)
            assert result.returncode == 0, result.stderr
            return dict(json.loads(result.stdout))

        cli_json("product", "create", "cortex", "--name", "CortexDB", "--feature", "uniplex")
        customer = str(cli_json("customer", "create", "myCompany", "--city", "City")["id"])
        token = cli_json("token", "create", "--role", "support", "--name", "helpdesk")
        support = {**admin, "TESSERA_TOKEN": str(token.get("token") or token.get("secret"))}

        def issue(*extra: str) -> dict[str, object]:
            return cli_json("license", "issue", "--customer", customer, "--product", "cortex",
                            "--feature", "uniplex=2", *extra)  # fmt: skip

        agent_env = clean_env(TESSERA_VENDOR_KEY=vendor_pub)
        a, b = Box(tmp, "machine-a", agent_env), Box(tmp, "machine-b", agent_env)
        lic, other = issue(), issue()
        key, serial = str(lic["key"]), str(lic["serial"])
        activate = ("activate", "--server", url, "--ca", ca, "--key")
        assert a.agent(*activate, key).returncode == 0
        assert a.state() == "normal"

        # Support rehosts the license to machine B; B activates with the same key.
        moved = cli_json("license", "rehost", serial, "--locking-id", b.locking_id(),
                         "--blacklist-old", "--delay-days", "3", env=support)  # fmt: skip
        assert moved["rule"] == "connect"
        got = b.agent(*activate, key)
        assert got.returncode == 0, got.stderr
        assert b.state() == "normal"

        # (1) The honeypot: A's next check-in locks it.
        a.agent("connect")
        assert a.state() == "locked"
        assert a.agent("check", "uniplex").returncode == 1
        # (2) A cannot activate anything else; the attempt is refused and reported.
        refused = a.agent(*activate, str(other["key"]), state="second")
        assert "blacklisted" in assert_one_line_error(refused, 1)
        hits = cli_json("report", "blacklist-hits", env=support)["hits"]
        assert isinstance(hits, list)
        assert [(h["locking_id"], h["serial"], h["how"]) for h in hits] == [
            (a.locking_id(), serial, "checkin"),
            (a.locking_id(), other["serial"], "activation"),
        ]
        assert cli("report", "blacklist-hits").returncode == 0  # the table for people
        # B keeps working.
        assert b.agent("connect").returncode == 0 and b.state() == "normal"

        # (3) The exported list, shipped with the next version: a fresh agent on A is locked
        # once the delay of 3 days has passed.
        first = cli_json("blacklist", "export", "-o", str(tmp / "blacklist-1.txt"), env=support)
        second = cli_json("blacklist", "export", "-o", str(tmp / "blacklist-2.txt"), env=support)
        assert int(str(second["sequence"])) > int(str(first["sequence"]))
        assert second["format"] == "tessera/1"  # containers only: shipped agents read it
        imported = a.agent("import-blacklist", str(tmp / "blacklist-2.txt"), state="fresh")
        assert imported.returncode == 0, imported.stderr
        assert a.state("fresh") == "unlicensed"
        assert a.state("fresh", faketime="+2d") == "unlicensed"
        assert a.state("fresh", faketime="+3d") == "locked"
        # B, not listed, is untouched by the same file.
        assert b.agent("import-blacklist", str(tmp / "blacklist-2.txt")).returncode == 0
        assert b.state(faketime="+3d") == "failover"  # overdue check-in, not locked
        assert b.agent("check", "uniplex", faketime="+3d").returncode == 0
        # A replayed (older) list and an altered one are refused with one line.
        replay = a.agent("import-blacklist", str(tmp / "blacklist-1.txt"), state="fresh")
        assert "older" in assert_one_line_error(replay, 1)
        text = (tmp / "blacklist-2.txt").read_text()
        (tmp / "forged.txt").write_text(text.replace(a.locking_id(), b.locking_id()))
        forged = a.agent("import-blacklist", str(tmp / "forged.txt"), state="fresh")
        assert forged.returncode in (1, 2) and assert_one_line_error(forged, forged.returncode)
        assert a.state("fresh", faketime="+3d") == "locked"

        # Bad input: an unknown serial, a blacklisted target. Nothing changes.
        unknown = cli("license", "rehost", "2026-999999", "--locking-id", b.locking_id(), env=support)
        assert "not found" in assert_one_line_error(unknown, 1)
        target = cli("license", "rehost", serial, "--locking-id", a.locking_id(), env=support)
        assert "blacklisted" in assert_one_line_error(target, 1)
        both = cli("license", "rehost", serial, "--locking-id", a.locking_id(), "--blacklist-old",
                   "--revoke-only", env=support)  # fmt: skip
        assert_one_line_error(both, 2)
        shown = cli_json("license", "show", serial)
        assert [m["locking_id"] for m in shown["machines"]] == [b.locking_id()]  # type: ignore[attr-defined]

        # Without Connect: exactly the allowance, then a refusal until support authorizes one.
        offline = issue("--no-connect", "--recovery-allowance", "1", "--on-recovery", "revoke")
        boxes = [Box(tmp, f"machine-{n}", agent_env) for n in "cdef"]
        off_serial = str(offline["serial"])
        assert boxes[0].agent(*activate, str(offline["key"])).returncode == 0

        def rehost(box: Box) -> subprocess.CompletedProcess[str]:
            return cli("license", "rehost", off_serial, "--locking-id", box.locking_id(), env=support)

        # The agent-side flow: the new machine asks for the license itself.
        plain = boxes[1].agent(*activate, str(offline["key"]))
        assert "no free machine" in assert_one_line_error(plain, 1)
        recovered = boxes[1].agent(*activate, str(offline["key"]), "--recover")
        assert recovered.returncode == 0, recovered.stderr
        assert boxes[1].state() == "normal"
        denied = rehost(boxes[2])
        assert "allowance is used up (1 of 1)" in assert_one_line_error(denied, 1)
        assert cli("license", "authorize-recovery", off_serial, "--count", "1", env=support).returncode == 0
        assert rehost(boxes[2]).returncode == 0
        again = rehost(boxes[3])
        assert "support can authorize" in assert_one_line_error(again, 1)
        decisions = cli_json("license", "recoveries", off_serial, env=support)["recoveries"]
        assert [(d["granted"], d["rule"]) for d in decisions] == [  # type: ignore[union-attr]
            (True, "allowance"), (False, "none"), (True, "authorized"), (False, "none"),
        ]  # fmt: skip
        # The first machine (revoke only) loses this license at its next check-in.
        boxes[0].agent("connect")
        assert boxes[0].state() == "unlicensed"
        # The second one, offline since, got its copy today and lost the license today: the
        # exported list (one entry per container the license left) reaches that copy, and
        # not the copy of the machine it went to.
        third = cli_json("blacklist", "export", "-o", str(tmp / "blacklist-3.txt"), env=support)
        assert (third["format"], third["serials"]) == ("tessera/2", 2)

        def import_third(box: Box) -> str:
            result = box.agent("import-blacklist", str(tmp / "blacklist-3.txt"), "--json")
            assert result.returncode == 0, result.stderr
            return str(json.loads(result.stdout)["state"])

        assert import_third(boxes[1]) == "unlicensed"
        assert boxes[2].agent(*activate, str(offline["key"])).returncode == 0
        assert import_third(boxes[2]) == "normal"
        assert cli("audit", "verify").returncode == 0
