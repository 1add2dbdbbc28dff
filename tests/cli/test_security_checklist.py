"""``tessera security checklist`` from the outside: a real data directory, a real server
probed over TLS, every output format, ``--strict`` and bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

from ..server.processes import init_data_dir, running_server, tessera
from .conftest import assert_one_line_error


def test_the_checklist_of_a_running_server_in_every_format(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    init_data_dir(data_dir)
    comments = tmp_path / "comments.toml"
    comments.write_text('[comments]\nadmin-api-off = "the <CRM> issues licenses | over the API"\n')
    with running_server(data_dir, ca=str(data_dir / "tls" / "ca.pem")) as url:
        args = [
            "security",
            "checklist",
            "--data-dir",
            str(data_dir),
            "--url",
            url,
            "--comments",
            str(comments),
        ]
        result = tessera(*args, "--format", "json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        markdown = tessera(*args).stdout
        out = tmp_path / "checklist.html"
        written = tessera(*args, "--format", "html", "-o", str(out))
    every = {m["id"]: m for m in report["measures"]}
    assert every["tls"]["executed"] == "yes", every["tls"]
    assert every["tls"]["finding"].startswith(f"{url}: TLSv1.")
    assert every["admin-api-off"]["comment"] == "the <CRM> issues licenses | over the API"
    assert report["server"] == url and report["deployment"] == str(data_dir.resolve())
    # portal, metrics: off; two-step sign-in: n/a without the portal
    assert report["summary"] == {"yes": 7, "no": 4, "n/a": 4, "unchecked": 0}
    # Markdown: the seed's columns, one row per measure, a '|' in a comment escaped.
    header = "| # | Measure | References | Needed access rights | Executed | Finding |"
    assert header + " Customer comments and reasons |" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert len(rows) == len(report["measures"])
    assert "the <CRM> issues licenses \\| over the API" in markdown
    # HTML: written atomically to the file, the comment escaped.
    assert written.returncode == 0 and str(out) in written.stdout
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "the &lt;CRM&gt; issues licenses | over the API" in page
    assert "<CRM>" not in page


def test_strict_fails_while_a_measure_is_not_executed(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    init_data_dir(data_dir)
    result = tessera("security", "checklist", "--data-dir", str(data_dir), "--strict")
    line = assert_one_line_error(result, 1)
    assert "measures not executed: tls, " in line  # not probed is not proven
    assert "| no |" in result.stdout  # the checklist is printed all the same


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    init_data_dir(data_dir)
    bad_comments = tmp_path / "c.toml"
    bad_comments.write_text('[comments]\nno-such-measure = "x"\n')
    cases = [
        (["--data-dir", str(tmp_path / "missing")], "is not an initialized data directory"),
        (["--data-dir", str(data_dir), "--format", "pdf"], "--format must be one of"),
        (["--data-dir", str(data_dir), "--comments", str(bad_comments)], "no measure 'no-such-measure'"),
        (["--data-dir", str(data_dir), "--comments", str(tmp_path / "none.toml")], "does not exist"),
        (["--data-dir", str(data_dir), "--url", "ftp://x"], "--url must be an http(s):// URL"),
        (["--data-dir", str(data_dir), "--url", "https://"], "--url must be an http(s):// URL with a host"),
        (["--data-dir", str(data_dir), "--url", "https://h:99999"], "--url: Port out of range"),
        (
            ["--data-dir", str(data_dir), "--url", "https://127.0.0.1:1", "--ca", str(bad_comments)],
            "is not a PEM CA certificate",
        ),
    ]
    for args, message in cases:
        line = assert_one_line_error(tessera("security", "checklist", *args), 2)
        assert message in line, (args, line)


def test_json_is_an_alias_of_format_json(tmp_path: Path) -> None:
    """SPEC: every verb that prints data takes --json; the checklist had only --format json."""
    data_dir = tmp_path / "srv"
    init_data_dir(data_dir)
    args = ["security", "checklist", "--data-dir", str(data_dir)]
    by_flag = tessera(*args, "--json")
    assert by_flag.returncode == 0, by_flag.stderr
    by_format = json.loads(tessera(*args, "--format", "json").stdout)
    assert [m["id"] for m in json.loads(by_flag.stdout)["measures"]] == [
        m["id"] for m in by_format["measures"]
    ]
    assert tessera(*args, "--json", "--format", "json").returncode == 0
    clash = tessera(*args, "--json", "--format", "html")
    assert (
        clash.returncode == 2
        and clash.stderr.strip() == "error: --json and --format html contradict each other"
    )
