"""``tessera license issue-bulk`` from the outside, against a real server (SQLite, and
PostgreSQL when ``TESSERA_TEST_POSTGRES_URL`` is set): unbound licenses in chunks, licenses
pre-bound to machines whose files an agent imports and which later activate and check in,
and bad input that issues nothing."""

from __future__ import annotations

import json
import re
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tessera.cli._common import CliError
from tessera.core.fingerprint import locking_id_for

from ..server.conftest import backend_database
from ..server.processes import TESSERA, clean_env, running_server, tessera
from .conftest import assert_one_line_error
from .fake_server import fake_server


def _lines(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_issue_bulk_journey(tmp_path: Path, backend: str) -> None:
    with backend_database(backend) as db_url:
        _journey(tmp_path, db_url)


def _journey(tmp: Path, db_url: str | None) -> None:
    data = tmp / "server"
    init_args = ["server", "init", "--data-dir", str(data), "--json"]
    if db_url:
        init_args += ["--db", db_url]
    init = tessera(*init_args)
    assert init.returncode == 0, init.stderr
    info = json.loads(init.stdout)
    ca, vendor_pub = info["ca"], info["vendor_key"]
    with running_server(data, tls=True, ca=ca) as url:
        admin = clean_env(TESSERA_URL=url, TESSERA_TOKEN=info["admin_token"], TESSERA_CA=ca)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return tessera(*args, env=admin, cwd=tmp)

        assert cli("product", "create", "cortex", "--name", "CortexDB",
                   "--feature", "uniplex", "--feature", "backup").returncode == 0  # fmt: skip
        customer = json.loads(cli("customer", "create", "Factory", "--city", "Town", "--json").stdout)["id"]
        template = ["--customer", str(customer), "--product", "cortex",
                    "--feature", "uniplex=5,2099-01-15", "--feature", "backup=1"]  # fmt: skip

        # Unbound licenses, three requests of at most 3: the summary is one JSON object.
        made = cli(
            "license", "issue-bulk", *template, "--count", "7", "--chunk", "3", "-o", "plain.jsonl", "--json"
        )
        assert made.returncode == 0, made.stderr
        summary = json.loads(made.stdout)
        assert summary["count"] == 7 and summary["prebound"] is False
        assert (summary["first_serial"], summary["last_serial"]) == ("2026-000001", "2026-000007")
        assert summary["output"] == "plain.jsonl" and summary["seconds"] >= 0
        plain = _lines(tmp / "plain.jsonl")
        assert [x["serial"] for x in plain] == [f"2026-{n:06d}" for n in range(1, 8)]
        assert len({x["key"] for x in plain}) == 7
        shown = json.loads(cli("license", "show", plain[6]["serial"], "--json").stdout)
        assert shown["features"]["uniplex"] == {"count": 5, "expiry": "2099-01-15"}

        # Pre-bound: this machine's Locking ID (as its agent computes it) and two others.
        agent_env = clean_env(TESSERA_VENDOR_KEY=vendor_pub, TESSERA_AGENT_DIR=str(tmp / "agent"))

        def agent(*args: str) -> subprocess.CompletedProcess[str]:
            return tessera("agent", *args, env=agent_env, cwd=tmp)

        here = agent("locking-id").stdout.strip()
        others = [str(locking_id_for([("m", f"factory-{i}"), ("u", f"u-{i}")], "cortex")) for i in range(2)]
        (tmp / "ids.txt").write_text(f"# line 1 is a comment\n{others[0]}\n\n{here}\n{others[1]}\n")
        made = cli("license", "issue-bulk", *template, "--locking-ids", "ids.txt", "-o", "bound.jsonl")
        assert made.returncode == 0, made.stderr
        assert "3 pre-bound licenses" in made.stdout and "2026-000008..2026-000010" in made.stdout
        bound = _lines(tmp / "bound.jsonl")
        assert [x["locking_id"] for x in bound] == [others[0], here, others[1]]
        mine = bound[1]
        (tmp / "mine.lic").write_text(mine["license"])
        verified = tessera(
            "license", "verify", str(tmp / "mine.lic"), "--vendor-key", vendor_pub, "--locking-id", here
        )
        assert verified.returncode == 0, verified.stderr
        (tmp / "other.lic").write_text(bound[0]["license"])
        assert tessera("license", "verify", str(tmp / "other.lic"), "--vendor-key", vendor_pub,
                       "--locking-id", here).returncode == 1  # fmt: skip

        # The agent imports its file (no server needed), then activates online on the same
        # slot and checks in.
        imported = agent("import", "mine.lic")
        assert imported.returncode == 0, imported.stderr
        status = json.loads(agent("status", "--json").stdout)
        assert status["state"] == "normal" and status["features"]["uniplex"]["count"] == 5
        activated = agent("activate", "--server", url, "--ca", ca, "--key", mine["key"])
        assert activated.returncode == 0, activated.stderr
        connected = agent("connect")
        assert connected.returncode == 0, connected.stderr
        shown = json.loads(cli("license", "show", mine["serial"], "--json").stdout)
        assert [(m["slot"], m["locking_id"]) for m in shown["machines"]] == [(0, here)]
        assert shown["machines"][0]["last_checkin_at"] is not None

        # Bad input: one line, exit 2, nothing issued, no output file left behind.
        (tmp / "bad.txt").write_text(f"{others[0]}\nnot-a-locking-id\n")
        bad = cli("license", "issue-bulk", *template, "--locking-ids", "bad.txt", "-o", "x.jsonl")
        assert "bad.txt line 2" in assert_one_line_error(bad, 2)
        (tmp / "dup.txt").write_text(f"{others[0]}\n{others[0]}\n")
        dup = cli("license", "issue-bulk", *template, "--locking-ids", "dup.txt", "-o", "x.jsonl")
        assert "listed twice" in assert_one_line_error(dup, 2)
        feature = cli("license", "issue-bulk", "--customer", str(customer), "--product", "cortex",
                      "--feature", "nope=1", "--count", "3", "-o", "x.jsonl")  # fmt: skip
        assert "nope" in assert_one_line_error(feature, 2)
        over = cli("license", "issue-bulk", *template, "--count", "5", "--chunk", "10001", "-o", "x.jsonl")
        assert over.returncode == 2
        both = cli(
            "license", "issue-bulk", *template, "--count", "5", "--locking-ids", "ids.txt", "-o", "x.jsonl"
        )
        assert "exactly one" in assert_one_line_error(both, 2)
        exists = cli("license", "issue-bulk", *template, "--count", "1", "-o", "plain.jsonl")
        assert "exists already" in assert_one_line_error(exists, 2)
        assert not (tmp / "x.jsonl").exists()
        listed = json.loads(cli("license", "list", "--json").stdout)["licenses"]
        assert len(listed) == 10
        verify = cli("audit", "verify", "--json")
        assert verify.returncode == 0 and json.loads(verify.stdout)["ok"] is True


def _machines(n: int) -> list[str]:
    return [str(locking_id_for([("m", f"line-{i}"), ("u", f"u-{i}")], "cortex")) for i in range(n)]


def _bulk_answer(ids: list[str], first: int) -> dict[str, object]:
    serials = [f"2026-{first + i:06d}" for i in range(len(ids))]
    return {
        "count": len(ids),
        "first_serial": serials[0],
        "last_serial": serials[-1],
        "licenses": [
            {"serial": s, "key": f"K-{s}", "locking_id": i} for s, i in zip(serials, ids, strict=True)
        ],
    }


BULK = ("POST", "/api/v1/licenses/bulk")
TEMPLATE = ["license", "issue-bulk", "--customer", "1", "--product", "cortex", "--feature", "a=1"]


def test_a_malformed_locking_id_is_refused_by_its_line_before_any_request(tmp_path: Path) -> None:
    # QA: line 21 "TL1-NOTVALID" passed the prefix check; 20 licenses were issued in two
    # chunks before the server refused "locking_ids[0]" of the third.
    ids = _machines(20)
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\nTL1-NOTVALID\n")
    with fake_server() as server:
        server.default = (500, {"detail": "must not be asked"})
        result = tessera(*TEMPLATE, "--locking-ids", "ids.txt", "--chunk", "10", "-o", "out.jsonl",
                         env=clean_env(**server.env()), cwd=tmp_path)  # fmt: skip
        line = assert_one_line_error(result, 2)
        assert "ids.txt line 21" in line and "TL1-NOTVALID" in line and "not a Locking ID" in line
        assert server.requests == []
    assert not (tmp_path / "out.jsonl").exists()


def test_a_refused_chunk_names_file_lines_not_chunk_indices(tmp_path: Path) -> None:
    ids = _machines(4)
    # Comments and blank lines shift the file lines away from the list positions.
    (tmp_path / "ids.txt").write_text(f"# machines\n{ids[0]}\n{ids[1]}\n\n{ids[2]}\n{ids[3]}\n")
    refusal = f"locking_ids[1]: the machine {ids[3]} is blacklisted by the vendor: nothing was issued"
    with fake_server() as server:
        server.answers[BULK] = [(201, _bulk_answer(ids[:2], 1)), (422, {"detail": refusal})]
        result = tessera(*TEMPLATE, "--locking-ids", "ids.txt", "--chunk", "2", "-o", "out.jsonl",
                         env=clean_env(**server.env()), cwd=tmp_path)  # fmt: skip
        line = assert_one_line_error(result, 2)
        assert len(server.requests) == 2
    assert "ids.txt line 6: the machine" in line and "locking_ids[" not in line, line
    assert "2 of 4 licenses were issued before: 2026-000001..2026-000002" in line
    assert [x["serial"] for x in _lines(tmp_path / "out.jsonl")] == ["2026-000001", "2026-000002"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_chunk_in_flight_and_says_what_is_in_the_file(
    tmp_path: Path, signum: int
) -> None:
    # QA: SIGTERM mid-run exited 143 with no word while the chunk in flight was issued on
    # the server and its keys were in no file; SIGINT gave 130 and an empty stderr.
    with fake_server() as server:
        server.delay = 0.5
        server.answers[BULK] = [(201, _bulk_answer_plain(n * 3 + 1, 3)) for n in range(10)]
        proc = subprocess.Popen(
            [TESSERA, *TEMPLATE, "--count", "30", "--chunk", "3", "-o", "out.jsonl"],
            env=clean_env(**server.env()), cwd=tmp_path, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while len(server.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signum)  # the second chunk is in flight
        _, stderr = proc.communicate(timeout=30)
        sent = len(server.requests)
    assert proc.returncode == 128 + signum, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == ["error: interrupted after 6 licenses (2026-000001..2026-000006 are in out.jsonl)"]
    assert sent == 2  # no chunk was sent after the signal
    assert [x["serial"] for x in _lines(tmp_path / "out.jsonl")] == [f"2026-{n:06d}" for n in range(1, 7)]


def _limit_memory() -> None:
    """The child's address space capped (1 GiB): a CLI that reads an endless file whole fails
    with MemoryError in the test instead of taking the machine's memory (QA: 22 GB RSS)."""
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_an_endless_locking_ids_file_is_refused_by_its_first_line(tmp_path: Path) -> None:
    # QA: --locking-ids /dev/zero was read into memory whole (a device has no size to
    # check first) until the kernel killed the CLI. Now the first line is too long.
    with fake_server() as server:
        server.default = (500, {"detail": "must not be asked"})
        result = subprocess.run(
            [TESSERA, *TEMPLATE, "--locking-ids", "/dev/zero", "-o", "x.jsonl"],
            env=clean_env(**server.env()), cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=60, preexec_fn=_limit_memory, check=False,
        )  # fmt: skip
        line = assert_one_line_error(result, 2)
        assert server.requests == []
    assert line == (
        "error: --locking-ids /dev/zero line 1: longer than 1024 bytes "
        "(a Locking ID is at most 400 characters)"
    )
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"# " + b"x" * 1022 + b"\n", "line 1: longer than 1024 bytes"),  # a comment counts too
        (b"\n" * 3 + b"TL1-\xff\xfe\n", "line 4: not text (one Locking ID per line)"),
        (b"\n" * 200_001, "more than 200,000 lines (split it into several runs)"),
    ],
    ids=["long-line", "not-utf8", "too-many-lines"],
)
def test_a_locking_ids_file_past_its_limits_is_one_line_naming_where(
    tmp_path: Path, content: bytes, words: str
) -> None:
    from tessera.cli.admin import _read_locking_ids

    (tmp_path / "ids.txt").write_bytes(content)
    with pytest.raises(CliError, match=re.escape(words)) as refused:
        _read_locking_ids(tmp_path / "ids.txt")
    assert refused.value.code == 2


def test_a_locking_ids_file_at_its_limits_is_read(tmp_path: Path) -> None:
    from tessera.cli.admin import LOCKING_ID_LINE_MAX, LOCKING_ID_LINES_MAX, _read_locking_ids

    ids = _machines(2)
    longest = ("  " + ids[0]).ljust(LOCKING_ID_LINE_MAX - 1) + "\n"  # exactly the line limit
    rest = "\n" * (LOCKING_ID_LINES_MAX - 2) + ids[1]  # the last line, with no line end
    (tmp_path / "ids.txt").write_text(longest + rest)
    assert _read_locking_ids(tmp_path / "ids.txt") == (ids, [1, LOCKING_ID_LINES_MAX])


def _bulk_answer_plain(first: int, count: int) -> dict[str, object]:
    serials = [f"2026-{first + i:06d}" for i in range(count)]
    licenses = [{"serial": s, "key": f"K-{s}"} for s in serials]
    return {"count": count, "first_serial": serials[0], "last_serial": serials[-1], "licenses": licenses}
